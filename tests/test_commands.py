"""The subcommands in npformer.commands: ``generate`` streams its text token by token, every flag's
--help shows its default, ``translate`` reads numbers and dates as their tasks write them and refuses
a non-finite --length-penalty; and ``import npformer`` gives nf.nn, nf.optim, ... on first use."""

import argparse
import importlib
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from npformer.cli import main
from npformer.commands.generate import TextStream
from npformer.data import ByteBPETokenizer, CharTokenizer
from npformer.data.tasks import DatesTask, NumbersTask
from npformer.models import GPT, GPTConfig
from npformer.models.decoding import beam_search, score_hypotheses
from npformer.models.sampling import generate
from npformer.training.loading import load_gpt
from npformer.training.seq2seq import Seq2SeqTrainConfig, load_seq2seq, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRETRAIN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
            "--max-iters", "4", "--warmup-iters", "1", "--eval-interval", "4", "--eval-iters", "1",
            "--samples", "0", "--device", "cpu"]
SEQ2SEQ = dict(d_model=16, nhead=2, num_layers=1, dim_feedforward=32, dropout=0.0, batch_size=8, max_iters=4,
               warmup=2, n_test=4, device="cpu")
ASCII_TEXT = "the cat sat on the mat. a dog ran to the big red barn and sat down.\n" * 30
# multi-byte characters, so that byte-level BPE tokens can end inside a character
UNICODE_TEXT = "the café in Zürich serves crème brûlée — 東京 and 😀 too. " * 12



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny finished runs, made once: {"char", "bpe": GPT run dirs; "numbers", "dates": seq2seq run dirs}."""
    root = tmp_path_factory.mktemp("commands")
    out = {"char": str(root / "char"), "bpe": str(root / "bpe")}
    (root / "ascii.txt").write_text(ASCII_TEXT, encoding="utf-8")
    (root / "unicode.txt").write_text(UNICODE_TEXT, encoding="utf-8")
    assert main(["pretrain", *PRETRAIN, "--data", str(root / "ascii.txt"), "--out", out["char"]]) == 0
    assert main(["pretrain", *PRETRAIN, "--data", str(root / "unicode.txt"), "--tokenizer", "bpe",
                 "--vocab-size", "280", "--out", out["bpe"]]) == 0
    for task in ("numbers", "dates"):
        out[task] = str(root / task)
        train(Seq2SeqTrainConfig(task=task, out=out[task], **SEQ2SEQ), log=lambda *a: None)
    return out


class Recorder(io.StringIO):
    """A text stream that keeps a snapshot of everything written at each flush."""

    def __init__(self):
        super().__init__()
        self.snapshots = []

    def flush(self):
        self.snapshots.append(self.getvalue())
        super().flush()


def streamed_generate(monkeypatch, *argv):
    """(stdout, its flush snapshots) of `npformer generate ARGV`, with a Recorder as sys.stdout."""
    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    assert main(["generate", *[str(a) for a in argv]]) == 0
    monkeypatch.undo()
    return rec.getvalue(), rec.snapshots


def expected_text(ckpt, prompt, n, seed, **kw):
    """prompt + the decode of the n tokens sampled after it: what the non-streamed command printed."""
    model, tok = load_gpt(ckpt, device="cpu")
    ids = tok.encode(prompt)[-model.config.block_size:]
    out = generate(model, ids[None], n, seed=seed, **kw)
    return prompt + tok.decode(out[0, len(ids):]), out[0, len(ids):], tok


def cli_error(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("npformer: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- generate: streaming

@pytest.mark.parametrize("use_cache", [True, False])
def test_on_token_sees_every_new_token_and_changes_nothing(use_cache):
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=16), device="cpu")
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    seen = []
    got = generate(model, idx, 9, seed=3, top_k=5, use_cache=use_cache, on_token=seen.append)
    want = generate(model, idx, 9, seed=3, top_k=5, use_cache=not use_cache)   # also past block_size 6
    np.testing.assert_array_equal(got, want)
    assert len(seen) == 9                                     # once per new token
    for i, step in enumerate(seen):
        assert step.shape == (2,) and step.dtype == np.int64
        np.testing.assert_array_equal(step, got[:, 3 + i])
    seen[0][:] = -1                                           # the callback's array is its own
    assert (got[:, 3] >= 0).all()


def test_text_stream_holds_back_split_utf8_characters():
    tok = ByteBPETokenizer()                                  # untrained: one token per byte
    ids = list("aé€😀b".encode("utf-8")) + [0xFF, ord("c")] + list("😀".encode("utf-8"))[:3]
    rec = Recorder()
    stream = TextStream(tok, file=rec)
    pieces = []
    for i in ids:
        before = rec.getvalue()
        stream(np.array([i]))
        pieces.append(rec.getvalue()[len(before):])
    assert stream.end() == rec.getvalue() == tok.decode(ids) == "aé€😀b\ufffdc\ufffd"
    # each character appears whole, on the token that completes it; the lone 0xFF byte when "c" follows it
    assert [p for p in pieces if p] == ["a", "é", "€", "😀", "b", "\ufffdc"]
    assert rec.snapshots[-1] == rec.getvalue()                # flushed after every write


def test_text_stream_of_characters_prints_each_token_at_once():
    tok = CharTokenizer("abc")
    rec = Recorder()
    stream = TextStream(tok, file=rec)
    for i in tok.encode("cab"):
        stream(np.array([i]))
    assert rec.snapshots == ["c", "ca", "cab"] and stream.end() == "cab"


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_generate_streams_the_text_it_would_print(runs, monkeypatch, cache):
    prompt = "the cat sat on a mat and the dog"                     # longer than block_size 16
    out, snapshots = streamed_generate(monkeypatch, "--ckpt", runs["char"], "--prompt", prompt,
                                       "--max-new-tokens", 20, "--seed", 4, *cache)
    text, _, _ = expected_text(runs["char"], prompt, 20, seed=4, temperature=0.8)
    assert out == text + "\n"
    # flushed while generating: the prompt alone, then one more character per token
    partial = [s for s in snapshots if s != out]
    assert partial[:21] == [prompt + text[len(prompt):len(prompt) + k] for k in range(21)]


def test_generate_streams_byte_level_bpe_exactly(runs, monkeypatch):
    prompt = "the café"
    out, snapshots = streamed_generate(monkeypatch, "--ckpt", runs["bpe"], "--prompt", prompt,
                                       "--max-new-tokens", 60, "--temperature", 3, "--seed", 1)
    text, new, tok = expected_text(runs["bpe"], prompt, 60, seed=1, temperature=3.0)
    assert out == text + "\n"
    # the sample does split characters: a naive decode of each prefix would not be a prefix of the text
    assert any(not text.startswith(prompt + tok.decode(new[:k])) for k in range(1, 60))
    assert all(out.startswith(s) for s in snapshots)          # nothing printed was taken back
    assert len(set(snapshots)) > 10


def test_generate_streams_each_sample_under_its_header(runs, monkeypatch):
    out, snapshots = streamed_generate(monkeypatch, "--ckpt", runs["char"], "--prompt", "the ",
                                       "--max-new-tokens", 8, "--num-samples", 2, "--seed", 7)
    samples = [expected_text(runs["char"], "the ", 8, seed=s, temperature=0.8)[0] for s in (7, 8)]
    assert out == f"--- sample 1 ---\n{samples[0]}\n--- sample 2 ---\n{samples[1]}\n"
    first = out.index("--- sample 2 ---\nthe ") + len("--- sample 2 ---\nthe ")
    assert out[:first] in snapshots                            # header and prompt shown before its tokens
    assert out[:first + 1] in snapshots


# ----------------------------------------------------------------------------- --help shows every default

def command_parser(name):
    sub = argparse.ArgumentParser(prog="npformer").add_subparsers()
    importlib.import_module(f"npformer.commands.{name}").add_parser(sub)
    return sub.choices[name]


@pytest.mark.parametrize("name", ["generate", "translate", "finetune", "seq2seq"])
def test_help_shows_every_default(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")                     # one line per option: no wrapping
    parser = command_parser(name)
    rendered = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.dest} has no help text"
        line = " ".join(action.help.split())
        if action.required:                                   # nothing to default to: no "(default: None)"
            assert line in rendered and f"{line} (default:" not in rendered, (name, action.dest)
            continue
        line = (line.replace("%(default)s", str(action.default)) if "%(default)" in line
                else f"{line} (default: {action.default})")
        assert line in rendered, (name, action.dest)


def test_help_through_the_cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")                     # no wrapping (it may break at a hyphen)
    shown = {}
    for name in ("generate", "translate", "finetune"):
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        shown[name] = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS tokens sampled after the prompt (default: 200)" in shown["generate"]
    assert "--max-iters MAX_ITERS optimizer steps (default: 150)" in shown["finetune"]
    assert "leading zeros allowed (000012 reads as 12)" in shown["translate"]
    assert "(2026-1-5 reads as 2026-01-05)" in shown["translate"]


# ----------------------------------------------------------------------------- translate

def translate(capsys, ckpt, *argv):
    rc = main(["translate", "--ckpt", ckpt, *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    return out


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_translate_refuses_a_non_finite_length_penalty(runs, capsys, alpha):
    line = cli_error(capsys, "translate", "--ckpt", runs["numbers"], "--beam-size", "3", f"--length-penalty={alpha}",
                     "12")
    assert line == f"npformer: error: --length-penalty must be a finite number; got {float(alpha)}"


def test_translate_takes_a_negative_length_penalty(runs, capsys):
    """alpha < 0 favours short outputs (lp shrinks with n); the search stays exact for it."""
    assert translate(capsys, runs["numbers"], "--beam-size", "3", "--length-penalty=-0.5", "12").strip()
    model, tok, _ = load_seq2seq(runs["numbers"], device="cpu")
    src = np.stack([tok.encode(s) for s in ("120", "987", "450")])
    beam, scores = beam_search(model, src, 1, 2, beam_size=3, length_penalty=-0.5)
    np.testing.assert_allclose(scores, score_hypotheses(model, src, beam, 2, -0.5), rtol=1e-6)   # float32
    greedy = score_hypotheses(model, src, model.greedy_decode(src, 1, model.config.max_len - 1, eos_id=2), 2, -0.5)
    assert (scores >= greedy - 1e-6 * abs(greedy)).all()


def test_translate_reads_leading_zeros_as_the_number(runs, capsys):
    ckpt = runs["numbers"]
    assert translate(capsys, ckpt, "000012") == translate(capsys, ckpt, "12")
    assert translate(capsys, ckpt, "0000000") == translate(capsys, ckpt, "0")
    assert translate(capsys, ckpt, "0001205") == translate(capsys, ckpt, "1205")      # 7 characters, 4 digits
    assert cli_error(capsys, "translate", "--ckpt", ckpt, "1234567").endswith("numbers: 1234567 is outside 0 .. 999999")
    assert "an integer 0 .. 999999 in digits; got '12a'" in cli_error(capsys, "translate", "--ckpt", ckpt, "12a")
    assert "in digits; got '-5'" in cli_error(capsys, "translate", "--ckpt", ckpt, "--", "-5")


def test_translate_reads_dates_without_leading_zeros(runs, capsys):
    ckpt = runs["dates"]
    assert translate(capsys, ckpt, "2026-1-5") == translate(capsys, ckpt, "2026-01-05")
    for text, match in [("2026-02-30", "dates: 2026-02-30 is not a date (day is out of range for month)"),
                        ("1850-01-01", "dates: 1850-01-01 is outside the years 1900 .. 2099"),
                        ("20260105", "dates: the input must be a date YYYY-MM-DD, e.g. 2026-01-05; got '20260105'"),
                        ("2026-001-05", "the input must be a date YYYY-MM-DD")]:
        assert match in cli_error(capsys, "translate", "--ckpt", ckpt, text)


def test_parse_source_examples():
    numbers, dates = NumbersTask(), DatesTask()
    assert [numbers.parse_source(s) for s in ("0", "000", "007", "999999", "0999999")] == \
        ["0", "0", "7", "999999", "999999"]
    for bad in ("", "1e3", " 12", "+12", "١٢", "1000000"):
        with pytest.raises(ValueError, match="numbers: "):
            numbers.parse_source(bad)
    assert [dates.parse_source(s) for s in ("2026-1-5", "1900-01-01", "2099-12-31", "2024-2-29")] == \
        ["2026-01-05", "1900-01-01", "2099-12-31", "2024-02-29"]
    for bad in ("2023-2-29", "2100-01-01", "1899-12-31", "2026-13-01", "2026-1-5 ", "2026/01/05", "٢٠٢٦-01-05"):
        with pytest.raises(ValueError, match="dates: "):
            dates.parse_source(bad)
    rng = np.random.default_rng(0)                            # every drawn source is already canonical
    for task in (numbers, dates):
        for _ in range(200):
            src = task.draw(rng)
            assert task.parse_source(src) == src


# ----------------------------------------------------------------------------- import npformer

def test_bare_import_gives_the_subpackages_lazily():
    code = textwrap.dedent("""
        import sys
        import npformer as nf
        assert "torch" not in sys.modules
        lazy = ("data", "interop", "models", "nn", "optim", "training")
        assert not [m for m in lazy if f"npformer.{m}" in sys.modules]
        assert set(lazy) <= set(dir(nf)) and "Tensor" in dir(nf)
        assert nf.nn.Linear(3, 2).weight.shape == (2, 3)
        assert nf.optim.AdamW.__name__ == "AdamW" and nf.models.GPT.__name__ == "GPT"
        assert callable(nf.interop.from_torch) and nf.data.CharTokenizer and nf.training
        assert nf.nn is sys.modules["npformer.nn"]
        assert "torch" not in sys.modules                    # interop imports torch only when it runs
        try:
            nf.no_such_thing
        except AttributeError as exc:
            assert str(exc) == "module 'npformer' has no attribute 'no_such_thing'", exc
        else:
            raise AssertionError("no AttributeError")
        assert not hasattr(nf, "commands_typo")
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
