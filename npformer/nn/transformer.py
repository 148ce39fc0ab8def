"""The Transformer of "Attention Is All You Need", with torch.nn.Transformer's modules, arguments,
parameter names and numerics.

Encoder layer (post-LN, the paper's; norm_first=True gives pre-LN):
    post-LN:  x = norm1(x + SA(x));            x = norm2(x + FF(x))
    pre-LN:   x = x + SA(norm1(x));            x = x + FF(norm2(x))
Decoder layer adds cross-attention CA to the encoder output ("memory") between the two:
    post-LN:  x = norm1(x + SA(x)); x = norm2(x + CA(x, memory)); x = norm3(x + FF(x))
with FF(x) = linear2(dropout(activation(linear1(x)))) and dropout1/2/3 on each block's output.

Masks follow nn.MultiheadAttention: boolean True = masked OUT, float masks are added.
Unlike torch, ``batch_first=True`` is the default everywhere (inputs (B, T, d_model)).
"""

from __future__ import annotations

import copy

import numpy as np

from .. import backend
from ..dtypes import resolve
from ..tensor import Tensor
from . import functional as F
from . import init
from .attention import MultiHeadAttention
from .layers import Dropout, LayerNorm, Linear, ModuleList
from .module import Module


def _get_activation(activation):
    """"relu" -> F.relu, "gelu" -> F.gelu (exact), a callable (function or Module) as is."""
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    if callable(activation):
        return activation
    raise ValueError(f"activation must be 'relu', 'gelu' or a callable; got {activation!r}")


def _attend(where, attn, names, q, kv, mask, padding, is_causal):
    """attn(q, kv, kv)[0], with a bad mask reported under the caller's argument names."""
    try:
        return attn(q, kv, kv, key_padding_mask=padding, need_weights=False, attn_mask=mask, is_causal=is_causal)[0]
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for inner, outer in zip(("attn_mask", "key_padding_mask"), names):
            prefix = f"{type(attn).__name__}: {inner} "
            if msg.startswith(prefix):
                raise type(exc)(f"{where}: {outer} (the {inner} of its attention) {msg[len(prefix):]}") from None
        raise


def _clones(module: Module, n: int) -> ModuleList:
    """n deep copies of module (equal initial weights, as torch's); random generators stay shared."""
    shared = {id(v): v for m in module.modules() for v in vars(m).values()
              if hasattr(v, "standard_normal") and hasattr(v, "random")}
    return ModuleList([copy.deepcopy(module, dict(shared)) for _ in range(n)])


class TransformerEncoderLayer(Module):
    """Self-attention then a position-wise feed-forward network, each with residual and LayerNorm.

    src: (B, T, d_model) (batch_first) or (T, B, d_model), or unbatched (T, d_model).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True, generator=None, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            generator=generator, **kw)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, generator=generator, **kw)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, generator=generator, **kw)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = _get_activation(activation)

    def _sa_block(self, x, mask, padding, is_causal):
        names = ("src_mask", "src_key_padding_mask")
        return self.dropout1(_attend(type(self).__name__, self.self_attn, names, x, x, mask, padding, is_causal))

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        """src_mask: (T, T) or (B*nhead, T, T); src_key_padding_mask: (B, T); True = masked out.

        is_causal: the causal mask (when src_mask is None) or a hint that src_mask is causal.
        """
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerDecoderLayer(Module):
    """Masked self-attention, cross-attention to memory, then the feed-forward network.

    tgt: (B, T, d_model), memory: (B, S, d_model) (batch_first), else time first.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True, generator=None, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            generator=generator, **kw)
        self.multihead_attn = MultiHeadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                 batch_first=batch_first, generator=generator, **kw)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, generator=generator, **kw)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, generator=generator, **kw)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.activation = _get_activation(activation)

    def _sa_block(self, x, mask, padding, is_causal):
        names = ("tgt_mask", "tgt_key_padding_mask")
        return self.dropout1(_attend(type(self).__name__, self.self_attn, names, x, x, mask, padding, is_causal))

    def _mha_block(self, x, mem, mask, padding, is_causal):
        names = ("memory_mask", "memory_key_padding_mask")
        return self.dropout2(_attend(type(self).__name__, self.multihead_attn, names, x, mem, mask, padding,
                                     is_causal))

    def _ff_block(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool = False, memory_is_causal: bool = False):
        """tgt_mask: (T, T) or (B*nhead, T, T); memory_mask: (T, S) or (B*nhead, T, S);
        tgt_key_padding_mask: (B, T); memory_key_padding_mask: (B, S). True = masked out.
        """
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x


class TransformerEncoder(Module):
    """num_layers deep copies of encoder_layer (``layers.0`` ...), then the optional final ``norm``.

    Like torch, every copy starts with the same weights as encoder_layer.
    enable_nested_tensor and mask_check are accepted for torch compatibility and ignored.
    """

    def __init__(self, encoder_layer: Module, num_layers: int, norm: Module = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return x if self.norm is None else self.norm(x)


class TransformerDecoder(Module):
    """num_layers deep copies of decoder_layer (``layers.0`` ...), then the optional final ``norm``."""

    def __init__(self, decoder_layer: Module, num_layers: int, norm: Module = None):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal: bool = False):
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                      tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                      tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return x if self.norm is None else self.norm(x)


class Transformer(Module):
    """Encoder-decoder Transformer: ``encoder`` and ``decoder`` stacks, each ending in a LayerNorm.

    Every weight with more than one dimension is re-drawn Xavier-uniform, as torch does.
    src: (B, S, d_model), tgt: (B, T, d_model) with batch_first (our default), else time first;
    returns (B, T, d_model).
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", custom_encoder: Module = None, custom_decoder: Module = None,
                 layer_norm_eps: float = 1e-5, batch_first: bool = True, norm_first: bool = False,
                 bias: bool = True, generator=None, dtype=None, device=None):
        super().__init__()
        layer_kw = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                        layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
                        generator=generator, dtype=dtype, device=device)
        norm_kw = dict(eps=layer_norm_eps, bias=bias, dtype=dtype, device=device)
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            self.encoder = TransformerEncoder(TransformerEncoderLayer(d_model, nhead, **layer_kw),
                                              num_encoder_layers, LayerNorm(d_model, **norm_kw))
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            self.decoder = TransformerDecoder(TransformerDecoderLayer(d_model, nhead, **layer_kw),
                                              num_decoder_layers, LayerNorm(d_model, **norm_kw))
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        for p in self.parameters():
            if p.ndim > 1:
                init.xavier_uniform_(p, generator=generator)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal: bool = False):
        """Masks as in the layers: src_mask (S, S), tgt_mask (T, T), memory_mask (T, S) (or with a
        leading B*nhead axis); *_key_padding_mask (B, S) / (B, T) / (B, S). Boolean True = masked out.
        """
        batch_axis = 0 if self.batch_first else 1
        if src.ndim == 3 and tgt.ndim == 3 and src.shape[batch_axis] != tgt.shape[batch_axis]:
            raise ValueError(f"Transformer: the batch sizes of src {tuple(src.shape)} and tgt {tuple(tgt.shape)} "
                             f"differ (batch axis {batch_axis})")
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise ValueError(f"Transformer: the feature size of src {tuple(src.shape)} and tgt "
                             f"{tuple(tgt.shape)} must equal d_model {self.d_model}")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
        """(sz, sz) float mask: -inf above the diagonal (future positions), 0 on and below it."""
        xp = backend.xp_for(device or backend.default_device())
        mask = xp.triu(xp.full((sz, sz), -np.inf, dtype=resolve(dtype)), k=1)
        return Tensor(mask)
