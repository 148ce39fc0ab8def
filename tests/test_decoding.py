"""Beam search: beam size 1 is greedy decoding token for token, wider beams never score below the
greedy hypothesis, the KV cache (reindexed per beam) changes nothing, reported scores are the
GNMT-penalised log-probabilities of the returned tokens, early stopping, and argument errors."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer as nf
from npformer.data.tasks import CopyTask, TaskTokenizer, make_batch
from npformer.models import Seq2SeqConfig, Seq2SeqTransformer
from npformer.models.decoding import beam_search, gnmt_length_penalty, score_hypotheses
from npformer.optim import Adam
from npformer.training.seq2seq import loss_fn
from tests.helpers import DEVICE, T, host

BOS, EOS = 1, 2


def make(seed=0, dtype=np.float64, scale=0.5):
    """A small model with N(0, scale^2) weights (peaked enough that hypotheses end at different lengths)."""
    cfg = Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=9, d_model=16, nhead=2, num_encoder_layers=2,
                        num_decoder_layers=2, dim_feedforward=24, dropout=0.0, max_len=14)
    model = Seq2SeqTransformer(cfg, generator=nf.random.Generator(seed), dtype=dtype, device=DEVICE)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * scale)
    return model


def source(seed, B=4, S=7):
    rng = np.random.default_rng(seed + 100)
    src = rng.integers(1, 13, (B, S))
    src[1, S // 2:] = 0                                                     # one padded row
    return src


@pytest.fixture(scope="module")
def trained():
    """A float64 model trained for 60 steps on copy (lengths 1..6): half-learned, so greedy and beam
    outputs differ and end at many lengths. Returns (model, a function seed -> (B, S) sources)."""
    task = CopyTask(max_len=6)
    tok = TaskTokenizer.for_task(task)
    cfg = Seq2SeqConfig(tok.src_vocab_size, tok.tgt_vocab_size, d_model=16, nhead=2, num_encoder_layers=1,
                        num_decoder_layers=1, dim_feedforward=32, dropout=0.0, max_len=10)
    model = Seq2SeqTransformer(cfg, generator=nf.random.Generator(0), dtype=np.float64, device=DEVICE)
    opt = Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    rng = np.random.default_rng(0)
    for _ in range(60):
        src, tgt_in, tgt_out = (T(a).data for a in make_batch(tok, task.batch(rng, 32)))
        loss_fn(model, src, tgt_in, tgt_out, 0.1).backward()
        opt.step()
        opt.zero_grad()
    return model, lambda seed: T(make_batch(tok, task.batch(np.random.default_rng(seed), 12))[0])


@settings(max_examples=6)
@given(st.integers(0, 10_000), st.sampled_from([np.float64, np.float32]), st.booleans(), st.sampled_from([3, 12]))
def test_beam_size_one_is_greedy_decoding_for_random_models(seed, dtype, use_cache, max_new):
    model, src = make(seed, dtype), T(source(seed))
    greedy = model.greedy_decode(src, BOS, max_new, eos_id=EOS, use_cache=use_cache)
    got, scores = beam_search(model, src, BOS, EOS, beam_size=1, length_penalty=0.6, max_new_tokens=max_new,
                              use_cache=use_cache)
    np.testing.assert_array_equal(got, greedy)
    assert got.dtype == np.int64 and scores.shape == (4,) and np.isfinite(scores).all()


@settings(max_examples=6)
@given(st.integers(0, 10_000), st.booleans())
def test_beam_size_one_is_greedy_decoding_for_a_trained_model(trained, seed, use_cache):
    model, sources = trained
    src = sources(seed)
    greedy = model.greedy_decode(src, BOS, 9, eos_id=EOS, use_cache=use_cache)
    np.testing.assert_array_equal(beam_search(model, src, BOS, EOS, beam_size=1, use_cache=use_cache)[0], greedy)
    assert len({int(np.argmax(row == EOS)) for row in greedy}) > 1            # outputs of several lengths


@settings(max_examples=10)
@given(st.integers(0, 10_000), st.sampled_from([2, 3, 5]), st.sampled_from([0.0, 0.6, 1.5]))
def test_beam_never_scores_below_greedy_and_cache_changes_nothing(trained, seed, K, alpha):
    model, sources = trained
    src = sources(seed)
    beam, scores = beam_search(model, src, BOS, EOS, beam_size=K, length_penalty=alpha)
    beam_nc, scores_nc = beam_search(model, src, BOS, EOS, beam_size=K, length_penalty=alpha, use_cache=False)
    np.testing.assert_array_equal(beam, beam_nc)
    np.testing.assert_allclose(scores, scores_nc, rtol=1e-10, atol=1e-12)
    # the reported score is the penalised log-probability of the returned tokens, by teacher forcing
    np.testing.assert_allclose(scores, score_hypotheses(model, src, beam, EOS, alpha), rtol=1e-9, atol=1e-12)
    greedy = score_hypotheses(model, src, model.greedy_decode(src, BOS, 9, eos_id=EOS), EOS, alpha)
    assert (scores >= greedy - 1e-9).all(), (scores, greedy)
    for row in beam:                               # BOS, tokens, then only padding after EOS
        assert row[0] == BOS
        ends = np.flatnonzero(row == EOS)
        assert ends.size == 0 or (row[ends[0] + 1:] == 0).all()


def test_wider_beams_find_better_hypotheses(trained):
    """Beam search is not a no-op: on the half-trained model it beats greedy on some rows."""
    model, sources = trained
    src = sources(1)
    _, scores = beam_search(model, src, BOS, EOS, beam_size=4, length_penalty=0.6)
    greedy = score_hypotheses(model, src, model.greedy_decode(src, BOS, 9, eos_id=EOS), EOS, 0.6)
    assert (scores > greedy + 1e-6).sum() >= 2


def test_cache_select_reindexes_rows():
    """decode after cache.select(rows) == decode with a fresh cache on the reindexed batch."""
    model = make(3)
    rng = np.random.default_rng(3)
    src, tgt = source(3, B=3), rng.integers(3, 9, (3, 4))
    rows = np.array([2, 0, 2, 1])
    mem, pad = model.encode(T(src)), model.pad_mask(T(src))
    cache = model.new_cache()
    model.decode(T(tgt[:, :3]), mem, pad, cache)
    cache.select(T(rows).data)
    mem_r, pad_r = nf.Tensor(mem.data[T(rows).data]), pad[T(rows).data]
    got = model.decode(T(tgt[rows, 3:]), mem_r, pad_r, cache)
    fresh = model.new_cache()
    model.decode(T(tgt[rows, :3]), mem_r, pad_r, fresh)
    want = model.decode(T(tgt[rows, 3:]), mem_r, pad_r, fresh)
    np.testing.assert_allclose(host(got), host(want), rtol=1e-12, atol=1e-12)
    assert cache.length == 4 and cache.self_k[0].shape[0] == 4 and cache.tgt_pad.shape == (4, 4)


# ----------------------------------------------------------------------------- a hand-made distribution

class TableModel:
    """A stand-in for Seq2SeqTransformer whose next-token distribution is a table keyed by the tokens
    generated so far (uniform over ids 2..6 for prefixes not in the table). Uncached decoding only."""

    def __init__(self, table, V=7, max_len=12):
        self.config = SimpleNamespace(tgt_vocab_size=V, max_len=max_len, pad_id=0)
        self.table, self.training, self.calls = table, False, 0

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def encode(self, src):
        return nf.Tensor(np.zeros((len(src), 1, 1)))

    def pad_mask(self, src):
        return np.asarray(src) == 0

    def new_cache(self):
        raise AssertionError("TableModel decodes without a cache")

    def decode(self, tgt_in, memory, src_pad, cache=None):
        self.calls += 1
        V = self.config.tgt_vocab_size
        logits = np.full((len(tgt_in), tgt_in.shape[1], V), -30.0)
        for r, row in enumerate(np.asarray(tgt_in)):
            probs = self.table.get(tuple(row[1:].tolist()), {t: 0.2 for t in range(2, 7)})
            for t, p in probs.items():
                logits[r, -1, t] = math.log(p)
        return nf.Tensor(logits)


A, B_, C, D = 3, 4, 5, 6
# greedy: A (0.55) then EOS (0.4): P = 0.22. Both extensions of B (0.45 * 0.49 = 0.2205 each) beat
# A EOS, so plain beam search with K = 2 drops the greedy path and ends far below 0.22.
TABLE = {(): {A: 0.55, B_: 0.45}, (A,): {EOS: 0.4, C: 0.3, D: 0.3}, (B_,): {C: 0.49, D: 0.49, EOS: 0.02}}


def test_greedy_path_survives_when_better_extensions_push_it_out():
    model = TableModel(TABLE)
    tokens, scores = beam_search(model, np.ones((1, 3), dtype=np.int64), BOS, EOS, beam_size=2,
                                 length_penalty=0.0, max_new_tokens=10, use_cache=False)
    assert tokens.tolist() == [[BOS, A, EOS]]
    assert scores[0] == pytest.approx(math.log(0.55 * 0.4), rel=1e-9)
    # early stop: after step 3 the best live hypothesis (<= 0.2205 * 0.2) cannot beat 0.22
    assert model.calls == 3


def test_length_penalty_prefers_longer_hypotheses():
    """EOS now (P = 0.5) vs three more tokens (P = 0.5 * 0.9^2 * 0.95): alpha decides, as ((5+n)/6)^alpha says."""
    table = {(): {EOS: 0.5, A: 0.5}, (A,): {C: 0.9, EOS: 0.1}, (A, C): {D: 0.9, EOS: 0.1},
             (A, C, D): {EOS: 0.95, C: 0.05}}
    src = np.ones((1, 2), dtype=np.int64)
    short, s0 = beam_search(TableModel(table), src, BOS, EOS, beam_size=3, length_penalty=0.0, use_cache=False)
    long_, s2 = beam_search(TableModel(table), src, BOS, EOS, beam_size=3, length_penalty=2.0, use_cache=False)
    assert short.tolist() == [[BOS, EOS]] and s0[0] == pytest.approx(math.log(0.5))
    logp = math.log(0.5 * 0.9 * 0.9 * 0.95)
    assert long_.tolist() == [[BOS, A, C, D, EOS]]
    long_score = logp / gnmt_length_penalty(4, 2.0)                    # ((5 + 4) / 6)^2 = 2.25
    assert s2[0] == pytest.approx(long_score) and long_score > math.log(0.5) > logp
    assert gnmt_length_penalty(1, 0.6) == 1.0 and gnmt_length_penalty(7, 1.0) == 2.0


def test_unfinished_hypotheses_are_returned_at_max_new_tokens():
    table = {(): {A: 0.9, EOS: 0.1}, (A,): {A: 0.9, EOS: 0.1}, (A, A): {A: 0.9, EOS: 0.1}}
    tokens, scores = beam_search(TableModel(table), np.ones((1, 2), dtype=np.int64), BOS, EOS, beam_size=2,
                                 length_penalty=0.0, max_new_tokens=3, use_cache=False)
    assert tokens.tolist() == [[BOS, A, A, A]] and scores[0] == pytest.approx(3 * math.log(0.9))
    tokens, scores = beam_search(TableModel(table), np.ones((2, 2), dtype=np.int64), BOS, EOS, max_new_tokens=0,
                                 use_cache=False)
    assert tokens.tolist() == [[BOS], [BOS]] and scores.tolist() == [0.0, 0.0]


def test_argument_errors_and_mode_restored():
    model, src = make(0), T(source(0))
    model.train()
    for kw, match in [(dict(beam_size=0), "beam_size must be an integer >= 1"),
                      (dict(max_new_tokens=14), r"1 \+ max_new_tokens = 15 exceeds max_len 14"),
                      (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
                      (dict(eos_id=9), "eos_id 9 is outside the target vocabulary of 9"),
                      (dict(length_penalty=float("nan")), "length_penalty must be a finite number; got nan"),
                      (dict(length_penalty=float("inf")), "length_penalty must be a finite number; got inf")]:
        with pytest.raises(ValueError, match=match):
            beam_search(model, src, **{"bos_id": BOS, "eos_id": EOS, **kw})
    beam_search(model, src, BOS, EOS, beam_size=2, max_new_tokens=3)
    assert model.training                                                  # eval inside, training again after
