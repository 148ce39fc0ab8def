"""Draw the figures of docs/transformer.md from npformer itself.

    python docs/make_figures.py        # writes docs/sinusoidal_encoding.png (needs matplotlib)

The sinusoidal table is read from npformer.nn.SinusoidalPositionalEncoding's ``pe`` buffer, so the
picture is of the code, not of a re-implementation.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")                      # files only, no display needed
import matplotlib.pyplot as plt            # noqa: E402
import numpy as np                         # noqa: E402

from npformer import backend, nn           # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def sinusoidal_figure(path: str, max_len: int = 100, d_model: int = 64) -> None:
    """Three panels: the table PE (max_len, d_model), a few of its columns, and PE PE^T."""
    pe = backend.to_numpy(nn.SinusoidalPositionalEncoding(d_model, max_len, dtype=np.float64, device="cpu").pe)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw=dict(width_ratios=[1.25, 1.25, 1]))

    ax = axes[0]
    im = ax.imshow(pe, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_title(f"PE (max_len={max_len}, d_model={d_model})")
    ax.set_xlabel("dimension (even: sin, odd: cos)")
    ax.set_ylabel("position")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)

    ax = axes[1]
    for j in (4, 5, 20, 40):
        wavelength = 2 * np.pi * 10000.0 ** ((j - j % 2) / d_model)     # 2 pi 10000^(2i / d_model)
        ax.plot(pe[:, j], lw=1.5, label=f"dim {j}: {'sin' if j % 2 == 0 else 'cos'}, wavelength {wavelength:.0f}")
    ax.set_title("four columns (one frequency each)")
    ax.set_xlabel("position")
    ax.set_ylim(-1.1, 1.1)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)

    ax = axes[2]
    im = ax.imshow(pe @ pe.T, cmap="viridis", interpolation="nearest")
    ax.set_title("PE PE^T (a function of pos - pos')")
    ax.set_xlabel("position")
    ax.set_ylabel("position")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    out = os.path.join(HERE, "sinusoidal_encoding.png")
    sinusoidal_figure(out)
    print(f"wrote {out} ({os.path.getsize(out) / 1024:.0f} KB)")
