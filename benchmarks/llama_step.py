"""CPU training step of a LLaMA: npformer vs PyTorch eager (transformers and a minimal torch twin) on the
same weights and batch.

    python benchmarks/llama_step.py                      # the large config, table on stdout
    python benchmarks/llama_step.py --config small --rounds 5

The model is npformer.models.LlamaForCausalLM in float32 with random weights (HF's initialisation,
seeded; RMSNorm, RoPE, grouped-query attention, SwiGLU, untied lm_head). Its twins start from
identical parameters: "hf-eager" and "hf-sdpa" are transformers' LlamaForCausalLM made by
npformer.interop.to_torch, with attn_implementation "eager" (explicit matmul-softmax, as npformer's
attention) and "sdpa" (F.scaled_dot_product_attention, transformers' default); "torch" is TorchLlama
below, a minimal plain-torch LLaMA without HF's machinery (torch.nn.RMSNorm, RoPE tables computed
once, F.scaled_dot_product_attention with enable_gqa) in HF's parameter layout, so the same state
dict loads. The batch is one seeded next-token batch: input_ids (B, T) random in [0, vocab_size),
every position but the last predicting the next token.

One step = forward with the mean next-token cross-entropy, backward, clip_grad_norm(1.0), AdamW
step (LLaMA's: lr 3e-4, betas (0.9, 0.95), weight decay 0.1 on the matrices, none on the RMSNorm
weights), zero_grad: the step of benchmarks/bert_step.py, whose timing loop and peak-memory
helpers (benchmarks/train_step.py's) this script reuses. npformer runs its data-parallel step
(torch_twins.npformer_step: `--threads` worker processes on Linux, each with a one-thread BLAS);
PyTorch runs with torch.set_num_threads(--threads).

Before timing, the script checks that the step-0 losses agree (float32: relative difference below
1e-5, about 1e-4 absolute at these losses) and prints them; it refuses to time when they do not.
The frameworks then run interleaved, `--steps` steps of each per round, and the table gives the
median ms/step and the ratio npformer/this.
"""

import os
import sys

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hf_step  # noqa: E402

CONFIGS = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=172, vocab_size=128, seq=32, batch_size=4),          # the smoke test's
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=688, vocab_size=512, seq=128, batch_size=8),
    "large": dict(num_hidden_layers=8, hidden_size=768, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=8000, seq=256, batch_size=4),
}
FRAMEWORKS = ("npformer", "hf-eager", "hf-sdpa", "torch")
LR, BETAS, WD = 3e-4, (0.9, 0.95), 0.1          # LLaMA's AdamW (Touvron et al., 2023)


# ----------------------------------------------------------------------------- the torch twin

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class _Attention(tnn.Module):
    """Causal grouped-query attention with RoPE on q and k; HF's q/k/v/o_proj names and (out, in) layouts."""

    def __init__(self, C, H, Hkv, D):
        super().__init__()
        self.H, self.Hkv, self.D = H, Hkv, D
        self.q_proj, self.k_proj = tnn.Linear(C, H * D, bias=False), tnn.Linear(C, Hkv * D, bias=False)
        self.v_proj, self.o_proj = tnn.Linear(C, Hkv * D, bias=False), tnn.Linear(H * D, C, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D).transpose(1, 2)        # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)      # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)      # (B, Hkv, T, D)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)     # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class _MLP(tnn.Module):
    def __init__(self, C, I):
        super().__init__()
        self.gate_proj, self.up_proj = tnn.Linear(C, I, bias=False), tnn.Linear(C, I, bias=False)
        self.down_proj = tnn.Linear(I, C, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(tnn.Module):
    def __init__(self, c):
        super().__init__()
        C = c.hidden_size
        self.self_attn = _Attention(C, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.mlp = _MLP(C, c.intermediate_size)
        self.input_layernorm = tnn.RMSNorm(C, eps=c.rms_norm_eps)
        self.post_attention_layernorm = tnn.RMSNorm(C, eps=c.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Decoder(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = tnn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = tnn.ModuleList([_Layer(c) for _ in range(c.num_hidden_layers)])
        self.norm = tnn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)


class TorchLlama(tnn.Module):
    """LLaMA in plain torch (untied lm_head, no biases); forward(idx, targets) -> (logits, loss) with
    targets (B, T) aligned with the logits (targets[:, t] = idx[:, t + 1]; -1: nothing to predict)."""

    def __init__(self, c):
        super().__init__()
        self.model = _Decoder(c)
        self.lm_head = tnn.Linear(c.hidden_size, c.vocab_size, bias=False)
        D = c.head_dim
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)           # (D/2,)
        angles = torch.outer(torch.arange(c.max_position_embeddings, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)                                                  # (T_max, D)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, idx, targets):
        T = idx.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]                                    # (T, D), broadcast over B, H
        x = self.model.embed_tokens(idx)                                         # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))                                # (B, T, V)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def torch_twin(model):
    """A float32 TorchLlama holding exactly the weights of the npformer LlamaForCausalLM `model`."""
    from npformer import backend
    twin = TorchLlama(model.config)
    twin.load_state_dict({k: torch.from_numpy(backend.to_numpy(v).copy()) for k, v in model.state_dict().items()},
                         strict=True)
    return twin.float().train()


# ----------------------------------------------------------------------------- the steps

def next_token_batch(vocab_size, batch, seq, seed=1):
    """(input_ids, targets), both (B, T): random ids in [0, vocab_size); targets[:, t] = input_ids[:, t + 1],
    -1 in the last column (nothing to predict there)."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq))
    return ids, np.concatenate([ids[:, 1:], np.full((batch, 1), -1, dtype=ids.dtype)], axis=1)


def _adapter(model):
    """`model` behind the interface of npformer's data-parallel step: forward(x, y) -> (logits, loss), y the
    targets aligned with the logits (-1 ignored, parallel.forward_backward's default), so that each shard
    is weighted by the targets it really counts. HF's labels are aligned with the input and shifted
    inside the model, so y goes in shifted back: labels[:, 0] = -100 (never predicted), labels[:, 1:] = y[:, :-1]."""
    from npformer import nn

    class CausalLMStep(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            labels = np.concatenate([np.full((len(y), 1), -100, dtype=y.dtype), y[:, :-1]], axis=1)
            out = self.inner(x, labels=np.where(labels == -1, -100, labels))
            return out.logits, out.loss
    return CausalLMStep(model)


def build(name, threads, only=None, shards=None):
    """{framework: step closure} for config `name`; also sets on the function .losses (the step-0
    losses) and .loss_now ({framework: () -> its loss on the batch now, without a graph})."""
    import npformer
    from npformer.interop import to_torch
    from npformer.models import LlamaConfig, LlamaForCausalLM
    from npformer.optim import AdamW, weight_decay_groups
    from torch_twins import npformer_step

    torch.set_num_threads(threads)
    c = dict(CONFIGS[name])
    B, T = c.pop("batch_size"), c.pop("seq")
    cfg = LlamaConfig(**c, max_position_embeddings=T)
    model = LlamaForCausalLM(cfg, generator=np.random.default_rng(0), dtype=np.float32, device="cpu")
    ids, targets = next_token_batch(cfg.vocab_size, B, T)
    xt, yt = torch.from_numpy(ids), torch.from_numpy(targets)
    wanted = FRAMEWORKS if only is None else (only,)
    twins = {}                                                   # before any step: the same weights
    for k in wanted:
        if k.startswith("hf-"):
            twins[k] = to_torch(model)
            twins[k].set_attn_implementation(k[len("hf-"):])
        elif k == "torch":
            twins[k] = torch_twin(model)

    def npformer_loss():
        with npformer.no_grad():
            return model(ids, labels=ids).loss.item()

    def torch_loss(k):
        with torch.no_grad():
            return (twins[k](xt, yt)[1] if k == "torch" else twins[k](xt, labels=xt).loss).item()

    loss_now = {k: npformer_loss if k == "npformer" else (lambda k=k: torch_loss(k)) for k in wanted}
    build.losses = {k: f() for k, f in loss_now.items()}      # before npformer's workers fork
    build.loss_now = loss_now
    steps = {}
    if "npformer" in wanted:
        opt = AdamW(weight_decay_groups(model.named_parameters(), WD), lr=LR, betas=BETAS)
        steps["npformer"] = npformer_step(_adapter(model), ids, targets, opt, threads, shards)
    for k, tm in twins.items():
        loss_fn = (lambda tm=tm: tm(xt, yt)[1]) if k == "torch" else (lambda tm=tm: tm(xt, labels=xt).loss)
        steps[k] = torch_step(tm, loss_fn)
    return {k: steps[k] for k in wanted}


def torch_step(tm, loss_fn):
    """One PyTorch training step (loss_fn() = forward and loss, backward, clip 1.0, AdamW, zero_grad), as a closure."""
    decay = [p for p in tm.parameters() if p.dim() >= 2]
    rest = [p for p in tm.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS)

    def step():
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


check_losses = hf_step.check_losses


def peak_memory_mb(name, framework, threads, shards=None):
    """hf_step.peak_memory_mb for this benchmark's models."""
    return hf_step.peak_memory_mb("llama_step", name, framework, threads, shards)


def main():
    hf_step.main(sys.modules[__name__], "large", versions=f"torch {torch.__version__}; ")


if __name__ == "__main__":
    main()
