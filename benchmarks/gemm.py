"""One-thread float32 GEMMs: NumPy's BLAS (what npformer calls) vs PyTorch's, same shapes.

    python benchmarks/gemm.py

The shapes are those of the Linear layers of the large train_step config on one data-parallel
shard of 512 tokens: x @ W^T (forward), g @ W (input gradient) and g^T @ x (weight gradient).
Each framework runs on one thread (npformer's data-parallel step gives every thread a
one-thread BLAS). The table gives GFLOP/s and the time ratio NumPy / PyTorch; it bounds how
close npformer's training step can come to PyTorch's, since these GEMMs are most of its time.
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npformer import cpu  # noqa: E402

TOKENS = 512
LAYERS = {"c_attn": (384, 1152), "attn c_proj": (384, 384), "c_fc": (384, 1536), "mlp c_proj": (1536, 384)}


def best_of(fn, repeat=5, number=20):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return min(times)


def main():
    import torch
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, torch {torch.__version__}, one thread each, {TOKENS} tokens")
    print(f"{'layer':<12} {'product':<10} {'numpy GF/s':>10} {'torch GF/s':>10} {'numpy/torch':>12}")
    total_np = total_th = 0.0
    for name, (n_in, n_out) in LAYERS.items():
        x = rng.standard_normal((TOKENS, n_in)).astype(np.float32)
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        g = rng.standard_normal((TOKENS, n_out)).astype(np.float32)
        tx, tw, tg = (torch.from_numpy(a) for a in (x, w, g))
        flops = 2 * TOKENS * n_in * n_out
        for label, f_np, f_th in (("x W^T", lambda: x @ w.T, lambda: tx @ tw.T),
                                  ("g W", lambda: g @ w, lambda: tg @ tw),
                                  ("g^T x", lambda: g.T @ x, lambda: tg.T @ tx)):
            with cpu.blas_threads(1):
                t_np = best_of(f_np)
            t_th = best_of(f_th)
            total_np += t_np
            total_th += t_th
            print(f"{name:<12} {label:<10} {flops / t_np / 1e9:10.0f} {flops / t_th / 1e9:10.0f} {t_np / t_th:12.2f}")
    print(f"{'all':<12} {'':<10} {'':>10} {'':>10} {total_np / total_th:12.2f}")


if __name__ == "__main__":
    main()
