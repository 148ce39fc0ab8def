"""Beam search for the encoder-decoder Transformer, scored with the GNMT length penalty.

A hypothesis y_1 .. y_n (n generated tokens, the final EOS included) scores

    score(y) = log P(y | x) / lp(n),        lp(n) = ((5 + n) / 6) ** alpha        (Wu et al., 2016)

so alpha = 0 ranks by plain log-probability and alpha > 0 stops short outputs from winning only
because they are short. Each step extends the K live hypotheses of a batch row by every token,
keeps the K best extensions (all have the same length, so raw log-probability ranks them), and
moves those ending in EOS to the finished set, where only the best so far is kept. A row stops
when no hypothesis is live, or when no live one can still beat the best finished: with L <= 0 its
log-probability, a continuation ending at length m scores at most L / lp(m) <= L / max lp, the
maximum over the lengths still reachable.

Plain beam search can lose the greedy path (K extensions of other hypotheses may all beat its
next step) and end with a worse score than greedy decoding. For K > 1 the greedy hypothesis is
therefore decoded alongside, as one extra row per batch row in the same decoder calls, and offered
to the finished set like any other: the result never scores below greedy decoding. With K = 1 the
single beam is the greedy path, token for token.

Bookkeeping (hypotheses, scores) is host-side NumPy; the decoder runs on the model's device and
its KV cache follows each hypothesis's parent through DecoderKVCache.select.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from ..autograd import no_grad
from ..tensor import Tensor


def gnmt_length_penalty(n, alpha: float):
    """lp(n) = ((5 + n) / 6) ** alpha for n generated tokens (lp(1) = 1 for every alpha)."""
    return ((5.0 + n) / 6.0) ** alpha


def _host_log_softmax(logits) -> np.ndarray:
    """(R, V) logits on any device -> float64 log-probabilities on the host."""
    z = backend.to_numpy(logits).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _src_array(src):
    a = src.data if isinstance(src, Tensor) else src
    return a if backend.is_array(a) else np.asarray(a)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"beam_search: {name} must be an integer >= {low}; got {value!r}")


def beam_search(model, src, bos_id: int, eos_id: int, beam_size: int = 4, length_penalty: float = 0.6,
                max_new_tokens: int = None, use_cache: bool = True) -> tuple:
    """Best hypothesis per batch row under log P(y | x) / ((5 + n) / 6) ** length_penalty.

    model: a Seq2SeqTransformer; src: (B, S) int token ids (Tensor or array; pad_id = padding);
    max_new_tokens: at most this many generated tokens (default: max_len - 1).
    Returns (tokens, scores): tokens (B, 1 + n) int64 host array, each row bos_id, its best
    hypothesis (ending in eos_id unless it reached max_new_tokens), then pad_id; scores (B,)
    float64, the length-penalised log-probability of each row's hypothesis. Runs in eval mode
    without gradients; use_cache=False recomputes every position each step (same results).
    """
    cfg = model.config
    max_new_tokens = cfg.max_len - 1 if max_new_tokens is None else max_new_tokens
    _check_int("beam_size", beam_size, 1)
    _check_int("max_new_tokens", max_new_tokens, 0)
    for name, tok in (("bos_id", bos_id), ("eos_id", eos_id)):
        _check_int(name, tok, 0)
        if tok >= cfg.tgt_vocab_size:
            raise ValueError(f"beam_search: {name} {tok} is outside the target vocabulary of {cfg.tgt_vocab_size}")
    if not np.isfinite(length_penalty):
        raise ValueError(f"beam_search: length_penalty must be a finite number; got {length_penalty}")
    if 1 + max_new_tokens > cfg.max_len:
        raise ValueError(f"beam_search: 1 + max_new_tokens = {1 + max_new_tokens} exceeds max_len {cfg.max_len}")
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            return _search(model, _src_array(src), bos_id, eos_id, beam_size, float(length_penalty),
                           max_new_tokens, use_cache)
    finally:
        model.train(was_training)


def _search(model, src, bos_id, eos_id, K, alpha, max_new, use_cache):
    memory = model.encode(src)                                   # (B, S, D); checks src
    src_pad = model.pad_mask(src)                                # (B, S)
    device, B, V = memory.device, memory.shape[0], model.config.tgt_vocab_size
    G = B if K > 1 else 0                                        # greedy rows, one per batch row
    R, BK = B * K + G, B * K
    # rows 0 .. BK-1: beam k of batch row b at b*K + k; rows BK .. R-1: the greedy hypotheses
    expand = backend.to_device(np.concatenate([np.repeat(np.arange(B), K), np.arange(G)]).astype(np.int64), device)
    memory, src_pad = Tensor(memory.data[expand]), src_pad[expand]             # (R, S, D), (R, S)
    cache = model.new_cache() if use_cache else None

    seqs = np.full((R, 1), bos_id, dtype=np.int64)              # every hypothesis so far, BOS first
    logp = np.full(R, -np.inf)                                   # -inf marks a dead row
    logp[np.arange(B) * K] = 0.0                                 # one live beam per row to start
    logp[BK:] = 0.0
    best_score = np.full(B, -np.inf)
    best_seq = [seqs[0].copy() for _ in range(B)]
    done = np.zeros(B, dtype=bool)

    def offer(norm, rows, new_seqs):
        """norm (B, m) length-normalised scores of finished candidates at seq rows (B, m)."""
        j = np.argmax(norm, axis=1)                              # the first of equal scores
        top = norm[np.arange(B), j]
        for b in np.flatnonzero((top > best_score) & ~done):
            best_score[b], best_seq[b] = top[b], new_seqs[rows[b, j[b]]].copy()

    for t in range(1, max_new + 1):                              # t: hypothesis length after this step
        step_in = backend.to_device(seqs[:, -1:] if use_cache else seqs, device)
        lp_tok = _host_log_softmax(model.decode(step_in, memory, src_pad, cache).data[:, -1])   # (R, V)
        pen = gnmt_length_penalty(t, alpha)

        # beams: the K best of the K * V extensions of each row
        cand = (logp[:BK, None] + lp_tok[:BK]).reshape(B, K * V)
        order = np.argsort(-cand, axis=1, kind="stable")[:, :K]                  # (B, K)
        score = np.take_along_axis(cand, order, axis=1)                          # (B, K)
        parent = np.arange(B)[:, None] * K + order // V                          # (B, K) row indices
        token = order % V
        ended = (token == eos_id) & np.isfinite(score)
        # greedy rows: the argmax extension
        g_tok = np.argmax(lp_tok[BK:], axis=1)
        g_score = logp[BK:] + lp_tok[BK:][np.arange(G), g_tok]
        g_ended = (g_tok == eos_id) & np.isfinite(g_score)

        rows = np.concatenate([parent.reshape(-1), np.arange(BK, R)])           # (R,) parent of each new row
        seqs = np.concatenate([seqs[rows], np.concatenate([token.reshape(-1), g_tok])[:, None]], axis=1)
        if cache is not None:
            cache.select(backend.to_device(rows, device))
        last = t == max_new                                       # live hypotheses end here too
        finished = ended | (last & np.isfinite(score))
        offer(np.where(finished, score / pen, -np.inf), np.arange(BK).reshape(B, K), seqs)
        if G:
            g_fin = g_ended | (last & np.isfinite(g_score))
            offer(np.where(g_fin, g_score / pen, -np.inf)[:, None], np.arange(BK, R)[:, None], seqs)
        logp = np.concatenate([np.where(ended, -np.inf, score).reshape(-1), np.where(g_ended, -np.inf, g_score)])

        # a row is done when nothing is live or no live hypothesis can beat its best finished one
        best_live = logp[:BK].reshape(B, K).max(axis=1)
        if G:
            best_live = np.maximum(best_live, logp[BK:])
        # lp is monotone in n, so its largest value over the reachable lengths t+1 .. max_new is at an end
        lp_reach = max(gnmt_length_penalty(t + 1, alpha), gnmt_length_penalty(max_new, alpha))
        bound = np.minimum(best_live, 0.0) / lp_reach
        done |= ~np.isfinite(best_live) | (best_score >= bound)
        logp[:BK][np.repeat(done, K)] = -np.inf
        if G:
            logp[BK:][done] = -np.inf
        if done.all():
            break

    width = max(len(s) for s in best_seq)
    out = np.full((B, width), model.config.pad_id, dtype=np.int64)
    for b, s in enumerate(best_seq):
        out[b, :len(s)] = s
    return out, np.where(np.isfinite(best_score), best_score, 0.0 if max_new == 0 else -np.inf)


def greedy_decode(model, src, bos_id: int, max_new_tokens: int, eos_id: int = None,
                  use_cache: bool = True) -> np.ndarray:
    """Greedy decoding: (B, 1 + n) int64 host array, bos_id then the argmax token of each step.

    model: a Seq2SeqTransformer (or models/seq2seq_arch.TaskEncoderDecoder); src: (B, S) int.
    n <= max_new_tokens; after eos_id a row emits pad_id, and decoding stops once every row has emitted
    eos_id. Eval mode without gradients (the training mode is restored); with use_cache each step feeds
    only the newest token, use_cache=False the whole prefix (the same tokens).
    """
    cfg = model.config
    if 1 + max_new_tokens > cfg.max_len:
        raise ValueError(f"{type(model).__name__}: 1 + max_new_tokens = {1 + max_new_tokens} exceeds max_len "
                         f"{cfg.max_len}")
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            src = model._tokens("src", src, cfg.src_vocab_size)
            src_pad = model.pad_mask(src)
            memory = model.encode(src, src_pad)
            xp = memory.xp
            ys = xp.full((src.shape[0], 1), bos_id, dtype=np.int64)
            done = xp.zeros(src.shape[0], dtype=bool)
            cache = model.new_cache() if use_cache else None
            for _ in range(max_new_tokens):
                step = ys[:, -1:] if use_cache else ys
                logits = model.decode(step, memory, src_pad, cache)              # (B, t, V)
                nxt = xp.argmax(logits.data[:, -1], axis=-1)                     # (B,)
                nxt = xp.where(done, cfg.pad_id, nxt)
                ys = xp.concatenate([ys, nxt[:, None].astype(np.int64)], axis=1)
                if eos_id is not None:
                    done = done | (nxt == eos_id)
                    if bool(done.all()):
                        break
    finally:
        model.train(was_training)
    return backend.to_numpy(ys)


def score_hypotheses(model, src, tokens, eos_id: int, length_penalty: float = 0.6) -> np.ndarray:
    """GNMT scores (B,) float64 of given hypotheses by teacher forcing (one decoder pass).

    tokens: (B, 1 + n) int, BOS first, as beam_search or greedy_decode return them; each row is
    scored up to and including its first eos_id (all of it when it has none).
    """
    ys = np.asarray(backend.to_numpy(tokens.data if isinstance(tokens, Tensor) else tokens), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            src = _src_array(src)
            memory = model.encode(src)
            device = memory.device
            logits = model.decode(backend.to_device(ys[:, :-1], device), memory, model.pad_mask(src))
    finally:
        model.train(was_training)
    B, T = ys.shape[0], ys.shape[1] - 1
    lp = _host_log_softmax(logits.data.reshape(B * T, -1)).reshape(B, T, -1)
    tok_lp = np.take_along_axis(lp, ys[:, 1:, None], axis=2)[..., 0]          # (B, T)
    is_eos = ys[:, 1:] == eos_id
    n = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, T)           # tokens up to the first EOS
    keep = np.arange(T)[None, :] < n[:, None]
    return (tok_lp * keep).sum(axis=1) / gnmt_length_penalty(n, length_penalty)
