"""training/floors.py: which floor a pretraining run is measured against, and the lines that print it."""

import pytest

from npformer.data import ToyLanguage
from npformer.training.floors import Floors


@pytest.fixture(scope="module")
def lang():
    return ToyLanguage(seed=0)


def test_a_character_gpt_gets_the_entropy_rate_and_the_floor_for_its_context(lang):
    f = Floors.of_run("gpt", "char", 64, builtin=True)
    assert (f.per_char, f.per_token, f.masked) == (lang.entropy_rate(), None, False)
    assert f.context == lang.context_floor(64) and f.context > f.per_char
    assert f.describe(64) == (f"; entropy floor {f.per_char:.4f} nats/char ({f.context:.4f} with 64 characters "
                              f"of context)")
    # the loss is per token: 2 characters per token halve it before it meets the per-character floor
    loss = 2 * 1.1 * f.per_char
    assert f.gap_percent(loss, chars_per_token=2.0) == pytest.approx(10.0, rel=1e-12)
    assert f.eval_suffix(loss, 2.0) == f" (floor {f.per_char:.4f}, gap 10.0%)"
    assert f.done_suffix(loss, 2.0) == f" nats/char vs entropy floor {f.per_char:.4f} (+10.0%)"


def test_bpe_tokens_are_measured_per_character_without_a_context_floor(lang):
    f = Floors.of_run("gpt", "bpe", 64, builtin=True)
    assert (f.per_char, f.context, f.per_token) == (lang.entropy_rate(), None, None)
    assert f.describe(64) == f"; entropy floor {f.per_char:.4f} nats/char"


@pytest.mark.parametrize("model, kind", [("gpt", "entropy"), ("bert", "masked-token")])
def test_wordpiece_runs_are_measured_per_token(lang, model, kind):
    f = Floors.of_run(model, "wordpiece", 96, builtin=True)
    expected = lang.masked_floor() if model == "bert" else lang.token_entropy(as_wordpiece=True)
    assert (f.per_token, f.per_char, f.context, f.masked) == (expected, None, None, model == "bert")
    assert f.describe(96) == f"; {kind} floor {expected:.4f} nats/token"
    loss = 0.95 * expected                                 # below the floor: the gap is negative, and shown so
    assert f.gap_percent(loss, chars_per_token=3.0) == pytest.approx(-5.0, rel=1e-12)
    assert f.done_suffix(loss, 3.0) == f" nats/token vs floor {expected:.4f} (-5.0%)"


def test_other_data_has_no_floor():
    f = Floors.of_run("gpt", "char", 64, builtin=False)
    assert f == Floors() and f.value is None
    assert f.describe(64) == f.eval_suffix(1.0, 1.0) == f.done_suffix(1.0, 1.0) == ""
