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

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hf_step  # noqa: E402

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


check_losses = hf_step.check_losses


def peak_memory_mb(name, framework, threads, shards=None):
    """hf_step.peak_memory_mb for this benchmark's models."""
    return hf_step.peak_memory_mb("bert_step", name, framework, threads, shards)


def main():
    hf_step.main(sys.modules[__name__], "base", versions="")


if __name__ == "__main__":
    main()
