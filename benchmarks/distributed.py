"""Data parallelism over ranks (docs/distributed.md): throughput, allreduce cost, a GPT-2-small step.

    python benchmarks/distributed.py                          # all three parts, tables on stdout
    python benchmarks/distributed.py --part throughput --rounds 3 --steps 30
    python benchmarks/distributed.py --part allreduce
    python benchmarks/distributed.py --part gpt2
    python benchmarks/distributed.py --part gpt2 --step-s 53.1  # the tables for a step time measured before

throughput: tokens/s of the training steps of `npformer pretrain` (the built-in corpus; the time of
    the steps only, from the run's summary, ``ms_per_iter``), for the default model ("small") and a
    larger one ("large"), run as one process with 1 worker, one process with 2 worker processes
    (``--workers 2``), and ``mpiexec -n 2`` (1 worker per rank). The three run one after another,
    repeated `rounds` times (interleaved, so that the load of other jobs hits all alike); the table
    gives the median and the ratio to one process with 1 worker.
allreduce: on 2 ranks, the median time of ``comm.allreduce`` of float32 buffers from 4 bytes to
    64 MiB, and of ``distributed.allreduce_gradients`` (pack, allreduce, unpack) for the two models;
    the latency and bandwidth of a fit t = a + bytes / BW, and the bus bandwidth 2(N-1)/N bytes / t.
gpt2: the median time of one training step of GPT-2 small (124M parameters, float32) on this
    machine at batch 1 x 256 tokens (2 worker threads), which the ring-allreduce model of
    docs/distributed.md scales to N nodes.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {  # pretrain flags: the default model, and a larger one (benchmarks/train_step.py's "large")
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16),
    "large": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}
MODES = (("1 process, --workers 1", 1, 1), ("1 process, --workers 2", 1, 2), ("mpiexec -n 2", 2, None))
GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def launch(task: dict, ranks: int) -> dict:
    """Run `task` (see rank_task) on `ranks` ranks (1: a plain process); rank 0's JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--rank-task", json.dumps(task)]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks)] + cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=1800).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def rank_task(task: dict) -> None:
    """What each rank (or the single process) runs; rank 0 prints one JSON line."""
    sys.modules["matplotlib"] = None                 # no loss.png: not part of what is measured
    from npformer import distributed
    comm = distributed.communicator()
    if task["kind"] == "pretrain":
        from npformer.training.pretrain import PretrainConfig, pretrain
        out = tempfile.mkdtemp(prefix="npf-dist-") if comm.rank == 0 else None
        out = comm.broadcast_json(out)
        try:
            cfg = PretrainConfig(**MODELS[task["model"]], max_iters=task["steps"], eval_interval=10**6,
                                 eval_iters=1, samples=0, workers=task["workers"], out=os.path.join(out, "run"))
            summary = pretrain(cfg, log=lambda *a: None, comm=None if comm.size == 1 else comm)
        finally:
            comm.barrier()
            if comm.rank == 0:
                shutil.rmtree(out, ignore_errors=True)
        m = MODELS[task["model"]]
        ms = summary["ms_per_iter"]
        result = {"ms": ms, "tok_s": m["batch_size"] * m["block_size"] / ms * 1e3}
    elif task["kind"] == "allreduce":
        result = _allreduce(comm, task["reps"])
    if comm.rank == 0:
        print(json.dumps(result), flush=True)


def _median_ms(fn, reps: int, comm) -> float:
    times = []
    for _ in range(reps):
        comm.barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    ms = np.array([statistics.median(times) * 1e3])
    return float(comm.allreduce(ms, "max")[0])      # the slower rank's


def _allreduce(comm, reps: int) -> dict:
    from npformer import cpu, distributed
    cpu.tune_allocator()                             # as in training: freed buffers are reused
    from npformer.models.gpt import GPT, GPTConfig
    raw = {}
    for nbytes in (4, 1 << 10, 1 << 16, 1 << 20, 1 << 24, 1 << 26):
        a = np.ones(nbytes // 4, dtype=np.float32)
        raw[nbytes] = _median_ms(lambda: comm.allreduce(a), reps if nbytes < 1 << 24 else max(5, reps // 4), comm)
    models = {}
    for name, m in MODELS.items():
        model = GPT(GPTConfig(vocab_size=32, block_size=m["block_size"], n_layer=m["n_layer"], n_head=m["n_head"],
                              n_embd=m["n_embd"]), generator=np.random.default_rng(0))
        for p in model.parameters():
            p.grad = np.ones_like(p.data)
        nbytes = sum(p.data.nbytes for p in model.parameters())
        flat = np.ones(nbytes // 4, dtype=np.float32)
        models[name] = {"bytes": nbytes, "params": len(model.parameters()),
                        "helper_ms": _median_ms(lambda: distributed.allreduce_gradients(model, comm, "sum"), reps,
                                                comm),
                        "raw_ms": _median_ms(lambda: comm.allreduce(flat), reps, comm)}
    return {"ranks": comm.size, "raw": {str(k): v for k, v in raw.items()}, "models": models}


def throughput(rounds: int, steps: int) -> None:
    print(f"## tokens/s of the training steps ({steps} steps a run, the large model {max(4, steps // 4)}; "
          f"{rounds} interleaved rounds; medians)\n")
    print("| model | parameters | " + " | ".join(name for name, _, _ in MODES) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in MODES) + " |")
    for model in MODELS:
        runs = {name: [] for name, _, _ in MODES}
        for _ in range(rounds):
            for name, ranks, workers in MODES:
                n = steps if model == "small" else max(4, steps // 4)      # the large model: ~10x a step
                runs[name].append(launch({"kind": "pretrain", "model": model, "steps": n, "workers": workers},
                                         ranks)["tok_s"])
        base = statistics.median(runs[MODES[0][0]])
        cells = [f"{statistics.median(v):,.0f} tok/s (x{statistics.median(v) / base:.2f}; runs "
                 f"{', '.join(f'{r:,.0f}' for r in v)})" for v in runs.values()]
        print(f"| {model} ({MODELS[model]}) | {_params(model) / 1e6:.2f}M | " + " | ".join(cells) + " |")
    print()


def _params(model: str) -> int:
    from npformer.models.gpt import GPT, GPTConfig
    m = {k: v for k, v in MODELS[model].items() if k != "batch_size"}
    model = GPT(GPTConfig(vocab_size=32, **m), generator=np.random.default_rng(0))    # vocab: the corpus's
    return model.num_parameters()


def allreduce(reps: int) -> None:
    r = launch({"kind": "allreduce", "reps": reps}, 2)
    n = r["ranks"]
    print(f"## allreduce on {n} ranks of this machine (float32, median of {reps}; the slower rank)\n")
    print("| bytes | ms | bus bandwidth 2(N-1)/N bytes / t |")
    print("| --- | --- | --- |")
    xs, ts = [], []                                  # bytes, seconds
    for nbytes, ms in r["raw"].items():
        nbytes = int(nbytes)
        xs.append(nbytes)
        ts.append(ms / 1e3)
        print(f"| {nbytes:,} | {ms:.3f} | {2 * (n - 1) / n * nbytes / (ms / 1e3) / 1e9:.2f} GB/s |")
    big = max(xs)
    print(f"\nlatency (a 4-byte allreduce): {r['raw']['4'] * 1e3:.1f} us; bandwidth at {big / 2**20:.0f} MiB: "
          f"{2 * (n - 1) / n * big / ts[xs.index(big)] / 1e9:.2f} GB/s (bus), {big / ts[xs.index(big)] / 1e9:.2f} "
          f"GB/s (bytes / t)\n")
    print("| model | gradient bytes | parameters | allreduce_gradients ms | raw allreduce ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, m in r["models"].items():
        print(f"| {name} | {m['bytes']:,} | {m['params']} | {m['helper_ms']:.2f} | {m['raw_ms']:.2f} |")
    print()


def gpt2(reps: int, step_s=None) -> None:
    """Measure a GPT-2-small step (or take `step_s`, seconds, measured before) and print the ring model's tables."""
    from npformer.models.gpt import GPT, GPTConfig
    from npformer.optim import AdamW, clip_grad_norm
    from npformer.training import parallel
    model = GPT(GPTConfig(**GPT2_SMALL), generator=np.random.default_rng(0))
    times = []
    if step_s is None:
        opt = AdamW(model.parameters(), lr=1e-4)
        rng = np.random.default_rng(1)
        x = rng.integers(0, GPT2_SMALL["vocab_size"], (1, 256))
        y = rng.integers(0, GPT2_SMALL["vocab_size"], (1, 256))
        for i in range(reps + 1):
            t = time.perf_counter()
            parallel.forward_backward(model, x, y, threads=2, shards=2)
            clip_grad_norm(model.parameters(), 1.0)
            parallel.step_in_threads(opt, 2)
            opt.zero_grad()
            if i:                                            # the first step allocates: not counted
                times.append(time.perf_counter() - t)
    n = sum(p.data.size for p in model.parameters())
    step = statistics.median(times) if step_s is None else step_s
    how = (f"median of {reps}: {', '.join(f'{t:.2f}' for t in times)}" if step_s is None else "given by --step-s")
    print(f"## GPT-2 small on this machine: {n / 1e6:.1f}M parameters ({4 * n / 2**20:.0f} MiB of float32 "
          f"gradients), batch 1 x 256 tokens, 2 threads: {step:.2f} s a step ({how})\n")
    print(f"N nodes like this one, each 256 tokens a step ({step:.2f} s), then a ring allreduce of {4 * n / 1e6:.0f} "
          f"MB: tokens/s of the whole run, and the share of the step spent computing\n")
    ring_table(step, 256, 4 * n, ("10 Gb Ethernet", "100 Gb InfiniBand"))
    tokens = 16 * 1024
    gpu_step = tokens / GPU_TOKENS_PER_S
    print(f"N GPUs, each 16 x 1024 tokens a step in an assumed {gpu_step * 1e3:.0f} ms ({GPU_TOKENS_PER_S:,} "
          f"tokens/s, not measured), then the same allreduce over NCCL\n")
    ring_table(gpu_step, tokens, 4 * n, ("NVLink (8 GPUs of a node)", "400 Gb InfiniBand (GPUs across nodes)"),
               ranks=(1, 2, 4, 8, 16, 64))


# ring-allreduce model: t(N) = 2(N-1)/N * bytes / BW + 2(N-1) * a (each of the 2(N-1) ring steps pays the latency a)
NETWORKS = {  # name: (bandwidth B/s, latency s), nominal figures (not measured here)
    "10 Gb Ethernet": (1.25e9, 50e-6),
    "100 Gb InfiniBand": (12.5e9, 5e-6),
    "NVLink (8 GPUs of a node)": (300e9, 10e-6),
    "400 Gb InfiniBand (GPUs across nodes)": (50e9, 10e-6),
}
GPU_TOKENS_PER_S = 200_000   # an assumed GPT-2-small throughput of one data-centre GPU (not measured here)
MOST_RANKS = {"NVLink (8 GPUs of a node)": 8}     # beyond a node, the GPUs talk over the network


def ring_ms(nbytes: int, n: int, bandwidth: float, latency: float) -> float:
    """The ring-allreduce model's time (ms) for `nbytes` over `n` ranks."""
    return 0.0 if n == 1 else 1e3 * (2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency)


def ring_table(step_s: float, tokens: int, nbytes: int, networks, ranks=(1, 2, 4, 8, 16, 64)) -> None:
    """N ranks, each computing `tokens` a step in `step_s`, then allreducing `nbytes` (no overlap)."""
    print("| network | " + " | ".join(f"N = {n}" for n in ranks) + " |")
    print("| --- | " + " | ".join("---" for _ in ranks) + " |")
    for name in networks:
        bw, lat = NETWORKS[name]
        cells = []
        for n in ranks:
            if n > MOST_RANKS.get(name, n):
                cells.append("-")
                continue
            t = step_s + ring_ms(nbytes, n, bw, lat) / 1e3
            cells.append(f"{n * tokens / t:,.0f} tok/s, {step_s / t:.0%}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "throughput", "allreduce", "gpt2"), default="all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--step-s", type=float, default=None,
                    help="gpt2: print the tables for this step time (seconds) instead of measuring one")
    ap.add_argument("--rank-task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_task:
        rank_task(json.loads(args.rank_task))
        return
    print(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)\n")
    if args.part in ("all", "throughput"):
        throughput(args.rounds, args.steps)
    if args.part in ("all", "allreduce"):
        allreduce(args.reps)
    if args.part in ("all", "gpt2"):
        gpt2(3, args.step_s)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
