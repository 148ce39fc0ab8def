"""The ``npformer`` command: flags, one-line errors that leave every file as it was, --resume
with the stored settings, and ``generate`` (seeded, KV cache == no cache, top-k/top-p)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from npformer.cli import main
from npformer.training.checkpoint import VERSION, load_checkpoint
from tests.test_pretrain import REPO, tree_digest, write_corpus

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "12", "--warmup-iters", "2", "--eval-interval", "4", "--eval-iters", "2",
        "--samples", "0", "--device", "cpu"]
NANOGPT_FLAGS = ["--n-layer", "--n-head", "--n-embd", "--block-size", "--batch-size", "--max-iters", "--lr",
                 "--min-lr", "--warmup-iters", "--lr-decay-iters", "--weight-decay", "--grad-clip", "--dropout",
                 "--eval-interval", "--eval-iters", "--seed", "--device", "--data", "--tokenizer", "--out",
                 "--resume"]



@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A finished 12-step run, made once; tests work on copies of it."""
    root = tmp_path_factory.mktemp("cli")
    data = write_corpus(root / "data.txt")
    assert main(["pretrain", *TINY, "--data", data, "--out", str(root / "run")]) == 0
    return root


@pytest.fixture
def run(template, tmp_path):
    """(copy of the template's run directory, its data file)."""
    shutil.copytree(template / "run", tmp_path / "run")
    return str(tmp_path / "run"), str(template / "data.txt")


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, match):
    assert rc != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("npformer: error: "), err
    assert match in lines[0], lines[0]


def _bytes(path, content):
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


def flip(path, offset=500):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= 0xFF
    _bytes(path, bytes(data))


def cut(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def newer_version(run_dir):
    meta_path = os.path.join(load_checkpoint(run_dir).path, "meta.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta["version"] = VERSION + 1
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)


def latest(run_dir):
    return load_checkpoint(run_dir).path


# ----------------------------------------------------------------------------- flags

def test_pretrain_help_lists_the_nanogpt_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in NANOGPT_FLAGS:
        assert f"{flag} " in out or f"{flag}\n" in out, flag


def test_pretrain_then_resume_with_the_stored_settings(run, capsys):
    out_dir, _ = run
    rc, out, err = cli(capsys, "pretrain", "--out", out_dir, "--resume", "--max-iters", "16")
    assert rc == 0, err
    assert "resuming from" in out and "at step 12" in out
    ck = load_checkpoint(out_dir)
    cfg = ck.meta["pretrain_config"]
    assert ck.step == 16 and (cfg["n_embd"], cfg["eval_interval"], cfg["warmup_iters"]) == (16, 4, 2)
    assert cfg["lr_decay_iters"] == 12 and cfg["max_iters"] == 16      # the original schedule kept
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == [4, 8, 12, 16]


# ----------------------------------------------------------------------------- one-line errors

NEW_RUN_ERRORS = {
    "missing data file": (lambda d: ["--data", os.path.join(d, "nope.txt")], "data file not found"),
    "empty data file": (lambda d: ["--data", _bytes(os.path.join(d, "e.txt"), b"")], "empty"),
    "non-UTF-8 data": (lambda d: ["--data", _bytes(os.path.join(d, "b.txt"), b"abc \xff\xfe def" * 50)],
                       "not valid UTF-8"),
    "data is a directory": (lambda d: ["--data", d], "directory"),
    "corpus shorter than a block": (lambda d: ["--data", _bytes(os.path.join(d, "s.txt"), b"a short text")],
                                    "shorter than one block"),
    "n-embd not divisible": (lambda d: ["--n-embd", "15"], "divisible by --n-head"),
    "negative lr": (lambda d: ["--lr=-0.001"], "--lr must be a positive number"),
    "nan lr": (lambda d: ["--lr", "nan"], "--lr must be a positive number"),
    "min-lr above lr": (lambda d: ["--min-lr", "1"], "--min-lr"),
    "dropout 1.5": (lambda d: ["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    "warmup >= decay": (lambda d: ["--warmup-iters", "10", "--lr-decay-iters", "10"],
                        "--lr-decay-iters (10) must exceed --warmup-iters (10)"),
    "max-iters 0": (lambda d: ["--max-iters", "0"], "--max-iters must be a positive integer"),
    "eval-iters 0": (lambda d: ["--eval-iters", "0"], "--eval-iters must be a positive integer"),
    "negative grad-clip": (lambda d: ["--grad-clip=-1"], "--grad-clip"),
    "bpe vocab too small": (lambda d: ["--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size"),
}


@pytest.mark.parametrize("case", list(NEW_RUN_ERRORS))
def test_new_run_errors(run, tmp_path, capsys, case):
    out_dir, data = run
    before = tree_digest(out_dir)
    flags, match = NEW_RUN_ERRORS[case]
    extra = flags(str(tmp_path))
    if "--data" not in extra:
        extra += ["--data", data]
    rc, _, err = cli(capsys, "pretrain", *TINY, *extra, "--out", tmp_path / "new")
    assert_one_line_error(rc, err, match)
    assert not (tmp_path / "new").exists()          # nothing written for a run that never started
    assert tree_digest(out_dir) == before


def every_checkpoint(damage):
    """Apply damage(checkpoint directory) to every checkpoint of a run, so none is left to fall back to."""
    def apply(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith("ckpt-"):
                damage(os.path.join(run_dir, name))
    return apply


RESUME_ERRORS = {
    "corrupt model.npz": (every_checkpoint(lambda c: flip(os.path.join(c, "model.npz"))), [], "model.npz is corrupt"),
    "truncated optimizer.npz": (every_checkpoint(lambda c: cut(os.path.join(c, "optimizer.npz"), 300)),
                                [], "optimizer.npz is corrupt or truncated"),
    "corrupt meta.json": (every_checkpoint(lambda c: flip(os.path.join(c, "meta.json"), 0)), [],
                          "meta.json is corrupt"),
    "missing checkpoint file": (every_checkpoint(lambda c: os.remove(os.path.join(c, "tokenizer.json"))), [],
                                "tokenizer.json is missing"),
    "newer format version": (newer_version, [], f"format version {VERSION + 1}, newer"),
    "other n-embd": (lambda d: None, ["--n-embd", "32"], "n_embd (checkpoint 16, now 32)"),
    "other n-layer": (lambda d: None, ["--n-layer", "2"], "n_layer (checkpoint 1, now 2)"),
    "other data": (lambda d: None, ["--data", "OTHER"], "the training data changed: the checkpoint was made on"),
    "max-iters below the checkpoint": (lambda d: None, ["--max-iters", "8"], "below the checkpoint's step 12"),
    "bad flag on resume": (lambda d: None, ["--dropout", "1.5"], "--dropout must be in [0, 1)"),
}


@pytest.mark.parametrize("case", list(RESUME_ERRORS))
def test_resume_errors_leave_the_run_untouched(run, tmp_path, capsys, case):
    out_dir, _ = run
    damage, flags, match = RESUME_ERRORS[case]
    damage(out_dir)
    before = tree_digest(out_dir)
    if "OTHER" in flags:
        flags = ["--data", write_corpus(tmp_path / "other.txt", seed=1)]
    rc, _, err = cli(capsys, "pretrain", "--out", out_dir, "--resume", *flags)
    assert_one_line_error(rc, err, match)
    assert tree_digest(out_dir) == before


def test_resume_when_the_data_gained_new_characters(tmp_path, capsys):
    data = write_corpus(tmp_path / "data.txt")
    out_dir = str(tmp_path / "run")
    assert cli(capsys, "pretrain", *TINY, "--max-iters", "4", "--data", data, "--out", out_dir)[0] == 0
    before = tree_digest(out_dir)
    with open(data, "a", encoding="utf-8") as f:
        f.write("Zürich " * 9)
    rc, _, err = cli(capsys, "pretrain", "--out", out_dir, "--resume", "--max-iters", "8")
    assert_one_line_error(rc, err, "the training data changed")
    rc, _, err = cli(capsys, "pretrain", "--out", out_dir, "--resume", "--max-iters", "8", "--allow-data-change")
    assert_one_line_error(rc, err, "character(s) not in the vocabulary")
    assert tree_digest(out_dir) == before


def test_new_run_into_an_out_with_a_checkpoint_is_refused(run, capsys):
    out_dir, data = run
    before = tree_digest(out_dir)
    rc, _, err = cli(capsys, "pretrain", *TINY, "--data", data, "--out", out_dir)
    assert_one_line_error(rc, err, "already holds a checkpoint; pass --resume")
    assert tree_digest(out_dir) == before


def test_resume_without_a_checkpoint(tmp_path, capsys):
    rc, _, err = cli(capsys, "pretrain", "--out", tmp_path / "none", "--resume")
    assert_one_line_error(rc, err, "nothing to resume: ")
    assert not (tmp_path / "none").exists()


GENERATE_ERRORS = {
    "corrupt model.npz": (lambda d: flip(os.path.join(latest(d), "model.npz")), [], "model.npz is corrupt"),
    "truncated model.npz": (lambda d: cut(os.path.join(latest(d), "model.npz"), 1000), [],
                            "model.npz is corrupt or truncated"),
    "newer format version": (newer_version, [], "newer than this npformer"),
    "no checkpoint": (lambda d: None, ["--ckpt", "MISSING"], "checkpoint not found"),
    "prompt outside the vocabulary": (lambda d: None, ["--prompt", "the Zürich cat"], "not in the vocabulary"),
    "empty prompt": (lambda d: None, ["--prompt", ""], "--prompt is empty"),
    "top-k 0": (lambda d: None, ["--top-k", "0"], "--top-k must be >= 1"),
    "top-p 1.5": (lambda d: None, ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    "temperature 0": (lambda d: None, ["--temperature", "0"], "--temperature must be > 0"),
    "negative max-new-tokens": (lambda d: None, ["--max-new-tokens=-1"], "--max-new-tokens must be >= 0"),
    "negative seed": (lambda d: None, ["--seed=-1"], "--seed must be an integer >= 0; got -1"),
}


@pytest.mark.parametrize("case", list(GENERATE_ERRORS))
def test_generate_errors(run, tmp_path, capsys, case):
    out_dir, _ = run
    damage, flags, match = GENERATE_ERRORS[case]
    damage(out_dir)
    before = tree_digest(out_dir)
    flags = [str(tmp_path / "missing") if f == "MISSING" else f for f in flags]
    rc, out, err = cli(capsys, "generate", "--ckpt", out_dir, "--max-new-tokens", "5", *flags)
    assert_one_line_error(rc, err, match)
    assert out == "" and tree_digest(out_dir) == before


# ----------------------------------------------------------------------------- generate

def generate(capsys, ckpt, *flags):
    rc, out, err = cli(capsys, "generate", "--ckpt", ckpt, *flags)
    assert rc == 0 and err == "", err
    return out


def test_generate_is_seeded_and_cache_matches_no_cache(template, capsys):
    ckpt = str(template / "run")
    prompt = "the cat sat on a mat and the dog ran"           # 38 characters > block_size 16
    texts = {}
    for seed in (0, 1, 2):
        for cache in ([], ["--no-cache"]):
            texts[seed, bool(cache)] = generate(capsys, ckpt, "--prompt", prompt, "--max-new-tokens", "24",
                                                "--seed", seed, *cache)
    for seed in (0, 1, 2):
        assert texts[seed, False] == texts[seed, True]        # the KV cache changes nothing
        assert texts[seed, False].startswith(prompt) and len(texts[seed, False]) == len(prompt) + 24 + 1
    assert generate(capsys, ckpt, "--prompt", prompt, "--max-new-tokens", "24") == texts[0, False]
    assert len({texts[s, False] for s in (0, 1, 2)}) > 1       # the seed matters


def test_top_k_and_top_p(template, capsys):
    ckpt = str(template / "run")
    common = ["--prompt", "the ", "--max-new-tokens", "20"]
    greedy = {generate(capsys, ckpt, *common, "--top-k", "1", "--seed", s) for s in range(3)}
    assert len(greedy) == 1                                   # top-k 1 is argmax: no randomness left
    nucleus = {generate(capsys, ckpt, *common, "--top-p", "1e-9", "--seed", s) for s in range(3)}
    assert nucleus == greedy                                  # a tiny top-p keeps only the top token
    sampled = {generate(capsys, ckpt, *common, "--seed", s, "--temperature", "2") for s in range(3)}
    assert sampled != greedy
    both = generate(capsys, ckpt, *common, "--top-k", "3", "--top-p", "0.9", "--seed", "5", "--no-cache")
    assert both == generate(capsys, ckpt, *common, "--top-k", "3", "--top-p", "0.9", "--seed", "5")


def test_generate_samples_and_default_prompt(template, tmp_path, capsys):
    out = generate(capsys, str(template / "run"), "--num-samples", "2", "--max-new-tokens", "5")
    assert out.count("--- sample ") == 2 and out.startswith("--- sample 1 ---\n\n")
    # a vocabulary without a newline: the default prompt falls back to its first token
    data = _bytes(tmp_path / "flat.txt", b"the cat sat on a mat and the dog ran far " * 12)
    assert main(["pretrain", *TINY, "--max-iters", "4", "--data", data, "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    out = generate(capsys, str(tmp_path / "r"), "--max-new-tokens", "5")
    assert out.startswith(" ") and len(out) == 1 + 5 + 1


# ----------------------------------------------------------------------------- real processes

def test_cli_process_exit_codes(template, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("NPFORMER_DEBUG", None)
    cmd = [sys.executable, "-m", "npformer.cli"]
    bad = subprocess.run(cmd + ["pretrain", *TINY, "--data", str(tmp_path / "nope.txt"), "--out",
                                str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"npformer: error: data file not found: {tmp_path / 'nope.txt'}"]
    good = subprocess.run(cmd + ["generate", "--ckpt", str(template / "run"), "--prompt", "the",
                                 "--max-new-tokens", "7"], env=env, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and good.stderr == "" and good.stdout.startswith("the")
    assert len(good.stdout) == 3 + 7 + 1


def test_console_script(template):
    script = os.path.join(os.path.dirname(sys.executable), "npformer")
    if not os.path.exists(script):
        pytest.skip(f"no console script at {script} (npformer is not installed in this environment)")
    done = subprocess.run([script, "generate", "--ckpt", str(template / "run"), "--prompt", "a",
                           "--max-new-tokens", "3", "--top-k", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "" and len(done.stdout) == 1 + 3 + 1


def test_the_commands_are_an_explicit_list_of_every_command_module(capsys):
    """npformer.commands.COMMANDS names each module of the package once, in --help's order."""
    import pkgutil

    from npformer import commands
    assert sorted(commands.COMMANDS) == sorted(m.name for m in pkgutil.iter_modules(commands.__path__))
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out.split("{", 1)[1].split("}", 1)[0].split(",")
    assert tuple(listed) == commands.COMMANDS == ("pretrain", "generate", "seq2seq", "translate", "finetune")
