"""GPU training throughput: npformer on CuPy vs PyTorch eager, GPT-2-small shape, float32.

    python benchmarks/gpu_bench.py                     # 12 layers, 12 heads, 768 wide, block 1024
    python benchmarks/gpu_bench.py --device cpu --n-layer 2 --n-embd 64 --n-head 2 --block-size 64 --batch-size 2
                                                       # a smoke test of the script itself on the CPU

Both frameworks train the same GPT (weights copied from npformer to a minimal PyTorch twin,
benchmarks/torch_twins.py) on the same batch with AdamW; the runs alternate, and each timing
ends with a device synchronisation. Prints tokens/s of each and the ratio npformer/PyTorch.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="gpu", choices=("cpu", "gpu"))
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=50304)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    import torch
    from npformer import backend
    from npformer.models import GPT, GPTConfig
    from npformer.optim import AdamW, weight_decay_groups
    from torch_twins import npformer_step, torch_twin

    if args.device == "gpu" and not backend.gpu_available():
        sys.exit(f"gpu_bench: {backend.gpu_unavailable_reason()}")
    cfg = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(cfg, generator=np.random.default_rng(0), device=args.device)
    opt = AdamW(weight_decay_groups(model.named_parameters(), 0.1), lr=3e-4)
    rng = np.random.default_rng(1)
    xh = rng.integers(0, cfg.vocab_size, (args.batch_size, cfg.block_size))
    yh = rng.integers(0, cfg.vocab_size, (args.batch_size, cfg.block_size))
    x, y = backend.to_device(xh, args.device), backend.to_device(yh, args.device)
    sync = (lambda: backend.xp_for("gpu").cuda.Device().synchronize()) if args.device == "gpu" else (lambda: None)

    np_step = npformer_step(model, x, y, opt)

    tdev = "cuda" if args.device == "gpu" else "cpu"
    tm = torch_twin(model).to(tdev)
    topt = torch.optim.AdamW(tm.parameters(), lr=3e-4, weight_decay=0.1)
    xt, yt = torch.from_numpy(xh).to(tdev), torch.from_numpy(yh).to(tdev)
    tsync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)

    def torch_step():
        _, loss = tm(xt, yt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        topt.step()
        topt.zero_grad(set_to_none=True)

    runs = {"npformer": (np_step, sync), "torch": (torch_step, tsync)}
    for step, s in runs.values():       # warm-up (CuPy compiles its kernels on first use)
        for _ in range(2):
            step()
        s()
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, (step, s) in runs.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            s()
            times[k].append((time.perf_counter() - t) / args.steps)
    tokens = args.batch_size * cfg.block_size
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"device {args.device}; GPT {args.n_layer}L/{args.n_head}H/{args.n_embd}, block {args.block_size}, "
          f"batch {args.batch_size}, vocab {args.vocab_size}, float32")
    print(f"{'framework':<10} {'tokens/s':>12} {'ms/step':>9}")
    for k in runs:
        print(f"{k:<10} {tps[k]:12,.0f} {tokens / tps[k] * 1000:9.1f}")
    print(f"ratio npformer/torch tokens/s: {tps['npformer'] / tps['torch']:.3f}")


if __name__ == "__main__":
    main()
