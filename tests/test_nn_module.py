"""Module and Parameter: registration order, names, state dicts, modes, grads, dtypes, copies."""

import copy

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from tests.helpers import DEVICE, T, host


class Toy(nn.Module):
    """Parameters and submodules interleaved, to pin down the registration order."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(nf.zeros(2, dtype=np.float64, device=DEVICE))
        self.lin = nn.Linear(3, 2, dtype=np.float64, device=DEVICE)
        self.register_buffer("steps", backend_xp().arange(4, dtype=np.float64))
        self.c = nn.Parameter(nf.ones(2, 2, dtype=np.float64, device=DEVICE))
        self.blocks = nn.ModuleList([nn.LayerNorm(2, dtype=np.float64, device=DEVICE),
                                     nn.Sequential(nn.Linear(2, 2, dtype=np.float64, device=DEVICE), nn.ReLU())])
        self.note = "plain attribute"

    def forward(self, x):
        h = self.lin(x) + self.a
        h = self.blocks[0](h) @ self.c
        return self.blocks[1](h)


def backend_xp():
    return nf.backend.xp_for(DEVICE)


# a module's own parameters first (in assignment order), then each submodule's, depth first (as torch)
EXPECTED_NAMES = ["a", "c", "lin.weight", "lin.bias", "blocks.0.weight", "blocks.0.bias",
                  "blocks.1.0.weight", "blocks.1.0.bias"]


def test_registration_order_and_names():
    m = Toy()
    assert [n for n, _ in m.named_parameters()] == EXPECTED_NAMES
    assert [n for n, _ in m.named_modules()] == ["", "lin", "blocks", "blocks.0", "blocks.1", "blocks.1.0",
                                                "blocks.1.1"]
    # state_dict: each module's parameters, then its buffers, then its submodules, depth first
    assert list(m.state_dict()) == ["a", "c", "steps", "lin.weight", "lin.bias", "blocks.0.weight",
                                    "blocks.0.bias", "blocks.1.0.weight", "blocks.1.0.bias"]
    assert m.num_parameters() == 2 + 6 + 2 + 4 + 2 + 2 + 4 + 2
    assert m.note == "plain attribute" and "note" not in m.state_dict()


def test_reassigning_a_name_moves_it_between_stores():
    m = Toy()
    m.a = 3.0                                   # no longer a parameter
    assert "a" not in dict(m.named_parameters()) and m.a == 3.0
    m.a = nn.Parameter(nf.zeros(5, dtype=np.float64, device=DEVICE))
    assert [n for n, _ in m.named_parameters()][:2] == ["c", "a"]     # re-registered after c
    del m.lin
    assert not any(n.startswith("lin.") for n in m.state_dict())


def test_shared_parameter_listed_once_but_saved_under_every_name():
    m = Toy()
    m.blocks[1][0].weight = m.c                 # weight tying
    names = [n for n, _ in m.named_parameters()]
    assert "blocks.1.0.weight" not in names and names.count("c") == 1
    sd = m.state_dict()
    assert sd["blocks.1.0.weight"] is sd["c"]


def test_state_dict_round_trip_is_in_place_and_keeps_dtype():
    src, dst = Toy(), Toy()
    rng = np.random.default_rng(0)
    for name, arr in src.state_dict().items():
        arr[...] = backend_xp().asarray(rng.standard_normal(arr.shape))
    before = {n: p for n, p in dst.named_parameters()}
    missing, unexpected = dst.load_state_dict({k: host(v).astype(np.float32) for k, v in src.state_dict().items()})
    assert missing == [] and unexpected == []
    for name, p in dst.named_parameters():
        assert p is before[name] and p.dtype == np.float64
        np.testing.assert_allclose(host(p), host(src.state_dict()[name]), rtol=1e-6)
    np.testing.assert_allclose(host(dst.steps), host(src.steps), rtol=1e-6)
    assert dst.steps.dtype == np.float64


def test_load_state_dict_strict_error_lists_every_problem():
    m = Toy()
    sd = {k: host(v) for k, v in m.state_dict().items()}
    del sd["lin.bias"]
    del sd["c"]
    sd["extra.weight"] = np.zeros(3)
    sd["blocks.0.weight"] = np.zeros(5)
    with pytest.raises(ValueError) as err:
        m.load_state_dict(sd)
    msg = str(err.value)
    for part in ("missing keys", "lin.bias", "'c'", "unexpected keys", "extra.weight", "wrong shapes",
                 "blocks.0.weight: expected (2,), got (5,)"):
        assert part in msg, part


def test_load_state_dict_non_strict_reports_and_loads_the_rest():
    m = Toy()
    sd = {"lin.weight": np.full((2, 3), 7.0), "ghost": np.zeros(1)}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert unexpected == ["ghost"] and "lin.bias" in missing and "lin.weight" not in missing
    assert (host(m.lin.weight) == 7.0).all()
    with pytest.raises(ValueError, match=r"lin.weight: expected \(2, 3\), got \(3, 2\)"):
        m.load_state_dict({"lin.weight": np.zeros((3, 2))}, strict=False)   # shapes are always checked


def test_train_eval_reach_every_submodule_and_change_dropout():
    m = nn.Sequential(nn.Linear(4, 4, device=DEVICE), nn.Sequential(nn.Dropout(0.5)))
    assert all(sub.training for sub in m.modules())
    m.eval()
    assert not any(sub.training for sub in m.modules())
    x = T(np.ones((8, 4), np.float32))
    np.testing.assert_array_equal(host(m[1](x)), host(x))                       # identity in eval
    m.train()
    assert all(sub.training for sub in m.modules())
    y = host(m[1](x))
    assert set(np.unique(y)) <= {0.0, 2.0} and (y == 0).any() and (y == 2).any()


def test_zero_grad_clears_every_parameter():
    m = Toy()
    x = T(np.random.default_rng(1).standard_normal((4, 3)))
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_to_dtype_casts_parameters_grads_and_float_buffers_in_place():
    m = Toy()
    m(T(np.ones((2, 3)))).sum().backward()
    ids = [id(p) for p in m.parameters()]
    m.to(dtype=np.float32)
    assert [id(p) for p in m.parameters()] == ids
    assert all(p.dtype == np.float32 and p.grad.dtype == np.float32 for p in m.parameters())
    assert m.steps.dtype == np.float32
    out = m(T(np.ones((2, 3), np.float32)))
    assert out.dtype == np.float32
    m.double()
    assert all(p.dtype == np.float64 for p in m.parameters())


def test_deepcopy_gives_independent_equal_parameters():
    m = Toy()
    c = copy.deepcopy(m)
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), c.named_parameters()):
        assert n1 == n2 and p1 is not p2
        np.testing.assert_array_equal(host(p1), host(p2))
    c.lin.weight.data[...] = 0
    assert np.abs(host(m.lin.weight)).sum() > 0


def test_containers_index_iterate_and_slice():
    layers = nn.ModuleList([nn.Linear(2, 2, device=DEVICE) for _ in range(3)])
    assert len(layers) == 3 and list(layers)[2] is layers[-1]
    assert isinstance(layers[1:], nn.ModuleList) and layers[1:][0] is layers[1]
    with pytest.raises(IndexError, match="index 3 is out of range for 3 modules"):
        layers[3]
    with pytest.raises(TypeError, match="entries must be Modules"):
        layers.append(lambda x: x)
    seq = nn.Sequential(nn.Identity(), nn.Tanh())
    assert isinstance(seq[:1], nn.Sequential)
    assert "(1): Tanh" in repr(seq)


def test_module_without_forward_or_init_says_so():
    class NoForward(nn.Module):
        pass

    with pytest.raises(NotImplementedError, match="NoForward.forward"):
        NoForward()(1)

    class NoInit(nn.Module):
        def __init__(self):
            self.w = 1

    with pytest.raises(AttributeError, match=r"NoInit: call super\(\).__init__\(\)"):
        NoInit()


def test_a_non_persistent_buffer_is_used_but_left_out_of_state_dict_and_loading():
    m = nn.Module()
    m.register_buffer("kept", np.arange(3.0))
    m.register_buffer("table", np.ones(2), persistent=False)
    assert [n for n, _ in m.named_buffers()] == ["kept", "table"] and host(m.table).tolist() == [1.0, 1.0]
    assert list(m.state_dict()) == ["kept"]
    assert m.load_state_dict({"kept": np.zeros(3)}) == ([], [])
    with pytest.raises(ValueError, match="unexpected keys: \\['table'\\]"):
        m.load_state_dict({"kept": np.zeros(3), "table": np.zeros(2)})
    m.register_buffer("table", np.ones(2))                 # registered again as persistent: saved again
    assert list(m.state_dict()) == ["kept", "table"]
