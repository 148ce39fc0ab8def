"""SequenceClassifier: pooling positions for each backbone, padding invariance, float64 gradient
checks, a frozen-backbone linear probe that still trains its head, GPT.hidden_states, and errors."""

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.models import GPT, GPTConfig, Seq2SeqConfig, Seq2SeqTransformer, SequenceClassifier
from npformer.optim import SGD
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module


def randomise(module, seed):
    rng = np.random.default_rng(seed)
    for p in module.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.5)
    return module


def gpt(seed=0, random=True):
    cfg = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, generator=np.random.default_rng(seed), dtype=np.float64, device=DEVICE)
    return randomise(model, seed) if random else model


def encoder(seed=0):
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, generator=nf.random.Generator(seed),
                                       dtype=np.float64, device=DEVICE)
    return randomise(nn.TransformerEncoder(layer, 2, nn.LayerNorm(8, dtype=np.float64, device=DEVICE)), seed)


def seq2seq(seed=0):
    cfg = Seq2SeqConfig(10, 10, d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                        dim_feedforward=12, dropout=0.0, max_len=8, pad_id=0)
    return randomise(Seq2SeqTransformer(cfg, generator=nf.random.Generator(seed), dtype=np.float64,
                                        device=DEVICE), seed)


def head_of(clf, pooled):
    return pooled @ host(clf.head.weight).T + host(clf.head.bias)


def right_padded(rng, lengths, T_len=6, vocab=10):
    idx = rng.integers(1, vocab, (len(lengths), T_len))
    for r, n in enumerate(lengths):
        idx[r, n:] = 0
    return idx


# ----------------------------------------------------------------------------- GPT.hidden_states

def test_gpt_hidden_states_is_the_trunk_before_lm_head():
    model = gpt(1)
    idx = right_padded(np.random.default_rng(1), [6, 4])
    h = host(model.hidden_states(T(idx)))
    logits, _ = model(T(idx))
    assert h.shape == (2, 6, 8)
    np.testing.assert_allclose(h @ host(model.lm_head.weight).T, host(logits), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- pooling

def test_last_pooling_picks_the_last_non_pad_token_of_a_gpt():
    rng = np.random.default_rng(2)
    clf = SequenceClassifier(gpt(2), 3, pad_id=0, generator=nf.random.Generator(2))
    assert clf.pooling == "last"
    idx = right_padded(rng, [6, 3, 1])
    h = host(clf.backbone.hidden_states(T(idx)))
    want = head_of(clf, h[[0, 1, 2], [5, 2, 0]])
    logits, loss = clf(T(idx))
    assert loss is None and logits.shape == (3, 3)
    np.testing.assert_allclose(host(logits), want, rtol=1e-12, atol=1e-12)
    # Causal attention: right padding changes nothing before it, so each row equals its unpadded self.
    for r, n in enumerate([6, 3, 1]):
        alone, _ = clf(T(idx[r:r + 1, :n]))
        np.testing.assert_allclose(host(alone)[0], host(logits)[r], rtol=1e-12, atol=1e-12)
    # An explicit pad_mask wins over pad_id.
    mask = np.zeros((3, 6), bool)
    mask[:, 4:] = True
    np.testing.assert_allclose(host(clf(T(idx), pad_mask=T(mask))[0])[0], head_of(clf, h[0, 3]), rtol=1e-12)


@pytest.mark.parametrize("make", [encoder, seq2seq])
def test_mean_pooling_averages_non_pad_positions_of_an_encoder(make):
    rng = np.random.default_rng(3)
    backbone = make(3)
    clf = SequenceClassifier(backbone, 4, generator=nf.random.Generator(3))
    assert clf.pooling == "mean"
    lengths = [6, 2, 4]
    pad = np.arange(6)[None, :] >= np.array(lengths)[:, None]               # (B, T) True = padding
    if make is encoder:
        x = rng.standard_normal((3, 6, 8))
        x[pad] = 100.0                                                      # padded vectors are ignored
        inp, hidden = T(x), host(backbone(T(x), src_key_padding_mask=T(pad)))
        logits, _ = clf(inp, pad_mask=T(pad))
    else:
        idx = right_padded(rng, lengths)                                    # pad_id 0 from the config
        inp, hidden = T(idx), host(backbone.encode(T(idx)))
        logits, _ = clf(inp)
    want = head_of(clf, np.stack([hidden[r, :n].mean(0) for r, n in enumerate(lengths)]))
    np.testing.assert_allclose(host(logits), want, rtol=1e-12, atol=1e-12)
    # Padding invariance: row 1 alone, without its padding, gives the same logits.
    alone = inp.data[1:2, :2]
    got = clf(T(host(alone)), pad_mask=T(np.zeros((1, 2), bool)))[0]
    np.testing.assert_allclose(host(got)[0], host(logits)[1], rtol=1e-12, atol=1e-12)


def test_pooling_can_be_chosen_and_no_pad_means_every_position():
    rng = np.random.default_rng(4)
    backbone = gpt(4)
    idx = rng.integers(1, 10, (2, 5))
    h = host(backbone.hidden_states(T(idx)))
    mean = SequenceClassifier(backbone, 2, pooling="mean", generator=nf.random.Generator(4))
    np.testing.assert_allclose(host(mean(T(idx))[0]), head_of(mean, h.mean(1)), rtol=1e-12, atol=1e-12)
    enc = SequenceClassifier(encoder(4), 2, pooling="last", generator=nf.random.Generator(4))
    x = rng.standard_normal((2, 5, 8))
    np.testing.assert_allclose(host(enc(T(x))[0]), head_of(enc, host(enc.backbone(T(x)))[:, -1]),
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- gradients and training

@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_gradcheck_encoder_classifier_inputs_and_parameters(pooling):
    rng = np.random.default_rng(5)
    clf = randomise(SequenceClassifier(encoder(5), 3, pooling=pooling), 5)
    x = T(rng.standard_normal((2, 4, 8)), requires_grad=True)
    pad = T(np.array([[False] * 4, [False, False, True, True]]))
    labels = T(np.array([2, 0]))
    assert gradcheck_module(clf, [x, labels, pad], directions=2)          # logits and loss


def test_gradcheck_gpt_classifier_parameters():
    rng = np.random.default_rng(6)
    clf = randomise(SequenceClassifier(gpt(6), 3, pad_id=0), 6)
    idx, labels = T(right_padded(rng, [5, 3])), T(np.array([1, 2]))
    assert gradcheck_module(clf, [idx, labels], directions=2)


def test_fine_tuning_reaches_the_backbone():
    rng = np.random.default_rng(7)
    clf = SequenceClassifier(gpt(7), 2, pad_id=0)
    _, loss = clf(T(right_padded(rng, [6, 2])), T(np.array([0, 1])))
    loss.backward()
    assert all(p.grad is not None for p in clf.parameters())
    assert len(clf.trainable_parameters()) == len(clf.parameters())


def test_freeze_backbone_is_a_linear_probe_that_still_trains():
    rng = np.random.default_rng(8)
    clf = SequenceClassifier(gpt(8, random=False), 2, pad_id=0, generator=nf.random.Generator(8))
    assert clf.freeze_backbone() is clf
    idx, labels = T(right_padded(rng, [6, 5, 3, 2])), T(np.array([0, 1, 1, 0]))
    before = {n: host(p).copy() for n, p in clf.backbone.named_parameters()}
    assert clf.trainable_parameters() == [clf.head.weight, clf.head.bias]
    opt = SGD(clf.trainable_parameters(), lr=2.0, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        _, loss = clf(idx, labels)
        loss.backward()
        assert all(p.grad is None for p in clf.backbone.parameters())
        assert clf.head.weight.grad is not None and np.abs(host(clf.head.weight.grad)).max() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for n, p in clf.backbone.named_parameters():
        np.testing.assert_array_equal(host(p), before[n], err_msg=n)
    clf.unfreeze_backbone()
    clf(idx, labels)[1].backward()
    assert clf.backbone.transformer.wte.weight.grad is not None


# ----------------------------------------------------------------------------- errors

def test_errors():
    rng = np.random.default_rng(9)
    with pytest.raises(TypeError, match="backbone must be a GPT, a Seq2SeqTransformer or an nn.TransformerEncoder; "
                                        "got Linear"):
        SequenceClassifier(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="num_classes must be a positive integer; got 0"):
        SequenceClassifier(gpt(), 0)
    with pytest.raises(ValueError, match="pooling must be 'last' or 'mean'; got 'max'"):
        SequenceClassifier(gpt(), 2, pooling="max")
    clf = SequenceClassifier(gpt(), 2, pad_id=0)
    left = right_padded(rng, [6, 4])[:, ::-1].copy()                     # row 1 is left-padded
    with pytest.raises(ValueError, match="needs right padding, but row 1 has a token after padding"):
        clf(T(left))
    empty = right_padded(rng, [6, 0])
    with pytest.raises(ValueError, match="row 1 has no non-pad tokens to pool"):
        clf(T(empty))
    with pytest.raises(ValueError, match=r"pad_mask must be bool \(B, T\) = \(2, 6\); got bool \(2, 5\)"):
        clf(T(right_padded(rng, [6, 4])), pad_mask=T(np.zeros((2, 5), bool)))
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\) = \(2,\); got \(2, 1\)"):
        clf(T(right_padded(rng, [6, 4])), T(np.zeros((2, 1), int)))
    with pytest.raises(ValueError, match=r"idx must be \(B, T\) token ids; got shape \(6,\)"):
        clf(T(np.arange(6)))
    with pytest.raises(ValueError, match=r"takes embedded vectors \(B, T, C\); got shape \(2, 6\)"):
        SequenceClassifier(encoder(), 2)(T(right_padded(rng, [6, 4]).astype(float)))
