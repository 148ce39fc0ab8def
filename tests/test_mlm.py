"""BERT masking (npformer.data.mlm.mask_tokens): the 15% / 80-10-10 fractions, which positions are
never chosen, the labels, reproducibility, and the errors."""

import numpy as np
import pytest

from npformer.data import mask_tokens

VOCAB, MASK, CLS, SEP, PAD = 1000, 3, 1, 2, 0
SPECIAL = (PAD, CLS, SEP, MASK)


def batch(B=200, T=500, seed=0):
    """(ids, attention_mask): [CLS] tokens [SEP] then padding; tokens are ids >= 4, never [MASK]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(B, T))
    lengths = rng.integers(T // 2, T + 1, size=B)
    attn = (np.arange(T) < lengths[:, None]).astype(np.int64)
    ids[:, 0] = CLS
    ids[np.arange(B), lengths - 1] = SEP
    ids[attn == 0] = PAD
    return ids, attn


def run(ids, attn, seed=1, **kw):
    return mask_tokens(ids, vocab_size=VOCAB, mask_token_id=MASK, special_ids=SPECIAL,
                       attention_mask=attn, generator=np.random.default_rng(seed), **kw)


def within(count, n, p, sigmas=5):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_fractions_15_and_80_10_10():
    ids, attn = batch()
    masked, labels = run(ids, attn)
    eligible = (attn == 1) & ~np.isin(ids, SPECIAL)
    chosen = labels != -100
    assert within(chosen.sum(), eligible.sum(), 0.15)
    n = chosen.sum()
    to_mask = chosen & (masked == MASK)
    kept = chosen & (masked == ids)
    randomised = chosen & ~to_mask & ~kept
    assert within(to_mask.sum(), n, 0.8) and within(randomised.sum(), n, 0.1)
    assert within(kept.sum(), n, 0.1)
    assert masked.min() >= 0 and masked.max() < VOCAB


def test_special_and_padding_never_chosen_and_unchosen_unchanged():
    ids, attn = batch()
    masked, labels = run(ids, attn, mlm_probability=1.0)
    never = (attn == 0) | np.isin(ids, SPECIAL)
    assert (labels[never] == -100).all() and (masked[never] == ids[never]).all()
    assert (labels[~never] != -100).all()          # probability 1: every eligible token is chosen
    # padding is excluded by attention_mask alone, even when its id is not listed as special
    masked, labels = mask_tokens(ids, vocab_size=VOCAB, mask_token_id=MASK, attention_mask=attn,
                                 mlm_probability=1.0, generator=np.random.default_rng(0))
    assert (labels[attn == 0] == -100).all()


def test_labels_and_dtypes():
    ids, attn = batch(B=20, T=50)
    masked, labels = run(ids, attn)
    chosen = labels != -100
    assert chosen.any()
    assert (labels[chosen] == ids[chosen]).all()
    assert (masked[~chosen] == ids[~chosen]).all()
    assert masked.dtype == labels.dtype == np.int64 and masked.shape == labels.shape == ids.shape


def test_deterministic_and_input_unchanged():
    ids, attn = batch(B=20, T=50)
    ids32 = ids.astype(np.int32)
    before, attn_before = ids32.copy(), attn.copy()
    a = run(ids32, attn, seed=7)
    b = run(ids32, attn, seed=7)
    c = run(ids32, attn, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert np.array_equal(ids32, before) and np.array_equal(attn, attn_before)
    assert a[0].dtype == np.int64


def test_errors():
    ids, attn = batch(B=2, T=8)
    g = np.random.default_rng(0)
    kw = dict(vocab_size=VOCAB, mask_token_id=MASK, generator=g)
    for p in (0, -0.1, 1.5, float("nan"), "0.15", True):
        with pytest.raises(ValueError, match="mlm_probability"):
            mask_tokens(ids, mlm_probability=p, **kw)
    with pytest.raises(TypeError, match="input_ids must hold integer.*float64"):
        mask_tokens(ids.astype(float), **kw)
    with pytest.raises(TypeError, match="input_ids"):
        mask_tokens(ids.astype(bool), **kw)
    with pytest.raises(ValueError, match=r"must be in \[0, vocab_size=1000\), found 1000"):
        mask_tokens(np.where(ids == CLS, VOCAB, ids), **kw)
    with pytest.raises(ValueError, match="found -1"):
        mask_tokens(np.where(ids == CLS, -1, ids), **kw)
    with pytest.raises(ValueError, match=r"shape \(B, T\), got shape \(8,\)"):
        mask_tokens(ids[0], **kw)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\) but input_ids has "
                                         r"shape \(2, 8\)"):
        mask_tokens(ids, attention_mask=attn[:, :7], **kw)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        mask_tokens(ids, attention_mask=attn * 2, **kw)
    with pytest.raises(ValueError, match="mask_token_id"):
        mask_tokens(ids, vocab_size=VOCAB, mask_token_id=VOCAB, generator=g)
    with pytest.raises(ValueError, match="special_ids"):
        mask_tokens(ids, special_ids=(-1,), **kw)
    with pytest.raises(ValueError, match="vocab_size"):
        mask_tokens(ids, vocab_size=0, mask_token_id=0, generator=g)
    with pytest.raises(TypeError, match="generator"):
        mask_tokens(ids, vocab_size=VOCAB, mask_token_id=MASK, generator=0)
    with pytest.raises(TypeError):
        mask_tokens(ids, vocab_size=VOCAB, mask_token_id=MASK)     # generator is required
