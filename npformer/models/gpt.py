"""GPT: a decoder-only Transformer language model (GPT-2 architecture, nanoGPT layout).

Shapes: B batch, T sequence length, C = n_embd, nh = n_head, hs = C // nh, V = vocab_size.
Parameter names follow HF's GPT2LMHeadModel (``transformer.h.0.attn.c_attn.weight``), with
weights stored as (out_features, in_features) like ``torch.nn.Linear``; npformer.interop
transposes GPT-2's Conv1D weights on import/export.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .. import backend, ops, random
from .. import nn
from ..dtypes import default_dtype, resolve
from ..nn import functional as F
from ..tensor import Tensor
from .config import require_divisible, require_dropout, require_positive_ints


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT. Frozen: build a new one with dataclasses.replace."""
    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    gelu_approximate: str = "tanh"   # GPT-2's "gelu_new"; "none" for the exact erf form
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True      # lm_head.weight is transformer.wte.weight; False: lm_head has its own

    def __post_init__(self):
        require_positive_ints(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
        require_divisible(self, "n_embd", "n_head")
        require_dropout(self)
        if not isinstance(self.tie_embeddings, (bool, np.bool_)):
            raise ValueError(f"GPTConfig.tie_embeddings must be True or False; got {self.tie_embeddings!r}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"GPTConfig.gelu_approximate must be 'none' or 'tanh'; got {self.gelu_approximate!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for incremental decoding.

    k[i], v[i]: (B, nh, T_past, hs) arrays of layer i; ``length`` = T_past. They are views of
    buffers that grow by doubling, so appending a token copies only that token's keys and
    values (amortised), not the whole cache. An array assigned to k[i] / v[i] by the caller
    (reordered beams, say) is taken as the new contents at the next append.
    """

    def __init__(self, n_layer: int):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self._buffers = [None] * n_layer      # (k buffer, v buffer, the views handed out as k[i], v[i])

    @property
    def length(self) -> int:
        """Positions cached so far (in the last layer, which is appended to last)."""
        return 0 if self.k[-1] is None else self.k[-1].shape[2]

    def append(self, layer: int, k, v):
        """Add this step's (B, nh, T_new, hs) keys/values to layer `layer`; return the full arrays."""
        old_k, old_v, buf = self.k[layer], self.v[layer], self._buffers[layer]
        if old_k is None:
            self.k[layer], self.v[layer] = k, v
            self._buffers[layer] = None
            return k, v
        for name, old, new in (("keys", old_k, k), ("values", old_v, v)):
            if old.shape[:2] != new.shape[:2] or old.shape[3:] != new.shape[3:]:
                raise ValueError(f"KVCache.append: layer {layer} holds {name} of shape {tuple(old.shape)}; "
                                 f"cannot append {tuple(new.shape)} (batch, heads and head size must match)")
        n, need = old_k.shape[2], old_k.shape[2] + k.shape[2]
        xp = backend.get_array_module(k)
        dtype_k, dtype_v = xp.result_type(old_k, k), xp.result_type(old_v, v)
        if buf is None or buf[2] is not old_k or buf[3] is not old_v or buf[0].shape[2] < need \
                or buf[0].dtype != dtype_k or buf[1].dtype != dtype_v:
            size = max(need, 2 * n, 16)
            kb = xp.empty(k.shape[:2] + (size,) + k.shape[3:], dtype=dtype_k)
            vb = xp.empty(v.shape[:2] + (size,) + v.shape[3:], dtype=dtype_v)
            kb[:, :, :n], vb[:, :, :n] = old_k, old_v
            buf = [kb, vb, None, None]
        buf[0][:, :, n:need], buf[1][:, :, n:need] = k, v
        buf[2], buf[3] = buf[0][:, :, :need], buf[1][:, :, :need]
        self._buffers[layer] = buf
        self.k[layer], self.v[layer] = buf[2], buf[3]
        return buf[2], buf[3]


def causal_after(T: int, past: int, xp):
    """(T, past + T) bool, True = attend: the query at absolute position past + i sees keys 0 .. past + i."""
    return xp.arange(past + T)[None, :] <= (past + xp.arange(T))[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention with one fused q/k/v projection (c_attn)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x: Tensor, cache: KVCache = None, layer: int = 0, mask=None) -> Tensor:
        """x: (B, T, C) -> (B, T, C). mask: None (causal), or (B, 1, T, past + T) bool, True = attend."""
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        qkv = self.c_attn(x)                                               # (B, T, 3C)
        p = self.dropout if self.training else 0.0
        if cache is None and mask is None and ops.current() == "fast":
            # fast (npformer.ops.use("fast")): the split, heads, attention and merge below as one
            # op that reads the heads in place from qkv (docs/derivations.md#packed-self-attention)
            y = ops.self_attention(qkv, nh, causal=True, dropout_p=p)     # (B, T, C)
        else:
            # reference: split q, k, v, give each head its own axis, attend, merge the heads
            q, k, v = ops.split(qkv, C, axis=2)                            # 3 x (B, T, C)
            q = q.reshape(B, T, nh, hs).transpose(1, 2)                    # (B, nh, T, hs)
            k = k.reshape(B, T, nh, hs).transpose(1, 2)                    # (B, nh, T, hs)
            v = v.reshape(B, T, nh, hs).transpose(1, 2)                    # (B, nh, T, hs)
            if cache is not None:
                k_all, v_all = cache.append(layer, k.data, v.data)        # (B, nh, past + T, hs)
                k, v = Tensor(k_all), Tensor(v_all)
            if cache is None and mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)   # (B, nh, T, hs)
            else:
                if mask is None:
                    mask = causal_after(T, k.shape[2] - T, x.xp)                # (T, past + T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            y = y.transpose(1, 2).reshape(B, T, C)                         # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(C, 4C) -> GELU -> Linear(4C, C) -> dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = config.gelu_approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache = None, layer: int = 0, mask=None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class _Trunk(nn.Module):
    """The `transformer` submodule: embeddings, blocks and the final LayerNorm (HF's GPT2Model)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


class GPT(nn.Module):
    """Decoder-only language model; lm_head is tied to the token embedding (config.tie_embeddings).

    forward(idx (B, T) int, targets (B, T) int or None) -> (logits (B, T, V), loss or None).
    """

    def __init__(self, config: GPTConfig, generator=None, dtype=None, device: str = None):
        """generator: a numpy.random.Generator for the initial weights (seed 0 when None);
        weights are drawn on the host, then moved to `device` (NPFORMER_DEVICE when None)."""
        super().__init__()
        self.config = config
        # the layers' own default initialisation is overwritten by _init_weights: let it draw from
        # a throwaway generator rather than the process's global one
        with random.thread_default_generator(np.random.default_rng(0), "cpu"), default_dtype(resolve(dtype)):
            self.transformer = _Trunk(config)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight    # weight tying
        self._init_weights(generator)
        self.to(device=device or backend.default_device())

    def _init_weights(self, generator):
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm weights, and
        N(0, 0.02 / sqrt(2 n_layer)) for the projections into the residual stream."""
        rng = generator if generator is not None else np.random.default_rng(0)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                p.data[...] = rng.standard_normal(p.shape) * resid_std
            elif name.endswith("weight") and p.ndim == 2:
                p.data[...] = rng.standard_normal(p.shape) * 0.02
            elif name.endswith("bias"):
                p.data[...] = 0.0
            else:  # LayerNorm weights
                p.data[...] = 1.0

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embeddings (as nanoGPT reports)."""
        n = super().num_parameters()
        return n - self.transformer.wpe.weight.size if non_embedding else n

    def forward(self, idx, targets=None, cache: KVCache = None, attention_mask=None, position_ids=None):
        """idx: (B, T) token ids; targets: (B, T) ids aligned with the logits (-1 ignored).

        attention_mask, position_ids: for left-padded batches, as HF's GPT-2 takes them (see
        hidden_states). Returns (logits (B, T, V), mean cross-entropy over the targets or None).
        """
        x = self.hidden_states(idx, cache, attention_mask, position_ids)      # (B, T, C)
        B, T = x.shape[:2]
        logits = self.lm_head(x)                                              # (B, T, V)
        loss = None
        if targets is not None:
            t = targets.data if isinstance(targets, Tensor) else targets
            loss = F.cross_entropy(logits.reshape(B * T, -1), t.reshape(B * T), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, cache: KVCache = None, attention_mask=None, position_ids=None) -> Tensor:
        """The trunk's output ln_f(blocks(wte(idx) + wpe(pos))): (B, T) int -> (B, T, C); no lm_head.

        attention_mask: (B, past + T), HF's convention: 1 (or True) = a real token, 0 = padding.
            Padding keys are masked out of every query, on top of the causal mask. A query with no
            key left (a pad position of a left-padded row) attends to nothing: its attention output
            is zero, so its hidden state is finite but differs from HF's (which spreads such a row
            evenly over all keys); the real positions agree. None: causal only (the fused path).
        position_ids: (B, T) or (1, T) ints in [0, block_size), the positions fed to wpe
            (default past .. past + T - 1); left padding passes HF's cumsum(attention_mask) - 1.
        """
        idx = idx.data if isinstance(idx, Tensor) else idx
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        wte = self.transformer.wte.weight
        if position_ids is None and past + T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {past + T} exceeds block_size {self.config.block_size}")
        xp = backend.get_array_module(wte.data)
        if backend.device_of(idx) != backend.device_of(wte.data):
            raise backend.DeviceMismatchError(
                f"GPT: idx is on {backend.device_of(idx)} but the model is on {backend.device_of(wte.data)}")
        pos = xp.arange(past, past + T) if position_ids is None else self._positions(position_ids, B, T)
        tok_emb = self.transformer.wte(idx)                                   # (B, T, C)
        pos_emb = self.transformer.wpe(pos)                                   # (T, C) or (B | 1, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)                          # (B, T, C)
        mask = None if attention_mask is None else self._mask(attention_mask, B, T, past)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, mask)
        return self.transformer.ln_f(x)                                       # (B, T, C)

    def _positions(self, position_ids, B: int, T: int):
        """position_ids as an int array (B | 1, T) on the model's device, range-checked."""
        pos = F.mask_array(position_ids, self.transformer.wte.weight)
        if pos.dtype.kind not in "iu" or pos.ndim != 2 or pos.shape[1] != T or pos.shape[0] not in (1, B):
            raise ValueError(f"GPT: position_ids must be integers of shape (B, T) = {(B, T)} or (1, T); got "
                             f"{pos.dtype} {tuple(pos.shape)}")
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= self.config.block_size):
            raise ValueError(f"GPT: position_ids must lie in [0, block_size) = [0, {self.config.block_size}); "
                             f"got values from {int(pos.min())} to {int(pos.max())}")
        return pos

    def _mask(self, attention_mask, B: int, T: int, past: int):
        """(B, 1, T, past + T) bool, True = attend: causal, and only keys where attention_mask is 1."""
        am = F.mask_array(attention_mask, self.transformer.wte.weight)
        S = past + T
        if (am.dtype != np.bool_ and am.dtype.kind not in "iuf") or tuple(am.shape) != (B, S):
            raise ValueError(f"GPT: attention_mask must be 1/0 (or bool) of shape (B, past + T) = {(B, S)}; "
                             f"got {am.dtype} {tuple(am.shape)}")
        xp = backend.get_array_module(am)
        return causal_after(T, past, xp)[None, None] & (am != 0)[:, None, None, :]   # (B, 1, T, S)
