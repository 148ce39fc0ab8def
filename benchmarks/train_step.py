"""CPU training step: npformer vs PyTorch eager on the same GPT, weights and batch.

    python benchmarks/train_step.py                 # both configs, table on stdout
    python benchmarks/train_step.py --config small --rounds 15

One step = forward, cross-entropy, backward, clip_grad_norm(1.0), AdamW step, zero_grad,
in float32. The frameworks run interleaved (k steps of one, then k of the other, repeated),
so machine noise hits both alike; the table gives the median ms/step of each and their
ratio. Peak memory is measured in a fresh subprocess per framework as the growth of the
proportional set size (sampled every ~1 ms; npformer's worker processes included, shared pages
counted once) over the first three steps, after the model and batch exist.
Between blocks the benchmark pauses 0.3 s: PyTorch's OpenMP threads and OpenBLAS's threads keep
spinning for a while after their last call, and would otherwise slow whichever runs next.

PyTorch twins: "torch" is a minimal nanoGPT-style module (benchmarks/torch_twins.py);
"hf" is transformers' GPT2LMHeadModel made by npformer.interop.to_torch (when installed).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PAUSE = 0.3   # seconds between blocks of steps

CONFIGS = {
    # nanoGPT's Shakespeare-char CPU recipe, and a larger one
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65),
    "large": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=65),
}


def build(name, threads, only=None, shards=None):
    import torch
    from npformer.models import GPT, GPTConfig
    from npformer.optim import AdamW, weight_decay_groups
    from torch_twins import npformer_step, torch_twin

    torch.set_num_threads(threads)
    c = dict(CONFIGS[name])
    B = c.pop("batch_size")
    cfg = GPTConfig(**c)
    model = GPT(cfg, generator=np.random.default_rng(0), device="cpu")
    rng = np.random.default_rng(1)
    x = rng.integers(0, cfg.vocab_size, (B, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (B, cfg.block_size))
    opt = AdamW(weight_decay_groups(model.named_parameters(), 0.1), lr=1e-3, betas=(0.9, 0.99))

    np_step = npformer_step(model, x, y, opt, threads, shards)

    steps = {"npformer": np_step}
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def torch_step_for(tm):
        decay = [p for p in tm.parameters() if p.dim() >= 2]
        rest = [p for p in tm.parameters() if p.dim() < 2]
        topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                 lr=1e-3, betas=(0.9, 0.99))

        def step():
            out = tm(xt, labels=yt) if hasattr(tm, "config") else tm(xt, yt)
            loss = out.loss if hasattr(out, "loss") else out[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
            topt.step()
            topt.zero_grad(set_to_none=True)
        return step

    if only in (None, "torch"):
        steps["torch"] = torch_step_for(torch_twin(model))
    if only in (None, "hf"):
        try:
            from npformer.interop import to_torch
            steps["hf"] = torch_step_for(to_torch(model))
        except ImportError:
            pass
    return steps if only is None else {only: steps[only]}


def timed(fn, k):
    time.sleep(PAUSE)   # let the other framework's worker threads stop spinning (OpenMP/OpenBLAS)
    t = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t) / k * 1000


def interleaved(steps: dict, rounds: int, k: int) -> dict:
    """{name: [ms/step of each round]}: `rounds` rounds of k steps of each framework, one after another."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(timed(fn, k))
    return times


def _pss_mb(pids):
    """Proportional set size (MB) of these processes together: shared pages are counted once."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return total / 1024


def measure_peak(step, n_steps=3):
    """Peak growth of the memory of this process and the step's worker processes (MB).

    Measured as their proportional set size (shared pages split between the processes that
    map them, so npformer's parameters in shared memory count once), sampled every ~1 ms.
    """
    import gc
    import threading
    gc.collect()
    pids = ["self"] + list(getattr(step, "worker_pids", []))
    base, peak, done = _pss_mb(pids), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _pss_mb(pids))
            time.sleep(0.001)
    t = threading.Thread(target=sample)
    t.start()
    for _ in range(n_steps):
        step()
    done.set()
    t.join()
    return max(peak[0], _pss_mb(pids)) - base


def peak_memory_mb(name, framework, threads, shards=None):
    """measure_peak in a fresh interpreter that builds only `framework`'s model."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
            f"import train_step as b; s = b.build({name!r}, {threads}, only={framework!r}, shards={shards!r})[{framework!r}];"
            f"print(b.measure_peak(s))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS) + ["all"], default="all")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per framework per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--shards", type=int, default=None, help="npformer's batch shards (default: its own choice)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    names = sorted(CONFIGS, reverse=True) if args.config == "all" else [args.config]
    results = []
    print(f"threads {args.threads}; numpy {np.__version__}; {args.rounds} rounds x {args.steps} steps, interleaved")
    for name in names:
        steps = build(name, args.threads, shards=args.shards)
        for fn in steps.values():          # warm-up
            for _ in range(2):
                fn()
        times = interleaved(steps, args.rounds, args.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {} if args.no_memory else {k: peak_memory_mb(name, k, args.threads, args.shards) for k in steps}
        for k in steps:
            row = dict(config=name, framework=k, ms_per_step=round(med[k], 2),
                       ratio_npformer_over=round(med["npformer"] / med[k], 3),
                       peak_mb=None if not mem else round(mem[k], 1))
            results.append(row)
        print(f"\n{name}: {CONFIGS[name]}")
        print(f"{'framework':<10} {'ms/step':>9} {'npformer/this':>14} {'peak MB':>9}")
        for k in steps:
            pm = f"{mem[k]:9.1f}" if mem else f"{'-':>9}"
            print(f"{k:<10} {med[k]:9.2f} {med['npformer'] / med[k]:14.3f} {pm}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
