"""A recurrent language model: an LSTM or a GRU over token embeddings (``npformer pretrain --model lstm``).

The layout of PyTorch's word_language_model example (Zaremba et al., 2014; Press & Wolf, 2017):

    x = drop(encoder(idx))                        (B, T, C)   token embeddings, no positions
    h = rnn(x, state)                             (B, T, C)   nn.LSTM or nn.GRU, n_layer layers,
                                                              dropout between them
    logits = decoder(drop(h))                     (B, T, V)   decoder.weight is encoder.weight (tied)

Shapes: B batch, T tokens, C = n_embd (the embedding size and the hidden size: one width, so the
output layer can always share the embedding matrix), L = n_layer, V = vocab_size.

Training runs truncated backpropagation through time over each block: every batch starts from a
zero state and gradients flow back through the block's T steps only. ``block_size`` records that
window; the model itself takes sequences of any length (there is no position table).

Generation carries the state from one token to the next (RNNState, the recurrent analogue of
GPT's KVCache): each new token costs one step of the recurrence, not a rerun of the prefix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .. import backend, nn
from ..dtypes import resolve
from ..nn import functional as F
from ..nn import init
from ..tensor import Tensor
from .config import require_bools, require_dropout, require_positive_ints

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


@dataclass(frozen=True)
class RNNLMConfig:
    """Hyperparameters of an RNNLM. Frozen: build a new one with dataclasses.replace.

    block_size: the training window (truncated BPTT), not a limit on the input's length.
    dropout: on the embeddings, between recurrent layers, and on the last layer's output.
    bias: biases in the recurrent layers and the output layer.
    tie_weights: decoder.weight is encoder.weight (always possible: both are (V, C)).
    """
    vocab_size: int
    block_size: int
    n_layer: int = 2
    n_embd: int = 128
    cell: str = "lstm"                  # "lstm" or "gru"
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True

    def __post_init__(self):
        require_positive_ints(self, ("vocab_size", "block_size", "n_layer", "n_embd"))
        require_dropout(self)
        require_bools(self, ("bias", "tie_weights"))
        if self.cell not in CELLS:
            raise ValueError(f"RNNLMConfig.cell must be 'lstm' or 'gru'; got {self.cell!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class RNNState:
    """The recurrent state after the tokens fed so far: for incremental decoding, as GPT's KVCache.

    h: (L, B, C) array, every layer's last hidden state; c: the same for the LSTM's cells (None for
    a GRU); both None before the first token. length: tokens fed so far. Kept as arrays, outside
    the autograd graph (as KVCache keeps keys and values). RNNLM.forward updates it in place.
    """

    def __init__(self):
        self.h = self.c = None
        self.length = 0

    def hx(self, cell: str):
        """The initial state nn.LSTM / nn.GRU take: None (zeros) at first, else (h, c) or h."""
        if self.h is None:
            return None
        return (Tensor(self.h), Tensor(self.c)) if cell == "lstm" else Tensor(self.h)

    def update(self, final, tokens: int) -> None:
        """Keep the layers' final states (h_n, or (h_n, c_n) for LSTM) after `tokens` more tokens."""
        h, c = final if isinstance(final, tuple) else (final, None)
        self.h, self.c = h.data, None if c is None else c.data
        self.length += tokens


class RNNLM(nn.Module):
    """LSTM or GRU language model, called as a GPT: forward(idx, targets) -> (logits, loss).

    Parameters (PyTorch word_language_model's names): encoder.weight (V, C); rnn.weight_ih_l{k},
    rnn.weight_hh_l{k} (G C, C) and rnn.bias_ih_l{k}, rnn.bias_hh_l{k} (G C,), G = 4 (LSTM) or 3
    (GRU), torch's gate order; decoder.weight (V, C), the encoder's when tied, and decoder.bias (V,).
    """

    def __init__(self, config: RNNLMConfig, generator=None, dtype=None, device: str = None):
        """generator: a numpy.random.Generator for the initial weights (seed 0 when None); dtype:
        npformer's default when None; weights are drawn on the host, then moved to `device`
        (NPFORMER_DEVICE when None)."""
        super().__init__()
        self.config = config
        C, V, dtype = config.n_embd, config.vocab_size, resolve(dtype)
        throwaway = np.random.default_rng(0)    # the layers' own init, overwritten by _init_weights
        self.encoder = nn.Embedding(V, C, generator=throwaway, dtype=dtype, device="cpu")
        self.drop = nn.Dropout(config.dropout)
        self.rnn = CELLS[config.cell](C, C, num_layers=config.n_layer, bias=config.bias, batch_first=True,
                                      dropout=config.dropout, generator=throwaway, dtype=dtype, device="cpu")
        self.decoder = nn.Linear(C, V, bias=config.bias, generator=throwaway, dtype=dtype, device="cpu")
        if config.tie_weights:
            self.decoder.weight = self.encoder.weight               # (V, C), shared
        self._init_weights(generator)
        self.to(device=device or backend.default_device())

    def _init_weights(self, generator):
        """word_language_model's: embedding (and an untied decoder) U(-0.1, 0.1), decoder bias 0; the
        recurrent weights and biases torch's U(-1/sqrt(C), 1/sqrt(C)). Drawn in named_parameters order."""
        rng = generator if generator is not None else np.random.default_rng(0)
        bound = 1.0 / math.sqrt(self.config.n_embd)
        for name, p in self.named_parameters():
            if name.startswith("rnn."):
                init.uniform_(p, -bound, bound, generator=rng)
            elif name == "decoder.bias":
                init.zeros_(p)
            else:                                                   # encoder.weight, untied decoder.weight
                init.uniform_(p, -0.1, 0.1, generator=rng)

    def forward(self, idx, targets=None, state: RNNState = None):
        """idx: (B, T) token ids; targets: (B, T) ids aligned with the logits (-1 ignored), as GPT's.

        state: None starts from zeros (training: each block afresh); an RNNState continues from the
        tokens it has seen and is advanced in place by these T (generation).
        Returns (logits (B, T, V), mean cross-entropy over the targets or None).
        """
        idx = idx.data if isinstance(idx, Tensor) else idx
        if getattr(idx, "ndim", None) != 2 or idx.shape[1] == 0:
            raise ValueError(f"RNNLM: idx must have shape (B, T) with T >= 1; got {np.shape(idx)}")
        weight = self.encoder.weight.data
        if backend.device_of(idx) != backend.device_of(weight):
            raise backend.DeviceMismatchError(
                f"RNNLM: idx is on {backend.device_of(idx)} but the model is on {backend.device_of(weight)}")
        B, T = idx.shape
        x = self.drop(self.encoder(idx))                                    # (B, T, C)
        h, final = self.rnn(x, None if state is None else state.hx(self.config.cell))   # (B, T, C)
        if state is not None:
            state.update(final, T)
        logits = self.decoder(self.drop(h))                                 # (B, T, V)
        loss = None
        if targets is not None:
            t = targets.data if isinstance(targets, Tensor) else targets
            loss = F.cross_entropy(logits.reshape(B * T, -1), t.reshape(B * T), ignore_index=-1)
        return logits, loss
