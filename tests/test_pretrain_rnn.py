"""npformer pretrain --model lstm / gru: a recurrent LM on the GPT loop (same batches, loss, checkpoints,
exact resume after Ctrl-C, sampling), its cached generation, and `npformer generate` on its run."""

import collections
import math

import numpy as np
import pytest

from npformer import cli
from npformer.models import RNNLM, RNNLMConfig, RNNState
from npformer.models.sampling import generate
from npformer.training.checkpoint import CheckpointError, load_checkpoint
from npformer.training.loading import load_gpt, load_language_model
from npformer.training.pretrain import pretrain
from npformer.training.stopping import Interrupted
from tests.helpers import signal_at_steps
from tests.test_pretrain import assert_same_checkpoint, losses, quiet, read_metrics, tiny

CELLS = ["lstm", "gru"]


def rnn(tmp_path, cell="lstm", out="run", **kw):
    """tiny()'s settings for an RNNLM: --n-head left at its default (an RNNLM has no heads)."""
    return tiny(tmp_path, out, **{"model": cell, "n_head": 4, **kw})


def toy_model(cell, tie_weights=True, V=11):
    """A float64 RNNLM with large enough weights that the context changes the next-token distribution."""
    config = RNNLMConfig(vocab_size=V, block_size=6, n_layer=2, n_embd=12, cell=cell, tie_weights=tie_weights)
    model = RNNLM(config, generator=np.random.default_rng(0), dtype=np.float64, device="cpu")
    for p in model.parameters():
        p.data *= 4.0
    return model


def unigram_entropy(path) -> float:
    """Nats per character of the validation text (the last tenth) under the training text's character
    frequencies: the loss of a model that ignores the context."""
    text = open(path, encoding="utf-8").read()
    n_val = max(1, len(text) // 10)
    counts = collections.Counter(text[:-n_val])
    total = sum(counts.values())
    return -sum(math.log(counts[ch] / total) for ch in text[-n_val:]) / n_val


def one_line_error(capsys, argv) -> str:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("npformer: ")]
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("npformer: error: "), (rc, out, err)
    return lines[0]


# ----------------------------------------------------------------------------- a run

@pytest.mark.parametrize("cell", CELLS)
def test_a_recurrent_run_learns_and_saves_a_model_that_loads(tmp_path, cell):
    lines = []
    cfg = rnn(tmp_path, cell, n_embd=32, lr=2e-2, min_lr=2e-3, batch_size=8, max_iters=32, eval_interval=8,
              samples=1, sample_tokens=30)
    summary = pretrain(cfg, log=lines.append)
    out = str(tmp_path / "run")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [8, 16, 24, 32]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.2                     # it learns,
    assert records[-1]["val_loss"] < unigram_entropy(cfg.data) - 0.1                 # and from the context
    assert summary["model"] == cell and any(line.startswith(f"model: {cell} ") for line in lines)
    sample = [line for line in lines if line.startswith("--- sample 1 ---")]
    assert len(sample) == 1 and len(sample[0].split("\n", 1)[1]) == 1 + 30    # the first character + 30

    ckpt = load_checkpoint(out)
    assert ckpt.meta["model"] == cell
    config = RNNLMConfig(**ckpt.meta["model_config"])
    assert config == RNNLMConfig(vocab_size=ckpt.tokenizer.vocab_size, block_size=16, n_layer=1, n_embd=32,
                                 cell=cell, dropout=0.0, bias=True, tie_weights=True)
    G = {"lstm": 4, "gru": 3}[cell]
    C, V = 32, config.vocab_size
    assert {k: v.shape for k, v in ckpt.model_state.items()} == {
        "encoder.weight": (V, C), "rnn.weight_ih_l0": (G * C, C), "rnn.weight_hh_l0": (G * C, C),
        "rnn.bias_ih_l0": (G * C,), "rnn.bias_hh_l0": (G * C,), "decoder.weight": (V, C), "decoder.bias": (V,)}
    np.testing.assert_array_equal(ckpt.model_state["decoder.weight"], ckpt.model_state["encoder.weight"])   # tied

    # round trip: the loaded model holds the checkpoint's weights, still tied, in float32, in eval mode
    model, tok = load_language_model(out)
    assert isinstance(model, RNNLM) and not model.training and model.config == config
    assert model.decoder.weight is model.encoder.weight
    for name, value in model.state_dict().items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, ckpt.model_state[name], err_msg=name)
    x = np.asarray(tok.encode("the cat sat on")).reshape(1, -1)
    logits, loss = model(x[:, :-1], x[:, 1:])
    assert logits.shape == (1, x.shape[1] - 1, config.vocab_size) and np.isfinite(loss.item())
    with pytest.raises(CheckpointError, match=f"holds a '{cell}' model, not a GPT"):
        load_gpt(out)                                   # the classifier's loader takes GPTs only


@pytest.mark.parametrize("cell,dropout,workers,k", [("lstm", 0.0, 1, 5), ("gru", 0.2, 1, 7), ("lstm", 0.2, 2, 3)])
def test_sigint_saves_the_step_and_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, cell, dropout,
                                                                       workers, k):
    straight = pretrain(rnn(tmp_path, cell, "a", dropout=dropout, workers=workers), log=quiet)
    signal_at_steps(monkeypatch, {k})
    with pytest.raises(Interrupted) as info:
        pretrain(rnn(tmp_path, cell, "b", dropout=dropout, workers=workers), log=quiet)
    assert (info.value.step, info.value.exit_code) == (k, 130)
    assert load_checkpoint(str(tmp_path / "b")).step == k
    monkeypatch.undo()
    resumed = pretrain(rnn(tmp_path, cell, "b", dropout=dropout, workers=workers, resume=True), log=quiet)
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))         # weights and AdamW state, bit for bit
    assert resumed["val_loss"] == straight["val_loss"] and resumed["best_val"] == straight["best_val"]
    assert losses(read_metrics(tmp_path / "a")) == losses(read_metrics(tmp_path / "b"))


# ----------------------------------------------------------------------------- the model

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tie_weights", [True, False])
def test_parameters_and_their_count(cell, tie_weights):
    model = toy_model(cell, tie_weights)
    V, C, L, G = 11, 12, 2, {"lstm": 4, "gru": 3}[cell]
    expected = V * C * (1 if tie_weights else 2) + L * (2 * G * C * C + 2 * G * C) + V
    assert model.num_parameters() == expected
    assert (model.decoder.weight is model.encoder.weight) == tie_weights
    assert np.all(model.decoder.bias.data == 0) and np.abs(model.encoder.weight.data).max() <= 0.4   # U(-0.1, 0.1) x 4
    same = RNNLM(model.config, generator=np.random.default_rng(0), dtype=np.float64, device="cpu")
    other = RNNLM(model.config, generator=np.random.default_rng(1), dtype=np.float64, device="cpu")
    w = model.rnn.weight_hh_l1.data
    assert np.array_equal(same.rnn.weight_hh_l1.data * 4, w) and not np.array_equal(other.rnn.weight_hh_l1.data * 4, w)


@pytest.mark.parametrize("cell", CELLS)
def test_the_state_carries_the_sequence_one_token_at_a_time(cell):
    """Feeding the tokens one by one with an RNNState gives the logits of one pass over the whole sequence."""
    model = toy_model(cell).eval()
    ids = np.random.default_rng(1).integers(0, 11, (3, 9))
    whole, _ = model(ids)                                             # (3, 9, 11) from a zero state
    state = RNNState()
    steps = [model(ids[:, :4], state=state)[0].data]                  # a prompt of 4, then one token at a time
    for t in range(4, 9):
        steps.append(model(ids[:, t:t + 1], state=state)[0].data)
    assert state.length == 9 and state.h.shape == (2, 3, 12) and (state.c is None) == (cell == "gru")
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole.data, rtol=0, atol=1e-12)
    # and the context matters: the same last token after another prefix gives other logits
    assert np.abs(model(ids[:, 4:])[0].data[:, -1] - whole.data[:, -1]).max() > 1e-3


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8)])
def test_cached_generation_equals_rerunning_the_prefix(cell, options):
    model = toy_model(cell)
    calls = []
    forward = model.forward

    def counting(idx, *args, **kwargs):
        calls.append(idx.shape[1])
        return forward(idx, *args, **kwargs)
    model.forward = counting
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    cached = generate(model, prompt, 12, seed=5, **options)
    cached_calls, calls[:] = list(calls), []
    uncached = generate(model, prompt, 12, seed=5, use_cache=False, **options)
    np.testing.assert_array_equal(cached, uncached)               # token for token, past block_size 6 too
    assert cached_calls == [3] + [1] * 11                          # each new token costs one step
    assert calls == list(range(3, 15))                             # without the cache: the whole prefix
    # a window, as a LLaMA's: past it every step reruns the last 6 tokens from a zero state, cached or not
    windowed = generate(model, prompt, 12, seed=5, window=6, **options)
    np.testing.assert_array_equal(windowed, generate(model, prompt, 12, seed=5, window=6, use_cache=False, **options))
    assert np.array_equal(windowed[:, :6], cached[:, :6]) and not np.array_equal(windowed, cached)
    assert model.training                                          # generate restored the mode


# ----------------------------------------------------------------------------- npformer generate

@pytest.fixture(scope="module")
def gru_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gru")
    pretrain(rnn(root, "gru", max_iters=8), log=quiet)
    return str(root / "run")


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_npformer_generate_samples_the_run(gru_run, capsys, cache):
    prompt = "the cat sat on a mat and the dog ran"                 # longer than block_size 16: not cropped
    argv = ["generate", "--ckpt", gru_run, "--prompt", prompt, "--max-new-tokens", "25", "--seed", "4",
            "--top-k", "5", cache]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    model, tok = load_language_model(gru_run)
    ids = tok.encode(prompt).reshape(1, -1)
    want = generate(model, ids, 25, temperature=0.8, top_k=5, seed=4)
    assert out == prompt + tok.decode(want[0, ids.shape[1]:]) + "\n"


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags, message", [
    (["--model", "rnn"], "--model must be one of gpt, bert, llama, lstm, gru; got 'rnn'"),
    (["--model", "lstm", "--n-head", "2"], "--n-head is a Transformer option: --model lstm has no attention heads"),
    (["--model", "gru", "--n-kv-head", "2"], "--n-kv-head is a LLaMA option"),
    (["--model", "gru", "--max-positions", "64"], "--max-positions is a BERT option"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    line = one_line_error(capsys, ["pretrain", *flags, "--out", out])
    assert message in line
    assert not out.exists()


def test_an_rnn_needs_no_divisible_width(tmp_path):
    cfg = rnn(tmp_path, n_embd=18).checked()                        # 18 is not a multiple of --n-head 4
    assert (cfg.model, cfg.n_embd) == ("lstm", 18)


@pytest.mark.parametrize("field, value, message", [
    ("cell", "rnn", "RNNLMConfig.cell must be 'lstm' or 'gru'; got 'rnn'"),
    ("n_layer", 0, "RNNLMConfig.n_layer must be a positive integer"),
    ("dropout", 1.0, "RNNLMConfig.dropout must be in"),
    ("tie_weights", "yes", "RNNLMConfig.tie_weights must be True or False"),
])
def test_bad_configs_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        RNNLMConfig(**{"vocab_size": 5, "block_size": 4, field: value})


def test_a_checkpoint_whose_cell_disagrees_is_refused(gru_run, monkeypatch):
    from npformer.training import loading
    real = loading.load_checkpoint

    def relabelled(*args, **kwargs):                                # the meta says lstm, the config gru
        ckpt = real(*args, **kwargs)
        ckpt.meta["model"] = "lstm"
        return ckpt
    monkeypatch.setattr(loading, "load_checkpoint", relabelled)
    with pytest.raises(CheckpointError, match="says 'lstm' but its model_config has cell 'gru'"):
        load_language_model(gru_run)


def test_bad_model_input_names_the_shape():
    model = toy_model("lstm")
    with pytest.raises(ValueError, match=r"RNNLM: idx must have shape \(B, T\) with T >= 1; got \(4,\)"):
        model(np.arange(4))
    state = RNNState()
    model(np.zeros((2, 3), dtype=np.int64), state=state)
    with pytest.raises(ValueError, match="LSTM: h_0 has shape"):               # a state of another batch
        model(np.zeros((1, 1), dtype=np.int64), state=state)
