"""npformer.distributed in one process: the single-process communicator, the helpers on it, each
rank's share of a batch, the launcher detection, the fault rules, and the NCCL names.

The runs over several ranks (mpiexec -n 2) are in test_distributed_mpi.py and
test_distributed_pretrain.py. Everything here is host-side and runs under NPFORMER_DEVICE=gpu
too; the one GPU check (marked gpu) skips without CuPy, a GPU, NCCL or mpi4py.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from npformer import distributed
from npformer.data import BatchSampler
from npformer.distributed import faults, nccl
from npformer.models.gpt import GPT, GPTConfig
from npformer.optim import AdamW
from npformer.training import parallel

CFG = dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)


def make(seed=0, **overrides):
    return GPT(GPTConfig(**{**CFG, **overrides}), generator=np.random.default_rng(seed), dtype=np.float64,
               device="cpu")


def batch(B=8, T=8, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 11, (B, T)), rng.integers(0, 11, (B, T))


def test_single_process_communicator_leaves_arrays_and_checks_arguments():
    comm = distributed.SingleProcess()
    a = np.arange(4.0)
    assert comm.allreduce(a, "max") is a and a.tolist() == [0, 1, 2, 3]
    assert comm.broadcast(a) is a
    assert comm.gather_json({"k": 1}) == [{"k": 1}] and comm.broadcast_json([1, "x"]) == [1, "x"]
    comm.barrier()
    assert (comm.rank, comm.size, comm.local_rank, comm.local_size) == (0, 1, 0, 1)
    with pytest.raises(ValueError, match="op must be one of sum, max, min; got 'prod'"):
        comm.allreduce(a, "prod")
    with pytest.raises(ValueError, match=r"root must be a rank in \[0, 1\); got 1"):
        comm.broadcast(a, root=1)
    with pytest.raises(SystemExit) as exc:
        comm.abort(3)
    assert exc.value.code == 3


def test_share_splits_a_batch_evenly_and_refuses_a_remainder():
    assert [distributed.share(12, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    rows = np.concatenate([np.arange(16)[distributed.share(16, r, 4)] for r in range(4)])
    assert rows.tolist() == list(range(16))                 # every row once, in order
    with pytest.raises(ValueError, match=r"--batch-size \(10\) must be divisible by the rank count \(4\)"):
        distributed.share(10, 0, 4)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\); got 2"):
        distributed.share(4, 2, 2)


class _Rank:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_distributed_sampler_gives_each_rank_its_rows_of_the_same_global_batch():
    ids = np.arange(500)
    whole = BatchSampler(ids, 6, 8, seed=5)
    ranks = [distributed.DistributedSampler(BatchSampler(ids, 6, 8, seed=5), _Rank(r, 4)) for r in range(4)]
    for _ in range(3):
        x, y = whole.sample()
        parts = [s.sample() for s in ranks]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
        assert all(p[0].shape == (2, 6) for p in parts)
    state = ranks[1].state_dict()
    assert state == whole.state_dict()                      # the same state on every rank
    other = distributed.DistributedSampler(BatchSampler(ids, 6, 8, seed=0), _Rank(1, 4))
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.sample()[0], ranks[1].sample()[0])
    with pytest.raises(ValueError, match=r"--batch-size \(8\) must be divisible by the rank count \(3\)"):
        distributed.DistributedSampler(BatchSampler(ids, 6, 8), _Rank(0, 3))


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, ("MPICH hydra", 1, 2, 1)),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     ("Open MPI", 3, 4, 0)),
    ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "1"}, ("MVAPICH", 0, 1, None)),
    ({"OMPI_COMM_WORLD_RANK": "0"}, None),                  # half a launcher's variables: none
])
def test_detect_reads_the_launchers_variables(env, want):
    got = distributed.detect(env)
    assert (None if got is None else (got.launcher, got.rank, got.size, got.local_rank)) == want


def test_detect_refuses_variables_that_are_not_a_rank():
    with pytest.raises(ValueError, match="PMI_RANK=2 is not a rank of PMI_SIZE=2"):
        distributed.detect({"PMI_RANK": "2", "PMI_SIZE": "2"})
    with pytest.raises(ValueError, match="are not integers"):
        distributed.detect({"PMI_RANK": "x", "PMI_SIZE": "2"})


def test_communicator_choice_and_no_mpi_at_import():
    assert isinstance(distributed.communicator("single"), distributed.SingleProcess)
    with pytest.raises(ValueError, match="communicator kind must be one of single, mpi, nccl; got 'gloo'"):
        distributed.communicator("gloo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_"))}
    code = ("import sys, npformer, npformer.distributed as d, npformer.training.pretrain, npformer.cli\n"
            "assert d.detect() is None and isinstance(d.communicator(), d.SingleProcess)\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_helpers_on_one_rank_keep_gradients_parameters_and_state():
    model = make()
    x, y = batch()
    _, loss = model(x, y)
    loss.backward()
    params = model.parameters()
    params[0].grad = None                                   # no rank gave it a gradient: stays None
    before = [None if p.grad is None else p.grad.copy() for p in params]
    comm = distributed.SingleProcess()
    distributed.allreduce_gradients(model, comm)
    assert params[0].grad is None
    for p, g in zip(params[1:], before[1:]):
        np.testing.assert_array_equal(p.grad, g)
    with pytest.raises(ValueError, match="op must be 'mean' or 'sum'"):
        distributed.allreduce_gradients(model, comm, "max")
    opt = AdamW(model.parameters(), lr=1e-2)
    opt.step()
    state = opt.state_dict()
    distributed.broadcast_parameters(model, comm)
    distributed.broadcast_optimizer_state(opt, comm)
    for k, v in opt.state_dict().items():
        assert np.array_equal(v, state[k]) if isinstance(v, np.ndarray) else v == state[k], k
    assert distributed.any_rank(comm, True) and not distributed.any_rank(comm, False)


def test_step_on_one_rank_is_the_sharded_single_process_step_bit_for_bit():
    from npformer import random
    x, y = batch()
    y[2, :3] = -1                                           # ignored targets change the shard weights
    a, b = make(dropout=0.2), make(dropout=0.2)
    with random.thread_default_generator(np.random.default_rng(7)):
        la = distributed.forward_backward(a, x, y, distributed.SingleProcess(), shards=4)
    with random.thread_default_generator(np.random.default_rng(7)):
        lb = parallel.forward_backward(b, x, y, threads=1, shards=4)
    assert la == lb
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=n)


def test_global_shards_and_rank_pieces():
    assert distributed.global_shards(16, 2048, 2) == 4               # as one process with 2 workers
    assert distributed.global_shards(16, 2048, 2, device="gpu") == 2  # a GPU: one shard per rank
    assert distributed.global_shards(2, 2048, 2, shards=8) == 2       # capped at the batch
    with pytest.raises(ValueError, match=r"--shards \(3\) must be a multiple of the rank count \(2\)"):
        distributed.global_shards(16, 2048, 2, shards=3)
    x, y = batch(B=8)
    mine = [distributed.rank_pieces(x, y, _Rank(r, 2), shards=4) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([p[0] for m in mine for p in m]), x)
    assert sum(p[2] for m in mine for p in m) == pytest.approx(1.0)


def test_together_raises_one_error_naming_the_rank_on_every_rank():
    comm = distributed.SingleProcess()
    with distributed.together(comm):
        pass
    with pytest.raises(distributed.RankError, match="^data file not found: x$") as exc:
        with distributed.together(comm):
            raise FileNotFoundError(2, "data file not found", "x")
    assert getattr(exc.value, faults.ON_ALL_RANKS)
    with pytest.raises(distributed.RankError, match="^rank 1: boom [(]rank 3 failed too[)]$"):
        faults.agree(_Gathered([None, "boom", None, "other"]), ValueError("x"))


class _Gathered(distributed.SingleProcess):
    """Rank 0 of a run whose ranks reported `errors` (for agree's verdict)."""

    def __init__(self, errors):
        self.errors, self.size = errors, len(errors)

    def gather_json(self, obj, root=0):
        return self.errors


def test_check_same_names_the_rank_and_the_differences():
    distributed.check_same(distributed.SingleProcess(), {"a": 1})
    comm = _Gathered([{"npformer": "0.1", "config": {"lr": 0.002, "seed": 1}},
                      {"npformer": "0.1", "config": {"lr": 0.001, "seed": 1}}])
    with pytest.raises(distributed.RankError, match=r"rank 1 differs from rank 0 in config.lr "
                                                    r"\(rank 0: 0.002, rank 1: 0.001\)"):
        distributed.check_same(comm, {})


def test_fail_together_aborts_on_its_own_error_and_lets_agreed_ones_through(capsys):
    class Two(distributed.SingleProcess):
        size, rank = 2, 1

        def abort(self, code=1):
            raise SystemExit(f"aborted {code}")
    with pytest.raises(SystemExit, match="aborted 2"):
        with distributed.fail_together(Two()):
            raise MemoryError("out of memory in the training step of step 3")
    assert capsys.readouterr().err == "npformer: error: rank 1: out of memory in the training step of step 3\n"
    with pytest.raises(SystemExit) as exc:                  # agreed: rank 1 leaves quietly
        with distributed.fail_together(Two()):
            raise distributed.on_all_ranks(FloatingPointError("training loss became nan"))
    assert exc.value.code == 2 and capsys.readouterr().err == ""
    with pytest.raises(TypeError):                          # one rank: the command line reports it
        with distributed.fail_together(distributed.SingleProcess()):
            raise TypeError("bug")
    assert faults.describe(TypeError("bad")) == "TypeError: bad"


def _nccl_binary_names() -> bytes:
    import glob
    import cupy_backends
    found = glob.glob(os.path.join(os.path.dirname(cupy_backends.__file__), "cuda", "libs", "nccl*"))
    return b"".join(open(f, "rb").read() for f in found if f.endswith((".so", ".pyd")))


def test_every_nccl_name_used_exists_in_the_installed_cupy():
    pytest.importorskip("cupy_backends", reason="CuPy is not installed (the gpu extra)")
    with warnings.catch_warnings():                          # "nccl library could not be loaded"
        warnings.simplefilter("ignore")
        from cupy.cuda import nccl as cupy_nccl
    if cupy_nccl.available:                                  # the NCCL library loads: ask the module
        missing = [n for n in nccl.NCCL_NAMES if not hasattr(cupy_nccl, n)]
        missing += [m for m in nccl.NCCL_METHODS if not hasattr(cupy_nccl.NcclCommunicator, m)]
    else:                                                    # it does not: the compiled bindings' names
        binary = _nccl_binary_names()
        missing = [n for n in nccl.NCCL_NAMES[1:] + nccl.NCCL_METHODS if n.encode() not in binary]
    assert not missing, f"cupy.cuda.nccl lacks {missing}"
    source = open(nccl.__file__).read()
    used = {n for n in nccl.NCCL_NAMES + nccl.NCCL_METHODS if f".{n}" in source or f"nccl.{n}" in source}
    assert used == set(nccl.NCCL_NAMES + nccl.NCCL_METHODS) - {"available"}


@pytest.mark.gpu
def test_nccl_communicator_on_one_gpu():
    from npformer import backend
    if not backend.gpu_available():
        pytest.skip(f"no GPU: {backend.gpu_unavailable_reason()}")
    pytest.importorskip("mpi4py", reason="the NCCL id travels over MPI: pip install 'npformer[mpi]'")
    from cupy.cuda import nccl as cupy_nccl
    if not cupy_nccl.available:
        pytest.skip("CuPy cannot load NCCL (pip install nvidia-nccl-cu12)")
    import cupy
    comm = distributed.communicator("nccl")
    a = cupy.arange(5, dtype=cupy.float32)
    comm.allreduce(a)
    comm.broadcast(a)
    np.testing.assert_array_equal(cupy.asnumpy(a), np.arange(5, dtype=np.float32))
    model = GPT(GPTConfig(**CFG), generator=np.random.default_rng(0), device="gpu")
    _, loss = model(*[backend.to_device(v, "gpu") for v in batch()])
    loss.backward()
    before = [cupy.asnumpy(p.grad) for p in model.parameters()]
    distributed.allreduce_gradients(model, comm)
    for p, g in zip(model.parameters(), before):
        np.testing.assert_array_equal(cupy.asnumpy(p.grad), g)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes need fork (Linux)")
def test_a_rank_can_run_its_shards_on_worker_processes_bit_for_bit():
    from npformer import random
    from npformer.training.workers import ShardWorkers
    x, y = batch()
    a, b = make(dropout=0.2), make(dropout=0.2)
    with ShardWorkers(a, 2) as pool, random.thread_default_generator(np.random.default_rng(3)):
        la = distributed.forward_backward(a, x, y, distributed.SingleProcess(), workers=2, shards=4, pool=pool)
    with random.thread_default_generator(np.random.default_rng(3)):
        lb = parallel.forward_backward(b, x, y, threads=2, shards=4)
    assert la == lb
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=n)
