"""What bert_step.py and llama_step.py share: the loss check, the fresh-process memory probe, and the
command line that times npformer against transformers' twins, interleaved, and prints the table.

A benchmark module supplies CONFIGS (name -> sizes) and build(name, threads, only=None, shards=None)
-> {framework: one training step}, with build.losses[framework] the step-0 loss; "npformer" first.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

from train_step import interleaved


def check_losses(losses, tol=1e-5):
    """The largest relative difference of the step-0 losses from npformer's; exits when over tol (or nan)."""
    ref = losses["npformer"]
    worst = max((abs(v - ref) / abs(ref) for k, v in losses.items() if k != "npformer"), default=0.0)
    print("step-0 loss: " + ", ".join(f"{k} {v:.7f}" for k, v in losses.items())
          + f"; max relative difference {worst:.1e}")
    if not worst <= tol:                                             # a nan loss fails too
        raise SystemExit(f"the step-0 losses differ by {worst:.1e} > {tol:.0e}: the comparison is not meaningful")
    return worst


def peak_memory_mb(module, name, framework, threads, shards=None):
    """train_step.measure_peak in a fresh interpreter in which `module` builds only `framework`'s model."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
            f"import {module} as b, train_step as t;"
            f"s = b.build({name!r}, {threads}, only={framework!r}, shards={shards!r})[{framework!r}];"
            f"print(t.measure_peak(s))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(bench, default_config, versions=""):
    """Parse the command line, time `bench` (a benchmark module), print the table (and --json)."""
    ap = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(bench.CONFIGS), default=default_config)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=2, help="steps per framework per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per framework first")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--shards", type=int, default=None, help="npformer's batch shards (default: its own choice)")
    ap.add_argument("--no-sdpa", action="store_true", help="leave out hf-sdpa")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    name = args.config
    print(f"threads {args.threads}; numpy {np.__version__}; {versions}"
          f"{args.rounds} rounds x {args.steps} steps, interleaved")
    load0 = os.getloadavg()[0]           # other processes on the machine skew both frameworks' times
    steps = bench.build(name, args.threads, shards=args.shards)
    worst = check_losses(bench.build.losses)
    if args.no_sdpa:
        steps.pop("hf-sdpa")
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    times = interleaved(steps, args.rounds, args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("load average (1 min) before / after timing: %.1f / %.1f" % (load0, os.getloadavg()[0]))
    mem = {} if args.no_memory else {k: bench.peak_memory_mb(name, k, args.threads, args.shards) for k in steps}
    print(f"\n{name}: {bench.CONFIGS[name]}")
    print(f"{'framework':<10} {'ms/step':>9} {'npformer/this':>14} {'peak MB':>9}  per-round ms/step")
    results = []
    for k in steps:
        pm = f"{mem[k]:9.1f}" if mem else f"{'-':>9}"
        print(f"{k:<10} {med[k]:9.1f} {med['npformer'] / med[k]:14.3f} {pm}  "
              + " ".join(f"{t:.0f}" for t in times[k]))
        results.append(dict(config=name, framework=k, ms_per_step=round(med[k], 1), rounds_ms=times[k],
                            ratio_npformer_over=round(med["npformer"] / med[k], 3),
                            peak_mb=round(mem[k], 1) if mem else None, step0_loss=bench.build.losses[k],
                            max_rel_loss_diff=worst))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
