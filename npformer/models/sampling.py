"""Autoregressive sampling from a language model: temperature, top-k, top-p, KV cache (for an LSTM
or GRU language model, its recurrent state).

Sampling itself happens on the host with a seeded NumPy generator, so the same
seed gives the same text on the CPU and the GPU.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import no_grad
from ..tensor import Tensor
from .gpt import KVCache
from .llama import LlamaForCausalLM
from .rnn_lm import RNNLM, RNNState

WINDOW_OPTIONAL = (LlamaForCausalLM, RNNLM)     # models whose context window is generate's `window`


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = None, top_p: float = None) -> np.ndarray:
    """Probabilities (B, V) from last-position logits (B, V) after temperature, top-k and top-p.

    top_k keeps the k largest logits; top_p keeps the smallest set of tokens whose
    probability mass reaches p (always at least one token).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    z = logits.astype(np.float64) / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {top_k}")
        k = min(top_k, z.shape[-1])
        kth = np.partition(z, -k, axis=-1)[:, -k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p      # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = None,
             top_p: float = None, seed: int = 0, use_cache: bool = True, on_token=None,
             window: int = None) -> np.ndarray:
    """Extend idx (B, T) int by `max_new_tokens` sampled tokens; returns (B, T + max_new_tokens) on the host.

    model: a GPT, a LlamaForCausalLM or an RNNLM. With use_cache each step feeds only the newest
    token and reuses the keys and values of earlier positions (an RNNLM: its recurrent state after
    them, RNNState, so a token costs one step of the recurrence). Once a GPT's context exceeds
    block_size, every step re-encodes the last block_size tokens (absolute positions shift),
    exactly as the uncached path does, so both give the same tokens for the same seed. A
    LLaMA has no such window unless `window` gives one: its rotary positions go on past
    max_position_embeddings, as in HF's generate; with window=N (the length it was trained
    on, say) it is cropped to the last N tokens as a GPT is to block_size. window is a
    LLaMA option: a GPT's window is its block_size. An RNNLM takes `window` as a LLaMA does: none
    unless given (its state simply runs on; without the cache every step reruns the whole
    prefix, or the last `window` tokens, from a zero state).

    on_token, if given, is called after each step with that step's new tokens, a (B,) int64
    host array of its own, e.g. to print text as it is produced; it does not change the result.
    """
    rng = np.random.default_rng(seed)
    idx = np.array(backend.to_numpy(idx.data if isinstance(idx, Tensor) else idx), dtype=np.int64)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"generate: idx must have shape (B, T) with T >= 1; got {idx.shape}")
    device = backend.device_of(model.parameters()[0].data)
    if window is not None and not isinstance(model, WINDOW_OPTIONAL):
        raise ValueError("generate: window is a LLaMA option (and an RNNLM's); a GPT's context window is its "
                         "block_size")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"generate: window must be a positive integer or None; got {window!r}")
    block = window if isinstance(model, WINDOW_OPTIONAL) else model.config.block_size   # None: no window
    was_training = model.training
    model.eval()
    cache = None
    try:
        with no_grad():
            for _ in range(max_new_tokens):
                if cache is not None and (block is None or _cached(cache) < block):
                    step = idx[:, -1:]                       # only the newest token
                else:                                        # first step, no cache, or cache full
                    step = idx[:, -block:] if block else idx
                    cache = None
                logits, cache = _forward(model, backend.to_device(step, device), cache, use_cache)
                last = backend.to_numpy(logits.data[:, -1, :])
                probs = filter_logits(last, temperature, top_k, top_p)
                nxt = np.array([rng.choice(probs.shape[-1], p=row) for row in probs])
                idx = np.concatenate([idx, nxt[:, None]], axis=1)
                if on_token is not None:
                    on_token(idx[:, -1].copy())
    finally:
        model.train(was_training)
    return idx


def _forward(model, ids, cache, use_cache: bool):
    """(logits (B, t, V), the cache for the next step or None). A GPT appends to its KVCache in
    place (a fresh one when cache is None); a LLaMA returns its past_key_values anew, as HF's; an
    RNNLM advances its RNNState in place."""
    if isinstance(model, LlamaForCausalLM):
        out = model(ids, past_key_values=cache, use_cache=use_cache)
        return out.logits, out.past_key_values
    if isinstance(model, RNNLM):
        cache = cache if cache is not None or not use_cache else RNNState()
        return model(ids, state=cache)[0], cache
    cache = cache if cache is not None or not use_cache else KVCache(model.config.n_layer)
    return model(ids, cache=cache)[0], cache


def _cached(cache) -> int:
    """Positions in a KVCache or an RNNState, or in a LLaMA's past_key_values (k of layer 0: (B, Hkv, P, D))."""
    return cache.length if isinstance(cache, (KVCache, RNNState)) else cache[0][0].shape[2]
