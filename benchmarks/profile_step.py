"""Where one CPU thread's share of a training step goes, by op (cProfile).

    python benchmarks/profile_step.py --config large

With 2 threads the data-parallel step gives each thread half the batch, cut into shards of
about 512 tokens, run one after another with a one-thread BLAS. This script runs exactly that
share on one thread (no second thread, so the profile is not blurred by GIL waits), profiles
it, and prints the time per step of each op's forward and backward. The optimizer step, the
gradient clipping and the accumulation across threads are not included.

    python benchmarks/profile_step.py --config large --torch

profiles the PyTorch twin's whole step instead (torch.profiler, 2 threads), for comparison.
"""

import argparse
import cProfile
import os
import pstats
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_step import CONFIGS  # noqa: E402

from npformer import cpu  # noqa: E402
from npformer.models import GPT, GPTConfig  # noqa: E402
from npformer.training import parallel  # noqa: E402

# profile entries (file suffix, function name) -> the row they are counted in
GROUPS = {
    ("ops/linalg.py", "linear"): "linear forward", ("ops/linalg.py", "backward"): "linear backward",
    ("ops/attention.py", "attention"): "attention forward",
    ("ops/attention.py", "self_attention"): "attention forward",
    ("ops/attention.py", "backward"): "attention backward",
    ("ops/activations.py", "gelu"): "gelu forward", ("ops/activations.py", "backward"): "gelu backward",
    ("ops/fused.py", "layer_norm"): "layer norm forward",
    ("ops/fused.py", "backward"): "layer norm, cross-entropy, embedding backward",
    ("ops/fused.py", "cross_entropy"): "cross-entropy forward",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="large")
    ap.add_argument("--threads", type=int, default=2, help="the thread count whose per-thread share is profiled")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--torch", action="store_true", help="profile the PyTorch twin's step instead")
    args = ap.parse_args()
    if args.torch:
        return profile_torch(args)
    c = dict(CONFIGS[args.config])
    batch = c.pop("batch_size")
    cfg = GPTConfig(**c)
    model = GPT(cfg, generator=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    rows = batch // args.threads
    x = rng.integers(0, cfg.vocab_size, (rows, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (rows, cfg.block_size))
    full_shards = args.threads * max(1, -(-batch * cfg.block_size // (args.threads * parallel.TOKENS_PER_SHARD)))
    shards = full_shards // args.threads

    def share():
        parallel.forward_backward(model, x, y, threads=1, shards=shards)
        model.zero_grad()

    with cpu.blas_threads(1):
        for _ in range(2):
            share()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            share()
        prof.disable()
    stats = pstats.Stats(prof).stats
    total = max(ct for (_, _, name), (_, _, _, ct, _) in stats.items() if name == "share")
    rows_ms = {}
    for (path, _, name), (_, _, _, ct, _) in stats.items():     # cumulative: with the NumPy calls inside
        label = next((g for (suffix, fn), g in GROUPS.items() if path.endswith(suffix) and name == fn), None)
        if label is not None:
            rows_ms[label] = rows_ms.get(label, 0.0) + ct
    rows_ms["the rest (engine, adds, reshapes, embedding, Python)"] = total - sum(rows_ms.values())
    print(f"{args.config}: one thread's share of a {args.threads}-thread step = {rows} sequences "
          f"in {shards} shard(s); {1000 * total / args.steps:.0f} ms per step (under cProfile)")
    for label, t in sorted(rows_ms.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<52} {1000 * t / args.steps:8.1f} ms  {100 * t / total:5.1f}%")


def profile_torch(args):
    import torch
    from torch.profiler import ProfilerActivity, profile
    from train_step import build
    step = build(args.config, args.threads, only="torch")["torch"]
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(f"{args.config}: PyTorch twin, {torch.get_num_threads()} threads; self time per step of its top ops")
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    for e in rows:
        print(f"  {e.key[:52]:<52} {e.self_cpu_time_total / 1000 / args.steps:8.1f} ms")


if __name__ == "__main__":
    main()
