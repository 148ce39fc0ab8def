"""CPU training step of a BERT masked LM: npformer vs PyTorch eager (transformers) on the same weights and batch.

    python benchmarks/bert_step.py                       # BERT-base shape, table on stdout
    python benchmarks/bert_step.py --config small --rounds 3

The model is npformer.models.BertForMaskedLM in float32 with random weights (HF's initialisation,
seeded), dropout 0; its transformers twin (BertForMaskedLM) is made by npformer.interop.to_torch,
so both start from identical parameters. The batch is one seeded MLM batch: input_ids (B, T), 15%
of the positions labelled with their token, the rest ignored (-100 for transformers).

One step = forward with the MLM loss, backward, clip_grad_norm(1.0), AdamW step (lr 1e-4, betas
(0.9, 0.999), weight decay 0.01 on the matrices, none on biases and LayerNorm), zero_grad: the
step of benchmarks/train_step.py, whose helpers (timing blocks with pauses, peak memory as the
growth of the proportional set size) this script reuses. npformer runs its data-parallel step
(torch_twins.npformer_step: `--threads` worker processes on Linux, each with a one-thread BLAS);
PyTorch runs with torch.set_num_threads(--threads). "hf-eager" is transformers with
attn_implementation="eager" (the same arithmetic as npformer's attention), "hf-sdpa" the same
model with transformers' default, F.scaled_dot_product_attention.

Before timing, the script checks that the step-0 losses agree (float32: relative difference
below 1e-5) and prints them. The frameworks then run interleaved, `--steps` steps of each per
round, and the table gives the median ms/step and the ratio npformer/this.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import interleaved  # noqa: E402

CONFIGS = {
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                  vocab_size=30522, seq=128, batch_size=8),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522, seq=128, batch_size=8),
}
FRAMEWORKS = ("npformer", "hf-eager", "hf-sdpa")
LR, BETAS, WD = 1e-4, (0.9, 0.999), 0.01
MASK_FRACTION = 0.15


def mlm_batch(vocab_size, batch, seq, seed=1):
    """(input_ids, labels): random ids in [1, vocab_size); labels = the id at 15% of the positions, -1 elsewhere."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, (batch, seq))
    labels = np.where(rng.random((batch, seq)) < MASK_FRACTION, ids, -1)
    return ids, labels


def _adapter(model):
    """`model` behind the interface of npformer's data-parallel step: forward(x, y) -> (logits, loss),
    with y's ignored targets -1 (parallel.forward_backward's default ignore_index) passed on as -100."""
    from npformer import nn

    class MaskedLMStep(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            loss, logits = self.inner(x, labels=np.where(y == -1, -100, y))
            return logits, loss
    return MaskedLMStep(model)


def build(name, threads, only=None, shards=None):
    """{framework: step closure} for config `name`; also sets .losses on the dict (the step-0 losses)."""
    import torch
    from npformer.interop import to_torch
    from npformer.models import BertConfig, BertForMaskedLM
    from npformer.optim import AdamW, weight_decay_groups
    from torch_twins import npformer_step

    torch.set_num_threads(threads)
    c = dict(CONFIGS[name])
    B, T = c.pop("batch_size"), c.pop("seq")
    cfg = BertConfig(**c, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(cfg, generator=np.random.default_rng(0), dtype=np.float32, device="cpu")
    ids, labels = mlm_batch(cfg.vocab_size, B, T)
    wanted = FRAMEWORKS if only is None else (only,)
    steps, losses = {}, {}
    twins = {k: to_torch(model) for k in wanted if k.startswith("hf")}    # before any step: the same weights
    if "hf-sdpa" in twins:
        twins["hf-sdpa"].set_attn_implementation("sdpa")
    if "npformer" in wanted:
        losses["npformer"] = model(ids, labels=np.where(labels == -1, -100, labels)).loss.item()
        model.zero_grad()
        opt = AdamW(weight_decay_groups(model.named_parameters(), WD), lr=LR, betas=BETAS)
        steps["npformer"] = npformer_step(_adapter(model), ids, labels, opt, threads, shards)
    xt, yt = torch.from_numpy(ids), torch.from_numpy(np.where(labels == -1, -100, labels))
    for k, tm in twins.items():
        with torch.no_grad():
            losses[k] = tm(xt, labels=yt).loss.item()
        steps[k] = torch_step(tm, xt, yt)
    steps = {k: steps[k] for k in wanted}
    build.losses = losses
    return steps


def torch_step(tm, xt, yt):
    """One transformers training step (forward with labels, backward, clip 1.0, AdamW, zero_grad), as a closure."""
    import torch
    decay = [p for p in tm.parameters() if p.dim() >= 2]
    rest = [p for p in tm.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS)

    def step():
        tm(xt, labels=yt).loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peak_memory_mb(name, framework, threads, shards=None):
    """measure_peak in a fresh interpreter that builds only `framework`'s model."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
            f"import bert_step as b, train_step as t;"
            f"s = b.build({name!r}, {threads}, only={framework!r}, shards={shards!r})[{framework!r}];"
            f"print(t.measure_peak(s))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def check_losses(losses, tol=1e-5):
    ref = losses["npformer"]
    worst = max((abs(v - ref) / abs(ref) for k, v in losses.items() if k != "npformer"), default=0.0)
    print("step-0 loss: " + ", ".join(f"{k} {v:.7f}" for k, v in losses.items())
          + f"; max relative difference {worst:.1e}")
    if worst > tol:
        raise SystemExit(f"the step-0 losses differ by {worst:.1e} > {tol:.0e}: the comparison is not meaningful")
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="base")
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
    print(f"threads {args.threads}; numpy {np.__version__}; {args.rounds} rounds x {args.steps} steps, interleaved")
    load0 = os.getloadavg()[0]           # other processes on the machine skew both frameworks' times
    steps = build(name, args.threads, shards=args.shards)
    worst = check_losses(build.losses)
    if args.no_sdpa:
        steps.pop("hf-sdpa")
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    times = interleaved(steps, args.rounds, args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("load average (1 min) before / after timing: %.1f / %.1f" % (load0, os.getloadavg()[0]))
    mem = {} if args.no_memory else {k: peak_memory_mb(name, k, args.threads, args.shards) for k in steps}
    print(f"\n{name}: {CONFIGS[name]}")
    print(f"{'framework':<10} {'ms/step':>9} {'npformer/this':>14} {'peak MB':>9}  per-round ms/step")
    results = []
    for k in steps:
        pm = f"{mem[k]:9.1f}" if mem else f"{'-':>9}"
        print(f"{k:<10} {med[k]:9.1f} {med['npformer'] / med[k]:14.3f} {pm}  "
              + " ".join(f"{t:.0f}" for t in times[k]))
        results.append(dict(config=name, framework=k, ms_per_step=round(med[k], 1), rounds_ms=times[k],
                            ratio_npformer_over=round(med["npformer"] / med[k], 3),
                            peak_mb=round(mem[k], 1) if mem else None, step0_loss=build.losses[k],
                            max_rel_loss_diff=worst))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
