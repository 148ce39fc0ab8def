"""npformer's GPT written in PyTorch, in the nanoGPT layout: what ``to_torch`` gives for a GPT that
GPT-2's HF class cannot hold (no biases), or one that ``from_torch`` made from a nanoGPT/minGPT model.

    model = TorchGPT(config)            # config: an npformer GPTConfig; fresh weights
    logits, loss = model(idx, targets)  # idx, targets: (B, T) int64; targets -1 ignored

It computes exactly what npformer.models.GPT computes, with the same parameter names and layouts
(``transformer.h.0.attn.c_attn.weight`` is an nn.Linear weight, (out, in), not transposed):

    x = drop(wte(idx) + wpe(pos))
    x = x + attn(ln_1(x)),  x = x + mlp(ln_2(x))       for each block (pre-LN)
    logits = lm_head(ln_f(x))                            lm_head.weight is wte.weight when tied

bias=False removes every bias (the LayerNorms' too); tie_embeddings=False gives lm_head its own
weight. Attention is torch's scaled_dot_product_attention with is_causal=True.

This module imports torch at the top: only npformer.interop's functions import it, when called.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention: one fused q/k/v projection (c_attn), then c_proj."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                            # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)     # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)     # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)   # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                              # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Linear(C, 4C) -> GELU -> Linear(4C, C) -> dropout."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, eps = config.n_embd, config.layer_norm_eps
        self.ln_1 = nn.LayerNorm(C, eps=eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(C, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """npformer.models.GPT in torch (nanoGPT layout); forward(idx, targets=None) -> (logits, loss)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),
            wpe=nn.Embedding(config.block_size, C),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(C, eps=config.layer_norm_eps, bias=config.bias)))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"TorchGPT: sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)                            # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))   # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))                      # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss
