"""GPT additions for verifying against other frameworks (npformer/models/gpt.py): attention_mask and
position_ids for left-padded batches (HF's convention), untied embeddings (tie_embeddings=False), and
SequenceClassifier's head_bias. No torch needed; the HF comparisons are in test_interop_models.py.

Left padding: a row padded on the left, with its pads masked and its positions counted from its first
real token, gives at its real positions what the unpadded row gives alone (float64, 1e-12), with the
KV cache too; the default path (no mask) is unchanged and still the fused one.
"""

import numpy as np
import pytest

import npformer as nf
from npformer import ops
from npformer.models.classifier import SequenceClassifier
from npformer.models.gpt import GPT, GPTConfig, KVCache
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def tiny_gpt(seed=0, **overrides) -> GPT:
    """A float64 GPT with every parameter from N(0, 0.3^2) (GPT-2's init would hide mistakes)."""
    model = GPT(GPTConfig(**{**TINY, **overrides}), dtype=np.float64, device=DEVICE)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.3)
    return model


def left_padded(rng, lengths, Tn, V):
    """(idx, attention_mask, position_ids) of rows of `lengths` real tokens, left-padded to Tn, with HF's
    generate positions: cumsum(mask) - 1, and 1 at the pads (any in-range value: pads are masked)."""
    idx = rng.integers(0, V, (len(lengths), Tn))
    mask = (np.arange(Tn)[None, :] >= Tn - np.array(lengths)[:, None]).astype(np.int64)   # (B, T)
    pos = mask.cumsum(-1) - 1
    pos[mask == 0] = 1
    return idx, mask, pos


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------- attention_mask, position_ids

def test_left_padded_rows_equal_their_unpadded_selves(ops_path):
    model = tiny_gpt(1)
    rng = np.random.default_rng(1)
    lengths, Tn = [8, 5, 2], 8
    idx, mask, pos = left_padded(rng, lengths, Tn, 11)
    logits, _ = model(T(idx), attention_mask=T(mask), position_ids=T(pos))
    got = host(logits)
    assert np.isfinite(got).all()                                  # fully masked pad rows stay finite
    for b, n in enumerate(lengths):
        alone = host(model(T(idx[b:b + 1, Tn - n:]))[0])[0]        # (n, V), no padding at all
        assert rel(got[b, Tn - n:], alone) < 1e-12, (b, rel(got[b, Tn - n:], alone))


def test_all_ones_mask_and_default_positions_change_nothing(ops_path):
    model = tiny_gpt(2)
    idx = np.random.default_rng(2).integers(0, 11, (2, 6))
    plain = host(model(T(idx))[0])
    ones = np.ones((2, 6), np.int64)
    masked = host(model(T(idx), attention_mask=T(ones), position_ids=T(np.arange(6)[None]))[0])
    assert rel(masked, plain) < 1e-13
    as_bool = host(model(T(idx), attention_mask=T(ones.astype(bool)))[0])
    np.testing.assert_array_equal(as_bool, masked)


def test_the_default_path_still_uses_the_fused_attention(monkeypatch):
    """Under ops.use("fast"), no attention_mask: the packed self-attention op runs, as before; with a
    mask the reference path runs instead."""
    calls = []
    fused = ops.self_attention
    monkeypatch.setattr(ops, "self_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = tiny_gpt(3)
    idx = np.random.default_rng(3).integers(0, 11, (2, 5))
    with ops.use("fast"):
        model(T(idx))
        assert len(calls) == TINY["n_layer"]
        model(T(idx), attention_mask=T(np.ones((2, 5), np.int64)))
    assert len(calls) == TINY["n_layer"]


class Padded(nf.nn.Module):
    """model(idx, targets) with a fixed attention_mask and position_ids, for gradcheck_module."""

    def __init__(self, model, mask, pos):
        super().__init__()
        self.model, self.mask, self.pos = model, T(mask), T(pos)

    def forward(self, idx, targets):
        return self.model(idx, targets, attention_mask=self.mask, position_ids=self.pos)


def test_gradients_through_the_mask_are_right():
    model = tiny_gpt(4, n_layer=1)
    rng = np.random.default_rng(4)
    idx, mask, pos = left_padded(rng, [5, 3], 5, 11)
    targets = np.where(mask == 1, rng.integers(0, 11, mask.shape), -1)   # pads ignored
    assert gradcheck_module(Padded(model, mask, pos), [T(idx), T(targets)], pick=lambda out: out[1], directions=3,
                            atol=1e-8, rtol=1e-5)


def test_cached_decoding_of_a_left_padded_batch_equals_the_full_forward():
    model = tiny_gpt(5)
    rng = np.random.default_rng(5)
    idx, mask, pos = left_padded(rng, [7, 4], 7, 11)
    full = host(model(T(idx), attention_mask=T(mask), position_ids=T(pos))[0])
    cache = KVCache(model.config.n_layer)
    steps = [(0, 3), (3, 4), (4, 7)]
    for a, b in steps:
        got = host(model(T(idx[:, a:b]), cache=cache, attention_mask=T(mask[:, :b]), position_ids=T(pos[:, a:b]))[0])
        real = mask[:, a:b] == 1
        assert rel(got[real], full[:, a:b][real]) < 1e-12


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention_mask=np.ones((2, 4), np.int64)), r"attention_mask must be .* \(2, 5\)"),
    (dict(attention_mask=np.ones((2, 5), complex)), r"attention_mask must be 1/0 \(or bool\)"),
    (dict(position_ids=np.arange(5.0)[None]), "position_ids must be integers"),
    (dict(position_ids=np.arange(4)[None]), "position_ids must be integers"),
    (dict(position_ids=np.full((2, 5), 8)), r"position_ids must lie in \[0, block_size\) = \[0, 8\)"),
    (dict(position_ids=np.full((2, 5), -1)), "position_ids must lie in"),
])
def test_bad_masks_and_positions_raise_naming_them(kwargs, match):
    model = tiny_gpt(6)
    with pytest.raises(ValueError, match=match):
        model(T(np.zeros((2, 5), np.int64)), **{k: T(v) for k, v in kwargs.items()})


def test_explicit_positions_lift_the_length_check_only_to_their_range():
    model = tiny_gpt(7)
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(T(np.zeros((1, 9), np.int64)))
    logits, _ = model(T(np.zeros((1, 9), np.int64)), position_ids=T(np.minimum(np.arange(9), 7)[None]))
    assert logits.shape == (1, 9, 11)


# ----------------------------------------------------------------------------- tie_embeddings

def test_untied_lm_head_is_its_own_parameter():
    tied, untied = GPT(GPTConfig(**TINY), device=DEVICE), GPT(GPTConfig(**TINY, tie_embeddings=False), device=DEVICE)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    names = [n for n, _ in untied.named_parameters()]
    assert names == [n for n, _ in tied.named_parameters()] + ["lm_head.weight"]
    assert list(untied.state_dict()) == list(tied.state_dict())   # checkpoints keep their names
    V, C = TINY["vocab_size"], TINY["n_embd"]
    assert untied.num_parameters() == tied.num_parameters() + V * C
    # the default is unchanged: the same weights as before the field existed, drawn from the same stream
    again = GPT(GPTConfig(**TINY, tie_embeddings=True), device=DEVICE)
    for (k, a), (_, b) in zip(tied.state_dict().items(), again.state_dict().items()):
        np.testing.assert_array_equal(host(a), host(b), err_msg=k)
    assert GPTConfig(**TINY).to_dict()["tie_embeddings"] is True


def test_untied_gradients_reach_each_weight_separately():
    model = tiny_gpt(8, tie_embeddings=False)
    idx = np.random.default_rng(8).integers(0, 11, (2, 6))
    _, loss = model(T(idx), T(idx))
    loss.backward()
    g_head, g_wte = host(model.lm_head.weight.grad), host(model.transformer.wte.weight.grad)
    assert np.abs(g_head).max() > 0 and np.abs(g_wte).max() > 0
    assert not np.allclose(g_head, g_wte)
    assert set(np.flatnonzero(np.abs(g_wte).sum(1))) <= set(idx.ravel())   # wte: only the rows looked up


def test_tie_embeddings_must_be_a_bool():
    with pytest.raises(ValueError, match="GPTConfig.tie_embeddings must be True or False"):
        GPTConfig(**TINY, tie_embeddings="no")


# ----------------------------------------------------------------------------- SequenceClassifier head_bias

def test_classifier_head_without_bias():
    clf = SequenceClassifier(tiny_gpt(9), 3, head_bias=False, generator=nf.random.Generator(0))
    assert clf.head.bias is None and "head.bias" not in clf.state_dict()
    idx = np.random.default_rng(9).integers(0, 11, (2, 5))
    logits, loss = clf(T(idx), T(np.array([0, 2])))
    h = host(clf.backbone.hidden_states(T(idx)))[:, -1]                 # (B, C): the last token
    assert rel(host(logits), h @ host(clf.head.weight).T) < 1e-13
    assert SequenceClassifier(tiny_gpt(9), 3).head.bias is not None     # the default keeps its bias
