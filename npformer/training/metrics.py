"""The run directory's logs: metrics.jsonl (one JSON object per evaluation) and loss.png.

    append_metrics(path, record)       one line per evaluation
    truncate_metrics(path, step)       on resume: drop lines written after the checkpoint
    plot_losses(metrics, png, floor)   the loss curve, when matplotlib is installed
"""

from __future__ import annotations

import json
import os

from .checkpoint import atomic_write_text


def append_metrics(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, step):
    """Drop metric lines past `step` (written after the checkpoint we resume from), and a line
    torn by a kill mid-write; the file is replaced atomically."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(json.dumps(record) + "\n")
    atomic_write_text(path, "".join(keep))


def plot_losses(metrics_path, png_path, floor, log):
    """Write a loss-curve PNG when matplotlib is installed (the optional 'plot' extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no loss.png: matplotlib is not installed (pip install matplotlib); the losses are in metrics.jsonl")
        return
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train")
    ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], label="val")
    if floor:
        ax.axhline(floor, color="gray", linestyle="--", label="entropy floor")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    log(f"loss curve: {png_path}")
