"""npformer.training.memory's estimate next to the measured peak of a few pretraining configs.

    python benchmarks/memory_estimate.py                    # the table, one fresh process per row
    python benchmarks/memory_estimate.py --measure '{"block_size": 512, "n_embd": 64, ...}'

Each row runs in a fresh interpreter (tests/test_memory.py runs the same `--measure`):

- train: the step of npformer.training.pretrain (ShardWorkers or parallel.forward_backward,
  clip_grad_norm, AdamW, zero_grad) on random token ids, `steps` times. Measured: the main
  process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before the
  model is built) less its resident set then, plus each forked worker's peak private memory
  (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup, sampled every ~2 ms, or its VmHWM
  growth since the fork when larger). Compared with MemoryEstimate.train_bytes.
- eval: the model built first, then the peak growth of the evaluation (npformer.training.objectives.CausalLM)
  (`steps` batches, each in pieces of a training shard's rows, under no_grad) on random ids.
  Compared with MemoryEstimate.eval_bytes.
"""

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

ROWS = [
    # name, mode, settings (PretrainConfig fields and vocab_size)
    ("long blocks", "train", dict(n_layer=2, n_head=8, n_embd=64, block_size=1024, batch_size=8, shards=2,
                                  workers=1, vocab_size=65)),
    ("wide vocab", "train", dict(n_layer=2, n_head=4, n_embd=128, block_size=96, batch_size=16, shards=1,
                                 workers=1, vocab_size=8192)),
    ("dropout", "train", dict(n_layer=2, n_head=8, n_embd=64, block_size=256, batch_size=12, shards=2,
                              workers=1, vocab_size=65, dropout=0.1)),
    ("2 workers", "train", dict(n_layer=2, n_head=16, n_embd=64, block_size=512, batch_size=8, shards=4,
                                workers=2, vocab_size=512)),
    ("eval", "eval", dict(n_layer=2, n_head=8, n_embd=64, block_size=1024, batch_size=16, shards=2,
                          workers=1, vocab_size=65)),
    ("default", "train", dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, workers=2,
                              vocab_size=65)),
    ("long, 2 workers", "train", dict(n_layer=4, n_head=4, n_embd=128, block_size=2048, batch_size=4, workers=2,
                                      vocab_size=65)),
]


def _status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _private_kb(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))


class _PeakPrivate:
    """Samples the private memory of `pids` on a thread until stopped; .peak: kB per pid."""

    def __init__(self, pids, every=0.002):
        self.pids, self.every, self.peak = list(pids), every, {p: 0 for p in pids}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.is_set():
            for p in self.pids:
                self.peak[p] = max(self.peak[p], _private_kb(p))
            time.sleep(self.every)

    def stop(self):
        self._done.set()
        self._thread.join()
        for p in self.pids:
            self.peak[p] = max(self.peak[p], _private_kb(p))
        return self.peak


def measure(settings: dict, mode: str = "train", steps: int = 3) -> dict:
    """Run one config in this process; return measured and estimated bytes (see the docstring)."""
    import numpy as np

    from npformer import backend, random
    from npformer.models.gpt import GPT, GPTConfig
    from npformer.optim import AdamW, clip_grad_norm, weight_decay_groups
    from npformer.training import memory, parallel, workers as shard_workers
    from npformer.training.objectives import CausalLM
    from npformer.training.pretrain import PretrainConfig

    settings = dict(settings)
    V = settings.pop("vocab_size")
    cfg = dataclasses.replace(PretrainConfig(device="cpu"), **settings).checked()
    est = memory.estimate_pretrain(cfg, V)
    ids = np.random.default_rng(0).integers(0, V, size=(cfg.batch_size, cfg.block_size + 1))
    x, y = np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:])
    mcfg = GPTConfig(vocab_size=V, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)

    def reset_peak():
        gc.collect()
        try:                      # freed heap goes back to the kernel, so that reuse is not hidden
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                        # VmHWM := VmRSS
        except OSError:
            pass
        return _status_kb("self", "VmRSS")

    if mode == "eval":
        objective = CausalLM(dataclasses.replace(cfg, eval_iters=steps), SimpleNamespace(vocab_size=V))
        corpus = np.random.default_rng(1).integers(0, V, size=cfg.batch_size * (cfg.block_size + 1) * 4)
        base = reset_peak()
        objective.evaluate(corpus, seed=0)
        return {"measured": 1024 * (_status_kb("self", "VmHWM") - base), "estimate": est.eval_bytes,
                "parts": est.parts}

    base = reset_peak()
    model = GPT(mcfg, generator=np.random.default_rng(cfg.seed), device="cpu")
    opt = AdamW(weight_decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr)
    random.set_default_generator("cpu", backend.default_rng(cfg.seed + 2, "cpu"))
    model.train()
    pool = (shard_workers.ShardWorkers(model, cfg.workers)
            if cfg.workers > 1 and shard_workers.available() else None)
    pids = pool.pids if pool is not None else []
    start = {p: _status_kb(p, "VmRSS") for p in pids}
    sampler = _PeakPrivate(pids)
    try:
        for _ in range(steps):
            with parallel.blas_context(cfg.workers):
                if pool is not None:
                    pool.forward_backward(x, y, shards=cfg.shards)
                else:
                    parallel.forward_backward(model, x, y, cfg.workers, shards=cfg.shards)
                clip_grad_norm(model.parameters(), cfg.grad_clip)
                parallel.step_in_threads(opt, cfg.workers)
            opt.zero_grad()
        private = sampler.stop()
        workers_kb = {p: max(private[p], _status_kb(p, "VmHWM") - start[p]) for p in pids}
        worker_end_kb = {p: _private_kb(p) for p in pids}
    finally:
        sampler.stop()
        if pool is not None:
            pool.close()
    parent = 1024 * (_status_kb("self", "VmHWM") - base)
    return {"measured": parent + 1024 * sum(workers_kb.values()), "estimate": est.train_bytes,
            "parent": parent, "workers": [1024 * v for v in workers_kb.values()],
            "workers_after": [1024 * v for v in worker_end_kb.values()], "parts": est.parts}


def run_measure(settings: dict, mode: str = "train", steps: int = 3, timeout: float = 120) -> dict:
    """measure() in a fresh interpreter; returns its result."""
    here = os.path.abspath(__file__)
    root = os.path.dirname(os.path.dirname(here))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NPFORMER_DEVICE", None)
    out = subprocess.run([sys.executable, here, "--measure", json.dumps(settings), "--mode", mode,
                          "--steps", str(steps)], capture_output=True, text=True, timeout=timeout, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {settings} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", help="JSON settings: measure one config in this process, print JSON")
    ap.add_argument("--mode", choices=("train", "eval"), default="train")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure), args.mode, args.steps)))
        return
    from npformer.training.memory import format_bytes
    print(f"{'config':<16} {'mode':<5} {'measured':>10} {'estimate':>10} {'est/meas':>8}  largest parts")
    for name, mode, settings in ROWS:
        r = run_measure(settings, mode, args.steps)
        parts = sorted(((k, v) for k, v in r["parts"].items() if (k == "evaluation piece") == (mode == "eval")),
                       key=lambda kv: -kv[1])[:3]
        print(f"{name:<16} {mode:<5} {format_bytes(r['measured']):>10} {format_bytes(r['estimate']):>10} "
              f"{r['estimate'] / r['measured']:>8.2f}  " + ", ".join(f"{k} {format_bytes(v)}" for k, v in parts))


if __name__ == "__main__":
    main()
