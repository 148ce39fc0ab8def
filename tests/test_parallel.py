"""CPU threading and allocator (npformer/cpu.py, npformer/training/parallel.py).

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
from npformer.training import parallel
from npformer.training.parallel import check_threads, default_threads, forward_backward, step_in_threads
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
        step_in_threads(AdamW(model.parameters()), threads)


def test_the_optimizer_step_knows_no_threads():
    opt = AdamW(make().parameters())
    with pytest.raises(TypeError, match="threads"):
        opt.step(threads=2)


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
                                      lambda ps: SGD(ps, lr=1e-2, momentum=0.9),
                                      lambda ps: SGD(ps, lr=1e-2)])
def test_optimizer_step_over_threads_is_bit_identical_to_step(make_opt):
    x, y = batch()
    results, states = [], []
    for threads in (None, 1, 3, 50):                   # None: opt.step(); 50: more threads than parameters
        model = make()
        params = model.parameters()
        params[1].requires_grad = False                # a frozen parameter: no grad, no update, no state
        opt = make_opt(params)
        for _ in range(3):
            forward_backward(model, x, y, threads=1)
            if threads is None:
                opt.step()
            else:
                step_in_threads(opt, threads)
            opt.zero_grad()
        results.append({n: host(p.data).copy() for n, p in model.named_parameters()})
        states.append(opt.state_dict())
        assert params[1] not in opt.state
    for got, state in zip(results[1:], states[1:]):
        for name in results[0]:
            np.testing.assert_array_equal(got[name], results[0][name], err_msg=name)
        assert state.keys() == states[0].keys()
        for key, value in state.items():
            np.testing.assert_array_equal(value, states[0][key], err_msg=key)


def test_step_in_threads_checks_every_grad_before_updating_any():
    model = make()
    opt = AdamW(model.parameters(), lr=0.1)
    x, y = batch()
    forward_backward(model, x, y, threads=1)
    params = model.parameters()
    before = [host(p.data).copy() for p in params]
    params[-1].grad = params[-1].grad[..., :1]          # the last one's grad has the wrong shape
    with pytest.raises(ValueError, match="grad shape"):
        step_in_threads(opt, 3)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(host(p.data), b)
    assert not opt.state


def test_balanced_groups_cover_the_parameters_in_order():
    model = make()
    work = [(p, None) for p in model.parameters()]
    for parts in (1, 2, 3, 7, 100):
        runs = parallel._balanced(work, parts)
        assert [p for run in runs for p, _ in run] == [p for p, _ in work]
        assert 1 <= len(runs) <= min(parts, len(work)) and all(runs)
    sizes = [sum(p.data.size for p, _ in run) for run in parallel._balanced(work, 2)]
    assert max(sizes) - min(sizes) <= max(p.data.size for p, _ in work)


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


def test_accumulate_adds_sink_pairs_in_order_without_writing_them():
    a = nf.tensor(np.array([1.0, 2.0]), requires_grad=True)
    b = nf.tensor(np.array([3.0, 5.0]), requires_grad=True)
    pairs = []
    autograd.backward((a * a).sum() + (a + b).sum(), sink=lambda t, g: pairs.append((t, g)))
    autograd.backward((b * 3.0).sum(), sink=lambda t, g: pairs.append((t, g)))
    assert a.grad is None and b.grad is None
    assert sorted(id(t) for t, _ in pairs) == sorted([id(a), id(b), id(b)])   # one pair per leaf and backward
    held = [g.copy() for _, g in pairs]
    for threads in (1, 2):
        a.grad = b.grad = None
        parallel.accumulate(pairs, threads)
        np.testing.assert_array_equal(a.grad, [3.0, 5.0])          # 2a + 1
        np.testing.assert_array_equal(b.grad, [4.0, 4.0])          # 1 + 3
        for (_, g), h in zip(pairs, held):                        # the pairs' arrays are not written
            np.testing.assert_array_equal(g, h)
        assert all(t.grad is not g for t, g in pairs)
    parallel.accumulate(pairs)                                    # onto an existing .grad: adds
    np.testing.assert_array_equal(b.grad, [8.0, 8.0])


def test_the_engine_and_the_optimizers_import_no_speed_plumbing():
    import ast
    import npformer.optim.optimizer as optimizer
    for module in (autograd, optimizer):
        imported = set()
        for node in ast.walk(ast.parse(open(module.__file__).read())):
            if isinstance(node, ast.ImportFrom):
                imported |= {node.module or ""} | {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not imported & {"cpu", "training", "parallel", "concurrent.futures"}, (module.__name__, imported)
    assert not hasattr(autograd, "collect_leaf_grads") and not hasattr(autograd, "accumulate")


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


# ----------------------------------------------------------------------------- the allocator

def _in_fresh_python(code: str, tune: bool = True) -> list:
    """Run `code` in a new interpreter that records every lookup of glibc's mallopt; return its last line's words.

    `code` may call report(), which prints whether cpu.tune_allocator has tuned and how often
    mallopt was looked up (ctypes raises an audit event for each symbol lookup).
    """
    prelude = (
        "import sys\n"
        "looked_up = []\n"
        "sys.addaudithook(lambda e, a: looked_up.append(a[1]) if e == 'ctypes.dlsym' and a[1] == 'mallopt' else None)\n"
        "def report():\n"
        "    import npformer.cpu\n"
        "    print(npformer.cpu.allocator_tuned(), len(looked_up))\n")
    env = {k: v for k, v in os.environ.items() if k != "NPFORMER_TUNE_MALLOC"}
    if not tune:
        env["NPFORMER_TUNE_MALLOC"] = "0"
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[-1].split()


MODEL = ("import numpy as np\n"
         "from npformer.models.gpt import GPT, GPTConfig\n"
         f"model = GPT(GPTConfig(**{CFG!r}), generator=np.random.default_rng(0), dtype=np.float64)\n"
         "x = np.random.default_rng(1).integers(0, 11, (2, 8))\n")

needs_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="the allocator thresholds are set on Linux (glibc) only")


@needs_glibc
def test_importing_npformer_leaves_the_allocator_alone():
    code = ("import npformer, npformer.optim, npformer.nn, npformer.models, npformer.training\n"
            "import npformer.training.parallel, npformer.training.workers, npformer.training.pretrain, npformer.cli\n"
            + MODEL + "report()\n")
    assert _in_fresh_python(code) == ["False", "0"]


@needs_glibc
@pytest.mark.parametrize("entry", [
    "from npformer.training.parallel import forward_backward\nforward_backward(model, x, x, threads=1)\n",
    "from npformer.training.workers import ShardWorkers\nShardWorkers(model, 1).close()\n",
    "from npformer.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n",
])
def test_the_training_entry_points_tune_the_allocator_unless_refused(entry):
    assert _in_fresh_python(MODEL + entry + "report()\n") == ["True", "1"]
    assert _in_fresh_python(MODEL + entry + "report()\n", tune=False) == ["False", "0"]


def test_pretrain_tunes_the_allocator(tmp_path, monkeypatch):
    from npformer.training.pretrain import PretrainConfig, pretrain
    calls = []
    monkeypatch.setattr(cpu, "tune_allocator", lambda: calls.append(1) or True)
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    pretrain(PretrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=1,
                            warmup_iters=0, lr_decay_iters=2, eval_interval=1, eval_iters=1, samples=0,
                            device="cpu", workers=1, data=str(data), out=str(tmp_path / "run")), log=lambda *a: None)
    assert calls
