"""CPU threading (npformer/cpu.py, npformer/training/parallel.py, Optimizer.step(threads=)).

The data-parallel forward/backward must give the gradients of the full-batch loss (float64,
against one plain backward), be reproducible whatever the thread timing, keep dropout seeded,
and leave every .grad untouched when a shard fails.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import npformer as nf
from npformer import autograd, cpu
from npformer.models.gpt import GPT, GPTConfig
from npformer.optim import SGD, AdamW
from npformer.training.parallel import check_threads, default_threads, forward_backward
from tests.helpers import DEVICE, host

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="CPU threading: the GPU runs each op in parallel itself")

CFG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def make(seed=0, **overrides):
    return GPT(GPTConfig(**{**CFG, **overrides}), generator=np.random.default_rng(seed), dtype=np.float64)


def batch(B=5, T=8, seed=1, V=11):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def grads(model):
    return {n: host(p.grad).copy() for n, p in model.named_parameters()}


def reference(model, x, y):
    _, loss = model(x, y)
    loss.backward()
    out = grads(model)
    model.zero_grad()
    return loss.item(), out


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_sharded_gradients_equal_the_full_batch_gradients(threads):
    model = make()
    x, y = batch()
    y[1, :5] = -1                      # ignored targets change the shard weights
    y[4, :] = -1                       # a shard (threads=5) with no counted target at all
    ref_loss, ref = reference(model, x, y)
    loss = forward_backward(model, x, y, threads=threads)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    got = grads(model)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-10, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("threads,shards", [(1, 3), (2, 5), (3, 4), (2, None)])
def test_more_shards_than_threads_accumulate_the_same_gradients(threads, shards, monkeypatch):
    import npformer.training.parallel as par
    monkeypatch.setattr(par, "TOKENS_PER_SHARD", 8)       # the default: 5 rows of 8 tokens -> 5+ shards
    model = make()
    x, y = batch()
    y[2, :3] = -1
    ref_loss, ref = reference(model, x, y)
    assert forward_backward(model, x, y, threads=threads, shards=shards) == pytest.approx(ref_loss, rel=1e-13)
    got = grads(model)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-10, atol=1e-13, err_msg=name)
    model.zero_grad()
    forward_backward(model, x, y, threads=threads, shards=shards)
    for name, g in grads(model).items():
        np.testing.assert_array_equal(g, got[name])                    # reproducible bit for bit


@pytest.mark.parametrize("shards", [0, -2, True, 2.0])
def test_bad_shard_counts_are_refused(shards):
    model = make()
    x, y = batch()
    with pytest.raises(ValueError, match="shards must be a positive integer"):
        forward_backward(model, x, y, threads=2, shards=shards)


def test_one_thread_is_a_plain_backward_and_batch_caps_the_shards():
    model = make()
    x, y = batch(B=1)
    ref_loss, ref = reference(model, x, y)
    assert forward_backward(model, x, y, threads=4) == ref_loss      # one row: one shard
    for name, g in grads(model).items():
        np.testing.assert_array_equal(g, ref[name])


def test_results_do_not_depend_on_thread_timing_and_accumulate():
    model = make()
    x, y = batch(B=6)
    forward_backward(model, x, y, threads=3)
    first = grads(model)
    model.zero_grad()
    for _ in range(2):
        forward_backward(model, x, y, threads=3)
    twice = grads(model)
    model.zero_grad()
    forward_backward(model, x, y, threads=3)
    for name, g in grads(model).items():
        np.testing.assert_array_equal(g, first[name])                  # bit for bit
        np.testing.assert_allclose(twice[name], 2 * first[name], rtol=1e-12, atol=1e-300)


def test_dropout_is_seeded_per_shard():
    x, y = batch(B=4)

    def run(seed):
        nf.manual_seed(seed)
        model = make(dropout=0.3)
        model.train()
        forward_backward(model, x, y, threads=2)
        return grads(model)
    a, b, c = run(5), run(5), run(6)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[n], c[n]) for n in a)


def test_a_failing_shard_raises_and_leaves_every_grad_untouched():
    model = make()
    x, y = batch(B=4)
    forward_backward(model, x, y, threads=2)
    before = grads(model)
    bad = y.copy()
    bad[3, 2] = 99                      # out of range, in the second shard only
    with pytest.raises(IndexError, match="99"):
        forward_backward(model, x, bad, threads=2)
    for name, g in grads(model).items():
        np.testing.assert_array_equal(g, before[name])


@pytest.mark.parametrize("threads", [0, -1, True, 1.5, "2"])
def test_bad_thread_counts_are_refused(threads):
    model = make()
    x, y = batch()
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        forward_backward(model, x, y, threads=threads)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        AdamW(model.parameters()).step(threads=threads)


def test_mismatched_batch_and_gpu_threads_are_refused():
    model = make()
    x, y = batch()
    with pytest.raises(ValueError, match=r"batch size 5 but y has 4 \(shapes \(5, 8\) and \(4, 8\)\)"):
        forward_backward(model, x, y[:4], threads=2)
    with pytest.raises(ValueError, match="model is on gpu"):
        check_threads(2, "gpu")
    assert check_threads(None, "gpu") == 1
    assert default_threads("cpu") == (cpu.usable_cores() if cpu.blas_controllable() else 1)


@pytest.mark.parametrize("make_opt", [lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
                                      lambda ps: SGD(ps, lr=1e-2, momentum=0.9)])
def test_optimizer_step_over_threads_is_bit_identical(make_opt):
    x, y = batch()
    results = []
    for threads in (1, 3):
        model = make()
        opt = make_opt(model.parameters())
        for _ in range(3):
            forward_backward(model, x, y, threads=1)
            opt.step(threads=threads)
            opt.zero_grad()
        results.append({n: host(p.data).copy() for n, p in model.named_parameters()})
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])


def test_run_in_threads_keeps_order_and_raises_after_all_finish():
    done = []

    def task(i):
        def run():
            done.append(i)
            if i == 1:
                raise KeyError("task 1")
            return i * 10
        return run
    assert cpu.run_in_threads([task(0), task(2), task(3)]) == [0, 20, 30]
    done.clear()
    with pytest.raises(KeyError, match="task 1"):
        cpu.run_in_threads([task(0), task(1), task(2)])
    assert sorted(done) == [0, 1, 2]
    assert cpu.run_in_threads([]) == []


def test_run_in_threads_nested_in_a_pool_task_runs_serially():
    inner = lambda: cpu.run_in_threads([lambda: 1, lambda: 2, lambda: 3])     # noqa: E731
    assert cpu.run_in_threads([inner, inner, inner]) == [[1, 2, 3]] * 3


def test_collect_leaf_grads_hands_gradients_to_the_list():
    a = nf.tensor(np.array([1.0, 2.0]), requires_grad=True)
    with autograd.collect_leaf_grads() as pairs:
        (a * a).sum().backward()
    assert a.grad is None and len(pairs) == 1 and pairs[0][0] is a
    autograd.accumulate(pairs)
    np.testing.assert_array_equal(a.grad, [2.0, 4.0])


def test_blas_threads_sets_and_restores_the_count():
    if not cpu.blas_controllable():
        pytest.skip("NumPy's BLAS is not OpenBLAS; its thread count cannot be set")
    before = cpu.blas_num_threads()
    with cpu.blas_threads(1):
        assert cpu.blas_num_threads() == 1
        with cpu.blas_threads(1):
            assert cpu.blas_num_threads() == 1
        assert cpu.blas_num_threads() == 1
    assert cpu.blas_num_threads() == before


def test_allocator_tuning_is_on_by_default_and_can_be_refused():
    if not sys.platform.startswith("linux"):
        pytest.skip("the allocator thresholds are set on Linux (glibc) only")
    code = "import npformer.cpu as c, npformer; print(c._allocator_tuned)"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NPFORMER_TUNE_MALLOC": "0"})
    assert on.stdout.strip() == "True"
    assert off.stdout.strip() == "False"
