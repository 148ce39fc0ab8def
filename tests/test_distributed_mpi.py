"""npformer.distributed over two ranks: each test starts ``mpiexec -n 2`` on this machine.

The library checks run this module's ``rank_main`` on each rank (float64 GPT, a few steps):
gradients averaged over ranks, the step over ranks equal to one process's to 1e-12 (dropout
included), the helpers' broadcasts, one message for an error, agreed start-up errors. The
command-line checks (``mpiexec -n 2 npformer pretrain``) are in test_distributed_pretrain.py.
Skipped when mpi4py or mpiexec is missing (pip install 'npformer[mpi]').
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpiexec():
    """The mpiexec next to this Python (the mpich wheel's), else on PATH, else None."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def skip_reason():
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'npformer[mpi]')"
    if mpiexec() is None:
        return "no mpiexec on PATH (pip install 'npformer[mpi]' brings MPICH's)"
    if DEVICE != "cpu":
        return "the MPI runs train on the CPU"
    return None


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def launch(args, n=2, timeout=90, env=None, cwd=ROOT):
    """Run `args` on n ranks; the CompletedProcess (text output)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_"))},
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([mpiexec(), "-n", str(n)] + args, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def run_ranks(what, n=2, **kw):
    return launch([sys.executable, "-c", f"import tests.test_distributed_mpi as t; t.rank_main({what!r})"], n, **kw)


# ------------------------------------------------------------------ what each rank runs
def _model(dropout=0.0, seed=0):
    from npformer.models.gpt import GPT, GPTConfig
    return GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=dropout),
               generator=np.random.default_rng(seed), dtype=np.float64)


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def rank_main(what):
    from npformer import distributed
    comm = distributed.communicator("mpi")
    ids = np.random.default_rng(3).integers(0, 13, 2000)
    if what == "checks":        # three checks in one launch (each launch costs a second or two)
        for part in ("average", "broadcast", "startup"):
            _library_check(part, comm, ids)
    else:
        _library_check(what, comm, ids)


def _library_check(what, comm, ids):
    from npformer import distributed, random
    from npformer.data import BatchSampler
    from npformer.optim import AdamW
    from npformer.training import parallel
    if what == "average":       # each rank: loss.backward() on its rows, then the mean gradient
        worst = 0.0
        ranked, alone = _model(), _model()
        opt_r, opt_a = AdamW(ranked.parameters(), lr=1e-2), AdamW(alone.parameters(), lr=1e-2)
        mine = distributed.DistributedSampler(BatchSampler(ids, 8, 6, seed=1), comm)
        whole = BatchSampler(ids, 8, 6, seed=1)
        for _ in range(3):
            _, loss = ranked(*mine.sample())
            loss.backward()
            distributed.allreduce_gradients(ranked, comm)
            _, loss = alone(*whole.sample())
            loss.backward()
            for p, q in zip(ranked.parameters(), alone.parameters()):
                worst = max(worst, _rel(p.grad, q.grad))
            opt_r.step(), opt_a.step(), opt_r.zero_grad(), opt_a.zero_grad()
        for p, q in zip(ranked.parameters(), alone.parameters()):
            worst = max(worst, _rel(p.data, q.data))
        assert worst < 1e-12, worst
        if comm.gather_json(worst) is not None:
            print(f"average ok {worst:.1e}")
    elif what == "step":        # the sharded step over ranks, dropout on: one process's run to 1e-12
        ranked, alone = _model(0.2), _model(0.2, seed=9)
        distributed.broadcast_parameters(alone, comm)       # rank 0's seed-9 weights on both ranks...
        distributed.broadcast_parameters(ranked, comm)
        for p, q in zip(ranked.parameters(), alone.parameters()):
            q.data[...] = p.data                            # ...then seed 0's, on both models
        opt_r, opt_a = AdamW(ranked.parameters(), lr=1e-2), AdamW(alone.parameters(), lr=1e-2)
        sampler, worst, losses = BatchSampler(ids, 8, 8, seed=2), 0.0, []
        g_r, g_a = np.random.default_rng(5), np.random.default_rng(5)
        for _ in range(4):
            x, y = sampler.sample()
            y[1, :3] = -1                                   # ignored targets: unequal shard weights
            with random.thread_default_generator(g_r):
                lr_ = distributed.forward_backward(ranked, x, y, comm, shards=4)
            with random.thread_default_generator(g_a):
                la = parallel.forward_backward(alone, x, y, threads=1, shards=4)
            losses.append(lr_)
            worst = max(worst, abs(lr_ - la) / la)
            for p, q in zip(ranked.parameters(), alone.parameters()):
                worst = max(worst, _rel(p.grad, q.grad))
            opt_r.step(), opt_a.step(), opt_r.zero_grad(), opt_a.zero_grad()
        for p, q in zip(ranked.parameters(), alone.parameters()):
            worst = max(worst, _rel(p.data, q.data))
        assert worst < 1e-12, worst
        digest = [losses, [float(p.data.sum()) for p in ranked.parameters()]]
        everyone = comm.gather_json(digest)                 # printed by rank 0 alone: no interleaving
        if comm.rank == 0:
            assert everyone[0] == everyone[1], "the ranks' weights differ"
            print(f"step ok {worst:.1e}: {everyone[0]!r}")
    elif what == "broadcast":   # rank 0's weights and optimizer state reach rank 1
        model = _model(seed=comm.rank)
        opt = AdamW(model.parameters(), lr=1e-2)
        _, loss = model(*BatchSampler(ids, 8, 4, seed=comm.rank).sample())
        loss.backward()
        opt.step()
        distributed.broadcast_parameters(model, comm)
        distributed.broadcast_optimizer_state(opt, comm)
        digest = [float(p.data.sum()) for p in model.parameters()]
        state = opt.state_dict()
        digest += [float(np.sum(v)) for k, v in sorted(state.items()) if isinstance(v, np.ndarray)]
        everyone = comm.gather_json(digest)
        assert comm.allreduce(np.array([comm.rank + 1.0]))[0] == 3.0
        if comm.rank == 0:
            assert everyone[0] == everyone[1]
            print("broadcast ok")
    elif what == "raise":       # rank 1 raises while rank 0 waits in a collective
        with distributed.fail_together(comm):
            if comm.rank == 1:
                raise ValueError("injected failure")
            comm.barrier()
    elif what == "startup":     # rank 1 fails in a start-up stage: one agreed error on both
        try:
            with distributed.together(comm):
                if comm.rank == 1:
                    raise FileNotFoundError(2, "data file not found", "/nowhere/x.txt")
        except distributed.RankError as exc:
            everyone = comm.gather_json(str(exc))
            if comm.rank == 0:
                print("\n".join(f"rank {k}: agreed: {e}" for k, e in enumerate(everyone)))


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def checks():
    """One launch of rank_main("checks"): gradients averaged, broadcasts, an agreed start-up error."""
    r = run_ranks("checks")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_gradients_averaged_over_ranks_equal_the_full_batch_gradient(checks):
    assert checks.count("average ok") == 1


def test_broadcasts_give_every_rank_rank_0s_weights_and_optimizer_state(checks):
    assert checks.count("broadcast ok") == 1


def test_an_error_in_a_start_up_stage_is_agreed_by_every_rank(checks):
    agreed = sorted(line for line in checks.splitlines() if "agreed" in line)
    assert agreed == [f"rank {k}: agreed: rank 1: data file not found: /nowhere/x.txt" for k in (0, 1)]


def test_step_over_two_ranks_equals_one_process_to_1e12_and_repeats_bit_for_bit():
    first, second = run_ranks("step"), run_ranks("step")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("step ok") == 1
    assert first.stdout.split(": ", 1)[1] == second.stdout.split(": ", 1)[1]     # the same bits twice


def test_a_rank_that_raises_ends_both_with_one_message():
    r = run_ranks("raise", timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("npformer: error: rank 1: injected failure") == 1
    assert "rank 0" not in r.stderr.replace("rank 0 in comm", "")
