"""The toy language: exact entropy rate vs the true model's empirical loss, the state chain, parsing."""

import math

import numpy as np
import pytest

from npformer.data.corpus import (ToyLanguage, check_ergodic, default_corpus,
                                  stationary_distribution)


@pytest.fixture(scope="module")
def lang():
    return ToyLanguage(seed=0)


@pytest.fixture(scope="module")
def sample(lang):
    return lang.generate(600_000, seed=11)


def test_entropy_rate_matches_true_model_log_loss(lang, sample):
    rate = lang.entropy_rate()
    assert 0.45 < rate < 1.0
    emp = lang.log_loss(sample)            # -sum log P(token | state) / characters
    assert abs(emp - rate) / rate < 0.01, (emp, rate)


def test_entropy_rate_formula_by_hand(lang):
    pi = lang.stationary()
    num = sum(pi[s] * -sum(p * math.log(p) for p in lang.probs[s]) for s in range(len(pi)))
    den = sum(pi[s] * sum(p * len(t) for p, t in zip(lang.probs[s], lang.tokens[s]))
              for s in range(len(pi)))
    assert lang.entropy_rate() == pytest.approx(num / den, rel=1e-12)


def test_stationary_distribution(lang, sample):
    pi = lang.stationary()
    P = lang.P
    assert np.allclose(P.sum(1), 1.0, atol=1e-12) and (P >= 0).all()
    assert (pi > 0).all() and pi.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(pi @ P, pi, atol=1e-13)
    # the long-run state frequencies of a sample agree with pi
    states, _ = lang.parse(sample)
    freq = np.bincount(states, minlength=len(pi)) / len(states)
    np.testing.assert_allclose(freq, pi, atol=0.004)
    # pi is the limit of the chain from any start (aperiodic + irreducible)
    Pn = np.linalg.matrix_power(P, 512)
    np.testing.assert_allclose(Pn, np.tile(pi, (len(pi), 1)), atol=1e-9)


def test_check_ergodic_rejects_bad_chains():
    check_ergodic(np.array([[0.5, 0.5], [1.0, 0.0]]))                  # fine: has a self loop
    with pytest.raises(ValueError, match="periodic with period 2"):
        check_ergodic(np.array([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="periodic with period 3"):
        check_ergodic(np.roll(np.eye(3), 1, axis=1))
    with pytest.raises(ValueError, match="not irreducible"):
        check_ergodic(np.array([[0.5, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="no strictly positive"):
        stationary_distribution(np.array([[0.5, 0.5], [0.0, 1.0]]))


def test_language_is_unifilar_and_vocabulary(lang):
    for s, toks in enumerate(lang.tokens):
        assert len(set(toks)) == len(toks)                              # token -> one next state
        assert len(toks) == len(lang.next_state[s]) == len(lang.probs[s])
        assert lang.probs[s].sum() == pytest.approx(1.0, abs=1e-12)
    vocab = lang.vocabulary
    assert 40 <= len(vocab) <= 80 and len(vocab) == len(set(vocab))
    assert {"the", "cat", "cats", "sees", "see", "near", "quickly", "big"} <= set(vocab)


def test_generate_is_seeded_exact_length_and_parses(lang):
    a = lang.generate(5000, seed=1)
    assert len(a) == 5000 and a == lang.generate(5000, seed=1) and a != lang.generate(5000, seed=2)
    assert lang.generate(0) == ""
    assert set(a) <= set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.\n")
    assert a[0].isupper() and "  " not in a and " ." not in a
    states, picks = lang.parse(a)                       # the text decodes back into its tokens
    tokens = [lang.tokens[s][j] for s, j in zip(states, picks)]
    assert a.startswith("".join(tokens)) and len(a) - len("".join(tokens)) < 12
    # every sentence: capitalised first word, words separated by single spaces, ends with "."
    for sentence in a.replace("\n", " ").split(". ")[:-1]:
        words = sentence.split(" ")
        assert words[0][0].isupper() and all(w.isalpha() and w.islower() for w in words[1:])
        assert 3 <= len(words) <= 16


def test_parse_rejects_ungrammatical_text(lang):
    with pytest.raises(ValueError, match="cannot follow"):
        lang.parse("The cat see a dog. ")                # agreement: "cat" needs "sees"
    with pytest.raises(ValueError, match="cannot follow"):
        lang.parse("A cats sleep. ")                     # "a" is singular
    states, picks = lang.parse("The cat sees a dog. The ca")   # trailing partial token dropped
    assert len(states) == 7


def test_language_seed_changes_probabilities_not_grammar():
    a, b = ToyLanguage(seed=0), ToyLanguage(seed=1)
    assert a.states == b.states and a.tokens == b.tokens
    assert any(not np.allclose(p, q) for p, q in zip(a.probs, b.probs))
    assert a.entropy_rate() != b.entropy_rate()
    with pytest.raises(ValueError, match="newline_prob"):
        ToyLanguage(newline_prob=0.0)


def test_windowed_loss_starts_high_and_reaches_the_rate(lang):
    rate = lang.entropy_rate()
    curve = lang.windowed_loss(64, n_windows=256, seed=0)
    assert curve.shape == (64,)
    # target 0 sees one character: ~1.8 nats; the curve falls as context grows
    assert curve[0] > 1.5 and curve[0] > curve[1] > curve[2] > curve[8]
    assert 1.03 * rate < curve.mean() < 1.12 * rate                      # the block-64 floor
    # with the whole window in view the loss is the entropy rate (8k chars: a few % noise)
    assert abs(curve[32:].mean() - rate) / rate < 0.05


def test_default_corpus():
    train, val = default_corpus(n_train=20_000, n_val=2_000)
    assert len(train) == 20_000 and len(val) == 2_000 and train[:2000] != val
    full_train, full_val = default_corpus()
    assert len(full_train) == 1_000_000 and len(full_val) == 100_000
    assert full_train.startswith(train)                  # the same seeded stream
    assert set(full_val) <= set(full_train)              # a char tokenizer from train covers val


def test_context_floor_does_not_grow_with_the_block_size(monkeypatch):
    """pretrain prints the floor in its first line: at --block-size 50000 it must not scan 50000
    positions (it did, for minutes). Past 256 positions the floor is taken at the entropy rate."""
    lang = ToyLanguage(seed=0)
    asked, losses = [], {}                      # the spy keeps what it returned (256 positions take seconds)
    windowed = ToyLanguage.windowed_loss

    def spy(self, n, **kw):
        asked.append(n)
        losses[n] = windowed(self, n, **kw)
        return losses[n].copy()

    monkeypatch.setattr(ToyLanguage, "windowed_loss", spy)
    floor = lang.context_floor(50_000)
    assert asked == [256]
    assert floor == pytest.approx((losses[256].sum() + (50_000 - 256) * lang.entropy_rate()) / 50_000, rel=1e-12)
    assert lang.context_floor(100) == pytest.approx(losses[100].mean(), rel=1e-12)   # exact when short
    assert asked == [256, 100]


def _posterior_by_whole_text(lang, pieces, t):
    """P(token t = w | every other token), w as WordPiece sees it, by the likelihood of the whole text
    with each candidate spliced in (parse + probs: independent of masked_floor's sentence walk)."""
    states, _ = lang.parse("".join(pieces))
    like = {}
    for cand in lang.tokens[states[t]]:
        text = "".join(pieces[:t] + [cand] + pieces[t + 1:])
        try:
            s, j = lang.parse(text)
        except ValueError:
            continue
        if len(s) != len(pieces):
            continue
        key = cand.strip().lower()
        like[key] = like.get(key, 0.0) + math.exp(sum(math.log(lang.probs[a][b]) for a, b in zip(s, j)))
    total = sum(like.values())
    return {k: v / total for k, v in like.items()}


def test_masked_floor_is_the_true_posterior_averaged(lang):
    text = lang.generate(400, seed=5)
    states, picks = lang.parse(text)
    pieces = [lang.tokens[s][j] for s, j in zip(states.tolist(), picks.tolist())]
    last_end = max(i for i, p in enumerate(pieces) if p.strip() == ".")
    cut = "".join(pieces[:last_end + 1])                     # whole sentences only
    # masked_floor over `cut`: generate() is seeded, so rebuild the same tokens through it
    n = len(cut)
    expected = []
    for t in range(last_end + 1):
        nxt_end = [i for i in range(t + 1, len(pieces)) if pieces[i].strip() == "."]
        if not nxt_end:
            break
        post = _posterior_by_whole_text(lang, pieces, t)
        expected.append(-math.log(post[pieces[t].strip().lower()]))
    got = lang.masked_floor(n, seed=5)
    # masked_floor(n, seed) scores the tokens of generate(n, seed), which has a sentence end after each
    # token scored here; both average the same positions
    assert got == pytest.approx(float(np.mean(expected)), rel=1e-9)


def test_masked_floor_lies_below_the_next_token_floor(lang):
    masked = lang.masked_floor(20_000, seed=1)
    per_token = lang.entropy_rate() * 20_000 / len(lang.parse(lang.generate(20_000, seed=1))[0])
    assert 1.2 < masked < per_token - 0.4                   # both sides of a word tell much more than one
    assert lang.masked_floor(20_000, seed=1) == masked      # seeded


def test_token_entropy_is_the_rate_times_characters_per_token(lang):
    pi = lang.stationary()
    _, L = lang.state_entropies()
    assert lang.token_entropy() == pytest.approx(lang.entropy_rate() * float(pi @ L), rel=1e-12)
    # merging ". " and ".\n" removes exactly the line-break choice: H(newline_prob) per sentence end
    p = lang.newline_prob
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    ends = sum(pi[s] * sum(q for t, q in zip(lang.tokens[s], lang.probs[s]) if t.strip() == ".")
               for s in range(len(lang.states)))
    assert lang.token_entropy() - lang.token_entropy(as_wordpiece=True) == pytest.approx(h * ends, rel=1e-9)
