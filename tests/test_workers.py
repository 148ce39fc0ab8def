"""Worker processes for the data-parallel step (npformer/training/workers.py).

They must give the same gradients, bit for bit, as the threaded step with the same shards,
follow the parent's parameter updates and train/eval modes, report a failing shard without
touching any .grad, notice a worker that died, and refuse parameters they cannot share.
"""

import os
import signal

import numpy as np
import pytest

import npformer as nf
from npformer.models.gpt import GPT, GPTConfig
from npformer.optim import AdamW
from npformer.training import workers as shard_workers
from npformer.training.parallel import forward_backward
from tests.helpers import DEVICE, host

pytestmark = [pytest.mark.skipif(DEVICE != "cpu", reason="worker processes run on the CPU only"),
              pytest.mark.skipif(not shard_workers.available(), reason="worker processes are used on Linux only")]

CFG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def make(seed=0, dtype=np.float64, **overrides):
    return GPT(GPTConfig(**{**CFG, **overrides}), generator=np.random.default_rng(seed), dtype=dtype)


def batch(B=6, T=8, seed=1, V=11):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def grads(model):
    return {n: host(p.grad).copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n,shards", [(2, None), (3, None), (2, 5), (3, 6)])
def test_workers_match_the_threaded_step_bit_for_bit(n, shards):
    x, y = batch()
    y[1, :4] = -1
    ref_model = make()
    ref_loss = forward_backward(ref_model, x, y, threads=n, shards=shards)
    model = make()
    with shard_workers.ShardWorkers(model, n) as w:
        assert len(w.pids) == n - 1
        loss = w.forward_backward(x, y, shards=shards)
        assert loss == ref_loss
        for name, g in grads(model).items():
            np.testing.assert_array_equal(g, grads(ref_model)[name], err_msg=name)


def test_workers_follow_optimizer_updates_and_dropout_modes():
    x, y = batch()
    results = []
    for use_workers in (False, True):
        nf.manual_seed(3)
        model = make(dtype=np.float32, dropout=0.25)
        opt = AdamW(model.parameters(), lr=1e-2)
        pool = shard_workers.ShardWorkers(model, 2) if use_workers else None
        losses = []
        for step in range(4):
            model.train(step != 2)                      # one step in eval mode: no dropout
            losses.append(pool.forward_backward(x, y) if pool else forward_backward(model, x, y, threads=2))
            opt.step()
            opt.zero_grad()
        if pool:
            pool.close()
        results.append((losses, {n: p.data.copy() for n, p in model.named_parameters()}))
    assert results[0][0] == results[1][0]
    for name, value in results[0][1].items():
        np.testing.assert_array_equal(results[1][1][name], value, err_msg=name)


def test_a_failing_shard_in_a_worker_raises_and_touches_no_grad():
    model = make()
    x, y = batch(B=4)
    with shard_workers.ShardWorkers(model, 2) as w:
        w.forward_backward(x, y)
        before = grads(model)
        bad = y.copy()
        bad[3, 1] = 99                                   # in the worker's shard (rows 2-3)
        with pytest.raises(RuntimeError, match=r"worker 1: IndexError: .*99"):
            w.forward_backward(x, bad)
        for name, g in grads(model).items():
            np.testing.assert_array_equal(g, before[name])
        w.forward_backward(x, y)                         # the worker still serves the next step


def test_a_memory_error_in_a_worker_is_a_memory_error_in_the_parent(monkeypatch):
    """pretrain turns a MemoryError into its one-line message; a worker's must reach it as one."""
    model = make()
    x, y = batch(B=4)
    parent, run_shards = os.getpid(), shard_workers.parallel.run_shards

    def out_of_memory_in_a_child(*args, **kwargs):
        if os.getpid() != parent:
            raise MemoryError("Unable to allocate 9.0 GiB")
        return run_shards(*args, **kwargs)
    monkeypatch.setattr(shard_workers.parallel, "run_shards", out_of_memory_in_a_child)
    with shard_workers.ShardWorkers(model, 2) as w:
        with pytest.raises(MemoryError, match="worker 1: MemoryError: Unable to allocate 9.0 GiB"):
            w.forward_backward(x, y)


def test_a_dead_worker_is_reported():
    model = make()
    x, y = batch(B=4)
    w = shard_workers.ShardWorkers(model, 2)
    os.kill(w.pids[0], signal.SIGKILL)
    os.waitpid(w.pids[0], 0)
    with pytest.raises(RuntimeError, match=f"worker process {w.pids[0]} exited"):
        w.forward_backward(x, y)
    with pytest.raises(RuntimeError, match="closed"):            # the pipes are not trusted after that
        w.forward_backward(x, y)


def test_replaced_parameters_are_shared_again_or_refused():
    model = make()
    x, y = batch(B=4)
    with shard_workers.ShardWorkers(model, 2) as w:
        p = model.parameters()[0]
        p.data = p.data * 0.5                            # same shape and dtype: copied back into shared memory
        loss = w.forward_backward(x, y)
        ref = make()
        ref.parameters()[0].data = ref.parameters()[0].data * 0.5
        assert loss == forward_backward(ref, x, y, threads=2)
        p.data = p.data.astype(np.float32)
        with pytest.raises(ValueError, match="became float32"):
            w.forward_backward(x, y)
    with pytest.raises(RuntimeError, match="closed"):
        w.forward_backward(x, y)


def test_bad_models_and_counts_are_refused():
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        shard_workers.ShardWorkers(make(), 0)
    mixed = make()
    mixed.parameters()[0].data = mixed.parameters()[0].data.astype(np.float32)
    with pytest.raises(ValueError, match="one float dtype"):
        shard_workers.ShardWorkers(mixed, 2)
    single = make()
    x, y = batch(B=3)
    with shard_workers.ShardWorkers(single, 1) as w:           # forks nothing: a plain step
        assert w.pids == []
        assert w.forward_backward(x, y) == forward_backward(make(), x, y, threads=1)


def test_closing_one_pool_while_another_lives_is_prompt_and_reaps_its_workers():
    import time
    x, y = batch(B=4)
    first = shard_workers.ShardWorkers(make(), 2)
    second = shard_workers.ShardWorkers(make(), 2)       # its worker inherited nothing of the first's pipes
    start = time.monotonic()
    first.close()
    assert time.monotonic() - start < 2.0
    with pytest.raises(ChildProcessError):
        os.waitpid(first.pids[0], os.WNOHANG)            # reaped
    assert np.isfinite(second.forward_backward(x, y))
    del second                                           # garbage collection also stops the workers


def test_a_second_ctrl_c_while_closing_still_reaps_every_worker(monkeypatch):
    """Ctrl-C during close()'s wait for the workers: they are killed and reaped, then it propagates."""
    pool = shard_workers.ShardWorkers(make(), 3)
    pids = pool.pids
    os.kill(pids[0], signal.SIGSTOP)                     # this one cannot answer the quit message

    def interrupted(seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(shard_workers.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)                  # reaped, none left behind


def test_workers_follow_grad_mode_requires_grad_and_refuse_other_leaves():
    x, y = batch(B=4)
    with nf.no_grad():                                    # made under no_grad, used outside it
        model = make()
        w = shard_workers.ShardWorkers(model, 2)
    ref = make()
    frozen = model.parameters()[0]
    frozen.requires_grad = False
    ref.parameters()[0].requires_grad = False
    assert w.forward_backward(x, y) == forward_backward(ref, x, y, threads=2)
    assert frozen.grad is None                            # the worker did not send one either
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            np.testing.assert_array_equal(host(p.grad), host(q.grad), err_msg=name)
    w.close()

    class Scaled(GPT):                                    # a leaf that is not a parameter
        def forward(self, idx, targets=None):
            logits, loss = super().forward(idx, targets)
            return logits, loss * self.extra
    odd = Scaled(GPTConfig(**CFG), generator=np.random.default_rng(0), dtype=np.float64)
    object.__setattr__(odd, "extra", nf.tensor(np.array(2.0), requires_grad=True))
    with shard_workers.ShardWorkers(odd, 2) as w:
        with pytest.raises(RuntimeError, match="not a parameter of the model"):
            w.forward_backward(x, y)


def test_a_forked_copy_of_the_parent_leaves_the_workers_alone_and_workers_die_with_the_parent():
    x, y = batch(B=4)
    w = shard_workers.ShardWorkers(make(), 2)
    pid = os.fork()
    if pid == 0:                                          # a copy of the parent that exits normally
        try:
            w._finalizer()                                # what its exit would run
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert np.isfinite(w.forward_backward(x, y))          # the workers are still there
    w.close()

    import subprocess
    import sys
    import time
    code = ("import numpy as np, sys, time; from tests.test_workers import make;"
            "from npformer.training.workers import ShardWorkers;"
            "w = ShardWorkers(make(), 2); print(w.pids[0], flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    def alive(pid):              # a zombie (killed, not yet reaped by whoever adopted it) is dead
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    for _ in range(200):                                  # the kernel kills the orphaned worker
        if not alive(worker):
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"worker {worker} outlived its parent")


def test_empty_batches_are_refused():
    x, y = batch(B=4)
    with pytest.raises(ValueError, match="the batch is empty"):
        forward_backward(make(), x[:0], y[:0], threads=2)
    with shard_workers.ShardWorkers(make(), 2) as w:
        with pytest.raises(ValueError, match="the batch is empty"):
            w.forward_backward(x[:0], y[:0])
