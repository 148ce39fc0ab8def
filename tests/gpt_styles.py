"""Small torch GPTs written the way nanoGPT and minGPT write theirs (this file's own code), for the
interop tests: npformer recognises them by structure and parameter names, not by class.

nanoGPT style: nn.Linear everywhere, exact nn.GELU(), a LayerNorm module with an optional bias and a
fixed eps of 1e-5 (no eps attribute), n_head and a float dropout on the attention module, a causal
mask buffer when not "flash", lm_head tied to wte (optionally untied here), bias=False removes every
bias. minGPT style: nn.LayerNorm, the MLP as a ModuleDict (c_fc, c_proj, act, dropout) with a
hand-written tanh GELU, a causal mask buffer, lm_head not tied. Both return (logits, loss), the loss
a cross-entropy with -1 ignored.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Config:
    vocab_size: int = 13
    block_size: int = 8
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 8
    dropout: float = 0.0
    bias: bool = True
    tie: bool = True
    flash: bool = True


class BiasOptionalLayerNorm(nn.Module):
    """nanoGPT's LayerNorm: torch's has had bias=False only since 2.1; eps is fixed at 1e-5."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(c.dropout), nn.Dropout(c.dropout)
        self.n_head, self.n_embd, self.dropout, self.flash = c.n_head, c.n_embd, c.dropout, c.flash
        if not c.flash:
            self.register_buffer("bias", torch.tril(torch.ones(c.block_size, c.block_size))
                                 .view(1, 1, c.block_size, c.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class NanoMLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.ln_1 = BiasOptionalLayerNorm(c.n_embd, c.bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = BiasOptionalLayerNorm(c.n_embd, c.bias)
        self.mlp = NanoMLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NewGELU(nn.Module):
    """The tanh approximation of GELU, written out as minGPT writes it."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class MinBlock(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.attn = CausalSelfAttention(Config(**{**c.__dict__, "flash": False}))
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(c.n_embd, 4 * c.n_embd), c_proj=nn.Linear(4 * c.n_embd, c.n_embd),
                                      act=NewGELU(), dropout=nn.Dropout(c.dropout)))

    def forward(self, x):
        m = self.mlp                                   # minGPT keeps this in a lambda (self.mlpf)
        x = x + self.attn(self.ln_1(x))
        return x + m.dropout(m.c_proj(m.act(m.c_fc(self.ln_2(x)))))


class StyleGPT(nn.Module):
    """The GPT of either style: style "nano" or "min"."""

    def __init__(self, c: Config, style: str = "nano"):
        super().__init__()
        self.config = c
        nano = style == "nano"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList([(NanoBlock if nano else MinBlock)(c) for _ in range(c.n_layer)]),
            ln_f=BiasOptionalLayerNorm(c.n_embd, c.bias) if nano else nn.LayerNorm(c.n_embd)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie:
            self.transformer.wte.weight = self.lm_head.weight      # nanoGPT ties this way round

    def forward(self, idx, targets=None):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def make(style: str, seed: int, dtype=torch.float64, **overrides) -> StyleGPT:
    """A random model of the style; every parameter moved off its init (unit norms, zero biases)."""
    c = Config(**{**(dict(tie=False) if style == "min" else {}), **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StyleGPT(c, style).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.2)
    return model
