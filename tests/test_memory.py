"""Tests for npformer.training.memory: the estimate against measured peaks, the reading of the
available memory, and the check that refuses a run before its first step."""

import dataclasses
import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from npformer import backend, random
from npformer.models.gpt import GPT, GPTConfig
from npformer.optim import AdamW, clip_grad_norm, weight_decay_groups
from npformer.training import memory, parallel
from npformer.training import workers as shard_workers
from npformer.training.pretrain import PretrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "memory_estimate.py")
MiB = 1 << 20
STEPS = 2           # the optimizer's state exists after the first step: a third moved no peak by over 3%

# name -> (mode, settings): each 100-220 MB, 1-2 s. Together they vary the block size (blocked and
# full-score attention), the width, the vocabulary, dropout, the shards and the worker processes.
MEASURED = {
    "blocked attention": ("train", dict(n_layer=2, n_head=8, n_embd=64, block_size=1024, batch_size=8,
                                        shards=2, workers=1, vocab_size=65)),
    "large vocabulary": ("train", dict(n_layer=2, n_head=4, n_embd=128, block_size=96, batch_size=16,
                                       shards=1, workers=1, vocab_size=8192)),
    "dropout": ("train", dict(n_layer=2, n_head=8, n_embd=64, block_size=256, batch_size=12, shards=2,
                              workers=1, vocab_size=65, dropout=0.1)),
    "2 worker processes": ("train", dict(n_layer=2, n_head=16, n_embd=64, block_size=512, batch_size=8,
                                         shards=4, workers=2, vocab_size=512)),
    "evaluation pieces": ("eval", dict(n_layer=2, n_head=8, n_embd=64, block_size=1024, batch_size=16,
                                       shards=2, workers=1, vocab_size=65)),
}


pytestmark = pytest.mark.usefixtures("fast_ops")     # the estimate describes the fast ops

def _measure(mode, settings):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NPFORMER_DEVICE", None)
    env.pop(memory.ENV_VAR, None)
    out = subprocess.run([sys.executable, SCRIPT, "--measure", json.dumps(settings), "--mode", mode,
                          "--steps", str(STEPS)],
                         capture_output=True, text=True, timeout=300, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cfg(**kw):
    kw.setdefault("device", "cpu")
    return PretrainConfig(**kw).checked()


def _estimate(settings):
    """memory.estimate_pretrain for MEASURED's settings, as the benchmark builds it."""
    settings = dict(settings)
    vocab_size = settings.pop("vocab_size")
    return memory.estimate_pretrain(_cfg(**settings), vocab_size)


# ----------------------------------------------------------------------------- the estimate

@pytest.mark.parametrize("name", list(MEASURED))
def test_estimate_is_within_30_percent_of_the_measured_peak(name):
    """benchmarks/memory_estimate.py --measure, in a fresh interpreter, against the estimate.

    train: MemoryEstimate.train_bytes against the peak growth of STEPS = 2 steps of pretrain's step
    (forward/backward over the shards, clip_grad_norm, AdamW, zero_grad): the main process's
    VmHWM less its VmRSS right before the model is built, plus each forked worker's peak
    private memory. eval: eval_bytes against the main process's peak growth while
    the evaluation (objectives.CausalLM.evaluate) runs (pieces of a shard's rows under no_grad), after the model is built.
    """
    mode, settings = MEASURED[name]
    if not os.path.exists("/proc/self/status"):
        pytest.skip("measuring needs Linux's /proc")
    if settings["workers"] > 1 and not shard_workers.available():
        pytest.skip("worker processes need fork (Linux)")
    r = _measure(mode, settings)                     # one interpreter per case: xdist spreads them
    assert r["measured"] > 80 * MiB, r                  # large enough that the interpreter's noise is small
    assert 0.7 <= r["estimate"] / r["measured"] <= 1.3, (name, r)
    est = _estimate(settings)
    assert r["estimate"] == (est.eval_bytes if mode == "eval" else est.train_bytes)
    if mode == "train":
        assert len(r["workers"]) == settings["workers"] - 1      # the parent and one forked worker


def test_the_dominant_part_is_the_one_the_config_stresses():
    parts = {name: _estimate(settings).parts for name, (_, settings) in MEASURED.items()}
    top = {name: max((k for k in p if k != "evaluation piece"), key=p.get) for name, p in parts.items()}
    assert top["blocked attention"] == "attention scores"
    assert top["large vocabulary"] == "logits"
    assert top["dropout"] == "attention scores"


TRACED = [  # (settings, vocab_size): one process, small; NumPy's allocations are traced exactly
    (dict(n_layer=2, n_head=8, n_embd=64, block_size=256, batch_size=4, shards=2), 65),      # blocked attention
    (dict(n_layer=2, n_head=4, n_embd=64, block_size=96, batch_size=4, shards=2), 4096),     # full scores, logits
    (dict(n_layer=2, n_head=8, n_embd=64, block_size=200, batch_size=4, shards=2, dropout=0.1), 65),
    (dict(n_layer=3, n_head=2, n_embd=128, block_size=64, batch_size=8, shards=1), 65),      # plain backward
    (dict(n_layer=1, n_head=4, n_embd=256, block_size=32, batch_size=16, shards=1), 65),     # weights matter
]


@pytest.mark.parametrize("settings,vocab_size", TRACED)
def test_estimate_is_within_10_percent_of_the_arrays_traced_live(settings, vocab_size):
    """train_bytes against tracemalloc's peak of 2 steps (NumPy reports its arrays to tracemalloc):
    the live set itself, without the allocator's or the interpreter's share, so the tolerance is tight."""
    cfg = _cfg(workers=1, **settings)
    x = np.random.default_rng(0).integers(0, vocab_size, size=(cfg.batch_size, cfg.block_size + 1))
    x, y = np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(x[:, 1:])
    tracemalloc.start()
    try:
        with random.thread_default_generator(random.Generator(2, "cpu"), "cpu"):
            model = GPT(GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                                  n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout),
                        generator=np.random.default_rng(0), device="cpu")
            opt = AdamW(weight_decay_groups(model.named_parameters(), 0.1), lr=1e-3)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0] - memory.ITEMSIZE * sum(p.size for p in model.parameters())
            for _ in range(2):
                parallel.forward_backward(model, x, y, 1, shards=cfg.shards)
                clip_grad_norm(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
            peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    est = memory.estimate_pretrain(cfg, vocab_size)
    assert 0.9 <= est.train_bytes / peak <= 1.1, (est.train_bytes, peak, est.parts)


def test_parts_add_up():
    for kw in (dict(), dict(block_size=1024, workers=2), dict(n_embd=512, n_head=8, block_size=8, batch_size=1)):
        est = memory.estimate_pretrain(_cfg(**kw), 500)
        assert sum(v for k, v in est.parts.items() if k != "evaluation piece") == pytest.approx(est.train_bytes, abs=8)
        assert est.parts["evaluation piece"] == est.eval_bytes and est.peak_bytes >= est.train_bytes


def test_parameter_count_matches_the_model():
    for bias in (True, False):
        model = GPT(GPTConfig(vocab_size=37, block_size=24, n_layer=3, n_head=2, n_embd=16, bias=bias),
                    generator=np.random.default_rng(0), device="cpu")
        assert memory.parameter_count(3, 16, 37, 24, bias) == model.num_parameters(non_embedding=False)


@pytest.mark.parametrize("batch,T,workers,shards", [(16, 128, 2, None), (16, 128, 4, None), (3, 1000, 2, None),
                                                     (7, 64, 2, 3), (5, 64, 3, 9), (16, 64, 1, None)])
def test_shard_plan_matches_parallel(batch, T, workers, shards):
    cfg = _cfg(batch_size=batch, block_size=T, workers=workers, shards=shards)
    x = np.zeros((batch, T), dtype=np.int64)
    with random.thread_default_generator(random.Generator(0, "cpu"), "cpu"):
        n_shards, threads, pieces = parallel.plan_shards(x, x, workers, shards, -1, "cpu")
    got_shards, got_threads, rows = memory.shard_plan(cfg)
    assert (got_shards, got_threads) == (n_shards, threads)
    assert rows == [len(pieces[k][0]) for k in range(threads)]


def test_more_shards_lower_the_training_estimate():
    ests = [memory.estimate_pretrain(_cfg(batch_size=16, block_size=256, workers=1, shards=s), 65)
            for s in (1, 2, 4, 8, 16)]
    train = [e.train_bytes for e in ests]
    assert all(a > b for a, b in zip(train, train[1:])), train
    scores = [e.parts["attention scores"] for e in ests]
    assert scores[0] == 16 * scores[-1]                 # one shard of 16 rows against one of 1 row


def test_evaluation_piece_is_bounded_by_the_shards():
    whole = memory.estimate_pretrain(_cfg(batch_size=12, block_size=512, workers=1, shards=1), 65).eval_bytes
    previous = whole
    for s in (2, 3, 4, 6, 12):
        est = memory.estimate_pretrain(_cfg(batch_size=12, block_size=512, workers=1, shards=s), 65)
        rows = -(-12 // s)                          # the largest piece
        assert est.rows == rows
        assert whole * rows / 12 <= est.eval_bytes < 1.05 * whole * rows / 12   # + the per-token ints
        assert est.eval_bytes < previous
        previous = est.eval_bytes


def test_attention_scores_grow_with_the_square_of_the_block_size():
    a = memory.estimate_pretrain(_cfg(block_size=4096, batch_size=1, workers=1), 65).parts["attention scores"]
    b = memory.estimate_pretrain(_cfg(block_size=8192, batch_size=1, workers=1), 65).parts["attention scores"]
    assert 3.9 < b / a < 4.1


def test_default_and_block_size_100000():
    small = memory.estimate_pretrain(_cfg(workers=2), 65)
    assert 50 * MiB < small.peak_bytes < 150 * MiB
    big = memory.estimate_pretrain(_cfg(workers=2, block_size=100000), 65)
    assert big.rows == 1 and big.shards == 16
    assert big.parts["attention scores"] > 0.9 * big.train_bytes > 100 * (1 << 30)


def test_the_estimate_is_cheap_and_imports_no_torch():
    cfg = _cfg(block_size=100000)
    t = time.perf_counter()
    for _ in range(100):
        memory.estimate_pretrain(cfg, 65)
    assert (time.perf_counter() - t) / 100 < 2e-3
    code = "import sys, npformer.training.memory as m; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.stdout.strip() == "False"


def test_format_bytes():
    assert memory.format_bytes(0) == "0 B"
    assert memory.format_bytes(1023) == "1023 B"
    assert memory.format_bytes(1536) == "1.5 KiB"
    assert memory.format_bytes(int(23.8 * (1 << 30))) == "23.8 GiB"
    assert memory.format_bytes(3 << 40) == "3.0 TiB"


# ----------------------------------------------------------------------------- available memory

def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _meminfo(tmp_path, kib):
    path = str(tmp_path / "meminfo")
    _write(path, f"MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   {kib} kB\n")
    return path


def test_available_cgroup_v2_less_inactive_file(tmp_path):
    root = tmp_path / "cg"
    _write(str(root / "memory.max"), "1073741824\n")
    _write(str(root / "memory.current"), "268435456\n")
    _write(str(root / "memory.stat"), "anon 1000\ninactive_file 67108864\nactive_file 5\n")
    _write(str(tmp_path / "cgroup"), "0::/\n")
    got = memory.available_memory(_meminfo(tmp_path, 8 << 20), str(root), str(tmp_path / "cgroup"), environ={})
    assert got == ((1 << 30) - 192 * MiB, "cgroup limit 1.0 GiB less 192.0 MiB in use")


def test_available_cgroup_v2_tightest_ancestor(tmp_path):
    root = tmp_path / "cg"
    _write(str(root / "a" / "b" / "memory.max"), "max\n")
    _write(str(root / "a" / "b" / "memory.current"), "10\n")
    _write(str(root / "a" / "memory.max"), str(512 * MiB))
    _write(str(root / "a" / "memory.current"), str(100 * MiB))
    _write(str(tmp_path / "cgroup"), "0::/a/b\n")
    got = memory.available_memory(_meminfo(tmp_path, 8 << 20), str(root), str(tmp_path / "cgroup"), environ={})
    assert got == (412 * MiB, "cgroup limit 512.0 MiB less 100.0 MiB in use")


def test_available_cgroup_v1_and_meminfo_take_the_smaller(tmp_path):
    d = tmp_path / "cg" / "memory" / "job"
    _write(str(d / "memory.limit_in_bytes"), str(2 << 30))
    _write(str(d / "memory.usage_in_bytes"), str(1 << 30))
    _write(str(d / "memory.stat"), "cache 5\ntotal_inactive_file 0\n")
    _write(str(tmp_path / "cgroup"), "5:cpu,cpuacct:/job\n4:memory:/job\n")
    args = (str(tmp_path / "cg"), str(tmp_path / "cgroup"))
    assert memory.available_memory(_meminfo(tmp_path, 512 * 1024), *args, environ={}) == (512 * MiB, "MemAvailable")
    got = memory.available_memory(_meminfo(tmp_path, 4 << 20), *args, environ={})
    assert got == (1 << 30, "cgroup limit 2.0 GiB less 1.0 GiB in use")


def test_available_unlimited_cgroup_v1_is_no_limit(tmp_path):
    d = tmp_path / "cg" / "memory"
    _write(str(d / "memory.limit_in_bytes"), "9223372036854771712\n")
    _write(str(d / "memory.usage_in_bytes"), str(1 << 30))
    _write(str(tmp_path / "cgroup"), "4:memory:/\n")
    got = memory.available_memory(_meminfo(tmp_path, 3 << 20), str(tmp_path / "cg"), str(tmp_path / "cgroup"),
                                  environ={})
    assert got == (3 << 30, "MemAvailable")


def test_available_unreadable_is_none(tmp_path):
    missing = str(tmp_path / "missing")
    free, why = memory.available_memory(missing, missing, missing, environ={})
    assert free is None and "no reading" in why
    _write(str(tmp_path / "meminfo"), "MemTotal: 1000 kB\n")             # an old kernel: no MemAvailable
    assert memory.available_memory(str(tmp_path / "meminfo"), missing, missing, environ={})[0] is None
    _write(str(tmp_path / "garbled"), "MemAvailable: lots\n")
    assert memory.available_memory(str(tmp_path / "garbled"), missing, missing, environ={})[0] is None


@pytest.mark.parametrize("text,expected", [("123", 123), ("512M", 512 * MiB), ("1.5G", 3 << 29), ("2k", 2048),
                                           ("64 MiB", 64 * MiB), (" 1t ", 1 << 40), ("10b", 10)])
def test_available_env_override(tmp_path, text, expected):
    missing = str(tmp_path / "missing")
    got = memory.available_memory(missing, missing, missing, environ={memory.ENV_VAR: text})
    assert got == (expected, memory.ENV_VAR)


@pytest.mark.parametrize("text", ["lots", "-5M", "5X", "1e9", "M", "12ib"])
def test_available_bad_env_override_says_so(text):
    with pytest.raises(ValueError, match=f"{memory.ENV_VAR}=.* is not a size.*512M"):
        memory.available_memory(environ={memory.ENV_VAR: text})


# ----------------------------------------------------------------------------- the check

def test_check_refuses_with_a_low_reading(monkeypatch):
    monkeypatch.setenv(memory.ENV_VAR, "512M")
    cfg = _cfg(block_size=4096, batch_size=16, workers=2, shards=2)
    est = memory.estimate_pretrain(cfg, 65)
    with pytest.raises(memory.MemoryTooSmall) as info:
        memory.check_pretrain_memory(cfg, 65)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"a training step needs about {memory.format_bytes(est.peak_bytes)} (attention scores")
    assert f"but 512.0 MiB is available ({memory.ENV_VAR})" in msg
    for flag in ("lower --batch-size (16 now", "--block-size (4096 now, ", "--workers (2 now", "raise --shards (2 now"):
        assert flag in msg


def test_check_names_values_that_fit():
    cfg = _cfg(block_size=4096, batch_size=16, workers=1, shards=2)
    with pytest.raises(memory.MemoryTooSmall) as info:
        memory.check_pretrain_memory(cfg, 65, available=(1 << 30, "test"))
    msg = str(info.value)
    fit = int(msg.split("--block-size (4096 now, ")[1].split()[0])
    assert memory.estimate_pretrain(dataclasses.replace(cfg, block_size=fit), 65).peak_bytes <= 1 << 30
    assert memory.estimate_pretrain(dataclasses.replace(cfg, block_size=fit + 1), 65).peak_bytes > 1 << 30


def test_check_block_size_100000_on_24_gib():
    cfg = _cfg(block_size=100000, workers=2)
    message = r"\(attention scores .* GiB.*; lower --block-size \(100000 now, \d+ fits\)"
    with pytest.raises(memory.MemoryTooSmall, match=message):
        memory.check_pretrain_memory(cfg, 65, available=(24 << 30, "MemAvailable"))


def test_check_passes_with_a_high_reading_or_none(monkeypatch):
    cfg = _cfg(block_size=256)
    monkeypatch.setenv(memory.ENV_VAR, "64G")
    est = memory.check_pretrain_memory(cfg, 65)
    assert est == memory.estimate_pretrain(cfg, 65)
    assert memory.check_pretrain_memory(cfg, 65, available=est.peak_bytes) == est
    assert memory.check_pretrain_memory(cfg, 65, available=(None, "no reading")) == est
    with pytest.raises(memory.MemoryTooSmall):
        memory.check_pretrain_memory(cfg, 65, available=est.peak_bytes - 1)


def test_data_bytes_count_towards_the_peak():
    cfg = _cfg(block_size=256)
    plain = memory.estimate_pretrain(cfg, 65)
    est = memory.estimate_pretrain(cfg, 65, data_bytes=100 * MiB)
    assert est.parts["data"] == 100 * MiB and est.peak_bytes == plain.peak_bytes + 100 * MiB
    memory.check_pretrain_memory(cfg, 65, available=plain.peak_bytes)
    with pytest.raises(memory.MemoryTooSmall, match="data 100.0 MiB"):
        memory.check_pretrain_memory(cfg, 65, available=plain.peak_bytes, data_bytes=100 * MiB)


def test_check_a_model_too_large_for_any_flag():
    cfg = _cfg(n_layer=24, n_head=16, n_embd=2048, block_size=64, batch_size=1, workers=1)
    with pytest.raises(memory.MemoryTooSmall, match=r"AdamW state .*use a smaller model \(--n-layer, --n-embd\)"):
        memory.check_pretrain_memory(cfg, 50257, available=1 << 30)


def test_check_gpu_names_the_device():
    """Without a GPU here: the estimate's GPU path (no workers, one shard) and its message only."""
    cfg = dataclasses.replace(_cfg(block_size=2048, batch_size=8, workers=1), device="gpu")
    est = memory.estimate_pretrain(cfg, 65)
    assert (est.shards, est.workers, est.rows, est.parts["worker processes"]) == (1, 1, 8, 0)
    with pytest.raises(memory.MemoryTooSmall, match=r"of GPU memory .* is available \(free GPU memory\); .*--shards"):
        memory.check_pretrain_memory(cfg, 65, available=(256 * MiB, "free GPU memory"))


def test_gpu_reading_is_none_without_a_gpu():
    free, why = memory.gpu_available_memory()
    if backend.gpu_available():
        assert free > 0 and why == "free GPU memory"
    else:
        assert free is None and "no reading" in why


def test_a_resumed_run_is_only_told_the_flags_it_may_change():
    """--resume refuses another batch or block size, so the advice names --workers and --shards."""
    cfg = _cfg(block_size=4096, batch_size=16, workers=2, shards=2)
    for resume, named, not_named in ((False, ["--batch-size", "--block-size", "--workers", "--shards"], []),
                                     (True, ["--workers", "--shards"], ["--batch-size", "--block-size"])):
        with pytest.raises(memory.MemoryTooSmall) as info:
            memory.check_pretrain_memory(dataclasses.replace(cfg, resume=resume), 65, available=(512 << 20, "test"))
        advice = str(info.value).split("; ", 1)[1]
        assert all(flag in advice for flag in named) and not any(flag in advice for flag in not_named), advice
