"""npformer.optim state dicts: a round trip through np.savez continues identically, and
load_state_dict names what differs or is wrong (the optimizer left unchanged)."""

import re

import numpy as np
import pytest

from npformer import backend, optim
from tests.helpers import T, host
from tests.test_optim import drive, groups_of, make_data, run_ours


# ----------------------------------------------------------------------------- state dict

@pytest.mark.parametrize("cls,kwargs", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)),
                                        ("SGD", dict(lr=0.1)),
                                        ("Adam", dict(lr=0.01, weight_decay=0.1)),
                                        ("AdamW", dict(lr=0.01, betas=(0.8, 0.95)))])
def test_state_dict_round_trip_through_npz_continues_identically(tmp_path, cls, kwargs):
    init, grads = make_data(3)
    names = ["a.weight", "a.bias", "scale"]
    spec = [{"idx": [0, 1], "param_names": names[:2], "lr": 0.02}, {"idx": [2], "param_names": names[2:]}]
    full, _, _ = run_ours(cls, kwargs, init, grads, spec)

    half, params, opt = run_ours(cls, kwargs, init, grads[:5], spec)
    sd = opt.state_dict()
    assert all(isinstance(v, (int, float, str, list, np.ndarray)) for v in sd.values()), sd
    np.savez(tmp_path / "opt.npz", **sd)
    fresh = [T(host(p).copy(), requires_grad=True) for p in params]
    opt.step()  # the saved copy must not change with later steps
    np.savez(tmp_path / "again.npz", **sd)
    assert (tmp_path / "opt.npz").read_bytes() == (tmp_path / "again.npz").read_bytes()

    other = dict(kwargs, lr=kwargs["lr"] * 7)  # options come from the state, not the constructor
    opt2 = getattr(optim, cls)(groups_of(fresh, [dict(g, lr=0.5) for g in spec]), **other)
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as z:
        opt2.load_state_dict(z)
    assert [g["lr"] for g in opt2.param_groups] == [0.02, kwargs["lr"]]
    assert all(type(g["lr"]) is float for g in opt2.param_groups)
    for p in fresh:
        for value in opt2.state.get(p, {}).values():
            if backend.is_array(value):
                assert backend.device_of(value) == p.device and value.dtype == p.dtype
    for got, want in zip(drive(opt2, fresh, grads[5:]), full[5:]):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def _adam(shapes, names=None, groups=1, cls="Adam"):
    params = [T(np.ones(s), requires_grad=True) for s in shapes]
    for p in params:
        p.grad = T(np.full(p.shape, 0.5)).data
    if groups == 2:
        params = [{"params": params[:1]}, {"params": params[1:]}]
    elif names:
        params = [{"params": params, "param_names": names}]
    opt = getattr(optim, cls)(params, lr=0.1)
    opt.step()
    return opt


@pytest.mark.parametrize("target,match", [
    (dict(shapes=[(3, 4), (5,)], groups=2), r"parameter groups differ: 1 in the state, 2 in the optimizer"),
    (dict(shapes=[(3, 4), (5,), (2,)]), r"group 0 has 2 parameters in the state, 3 in the optimizer"),
    (dict(shapes=[(3, 4), (6,)]), r"group 0 parameter 1 has shape \(6,\).*shape \(5,\)"),
    (dict(shapes=[(4, 3), (5,)], names=["w", "b"]), r"group 0 parameter 0 \('w'\) has shape \(4, 3\)"),
    (dict(shapes=[(3, 4), (5,)], cls="AdamW"), r"cannot load a Adam state into AdamW"),
])
def test_load_state_dict_mismatch_names_what_differs(target, match):
    saved = _adam([(3, 4), (5,)]).state_dict()
    opt = _adam(**target)
    before = {id(p): {k: host(v).copy() for k, v in s.items() if k != "step"} for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    for p, s in opt.state.items():  # nothing changed
        assert s["step"] == 1 and all(np.array_equal(host(s[k]), v) for k, v in before[id(p)].items())


def test_load_state_dict_rejects_bad_entries():
    opt = _adam([(3, 4), (5,)], names=["w", "b"])
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=r"parameter 1 is 'bias', the optimizer has 'b'"):
        opt.load_state_dict({**sd, "group.0.param_names": ["w", "bias"]})
    with pytest.raises(ValueError, match=r"state 'exp_avg' of group 0 parameter 1 \('b'\) has shape \(4,\)"):
        opt.load_state_dict({**sd, "state.0.1.exp_avg": np.zeros(4)})
    with pytest.raises(ValueError, match="unexpected key 'momentum'"):
        opt.load_state_dict({**sd, "momentum": 1.0})
    with pytest.raises(ValueError, match=r"refers to index '7'"):
        opt.load_state_dict({**sd, "state.0.7.exp_avg": np.zeros(5)})
    with pytest.raises(ValueError, match="betas"):
        opt.load_state_dict({**sd, "group.0.betas": [0.9, 1.5]})
    with pytest.raises(ValueError, match="no 'n_groups' entry"):
        opt.load_state_dict({k: v for k, v in sd.items() if k != "n_groups"})
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def _exactly(message):
    return "^" + re.escape(message) + "$"


@pytest.mark.parametrize("entry,message", [
    ({"state.0.2.exp_avg": np.zeros(5)}, "optimizer state key 'state.0.2.exp_avg' refers to index '2', "
                                         "but there are only 2"),
    ({"scalar.1.0.step": 1}, "optimizer state key 'scalar.1.0.step' refers to index '1', but there are only 1"),
    ({"group.1.lr": 0.1}, "optimizer state key 'group.1.lr' refers to index '1', but there are only 1"),
    ({"state.0": np.zeros(5)}, "Adam.load_state_dict: unexpected key 'state.0'"),
    ({"param.0": [5]}, "Adam.load_state_dict: unexpected key 'param.0'"),
    ({"param.0.1.size": [5]}, "Adam.load_state_dict: unexpected key 'param.0.1.size'"),
    ({"group.0.param_names": ["w"]}, "optimizer state group 0 was saved with 1 parameter names, the optimizer has 2"),
    ({"moments.0.1.exp_avg": np.zeros(5)}, "Adam.load_state_dict: unexpected key 'moments.0.1.exp_avg'"),
    ({"n_groups": np.array([1, 1])}, "optimizer state entry 'n_groups' should be a single value; got shape (2,)"),
    ({"scalar.0.1.step": np.array([1, 2])},
     "optimizer state entry 'scalar.0.1.step' should be a single value; got shape (2,)"),
    ({"group.0.param_names": ["w", "bias"]}, "optimizer state group 0 parameter 1 is 'bias', the optimizer has 'b'"),
])
def test_load_state_dict_names_the_bad_key(entry, message):
    """An index equal to the count is out of range; a key of the wrong form or a non-scalar count is
    refused, naming the key, and nothing changes."""
    opt = _adam([(3, 4), (5,)], names=["w", "b"])
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=_exactly(message)):
        opt.load_state_dict({**sd, **entry})
    assert all(s["step"] == 1 for s in opt.state.values())


def test_state_dict_round_trip_leaves_the_groups_as_they_were():
    opt = _adam([(3, 4), (5,)], names=["w", "b"])
    before = [dict(g) for g in opt.param_groups]
    opt.load_state_dict(opt.state_dict())
    assert [set(g) for g in opt.param_groups] == [set(g) for g in before]       # no n_params option
    assert all(g == b for g, b in zip(opt.param_groups, before))


def test_state_saved_in_float64_loads_in_the_parameters_dtype():
    saved = _adam([(3, 4), (5,)]).state_dict()
    params = [T(np.ones(s), requires_grad=True, dtype=np.float32) for s in [(3, 4), (5,)]]
    opt = optim.Adam(params, lr=0.1)
    opt.load_state_dict(saved)
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            value = opt.state[p][key]
            assert value.dtype == np.float32 and backend.device_of(value) == p.device
            np.testing.assert_array_equal(host(value), saved[f"state.0.{i}.{key}"].astype(np.float32))


def test_state_dict_values_are_plain_and_custom_options_round_trip(tmp_path):
    """Options a group carries beyond the optimizer's own (any name, dots included) are saved as
    Python values (NumPy scalars turned into numbers), restored by load_state_dict; shapes are int64."""
    ps = [T(np.ones(3), requires_grad=True), T(np.array(2.0), requires_grad=True)]
    extra = {"tag": "encoder", "scale": np.float32(0.5), "ids": (np.int64(1), 2), "sched.warmup": 100}
    opt = optim.SGD([{"params": ps, **extra}], lr=0.1)
    sd = opt.state_dict()
    assert sd["group.0.tag"] == "encoder" and sd["group.0.ids"] == [1, 2] and sd["group.0.sched.warmup"] == 100
    assert type(sd["group.0.scale"]) is float and sd["group.0.scale"] == 0.5
    assert all(type(v) is int for v in sd["group.0.ids"])
    for i in range(2):
        shape = sd[f"param.0.{i}.shape"]
        assert shape.dtype == np.int64 and tuple(shape) == ps[i].shape
    np.savez(tmp_path / "opt.npz", **sd)
    other = optim.SGD([{"params": ps, "tag": "decoder", "scale": 1.0, "ids": [], "sched.warmup": 0}], lr=0.1)
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as z:
        other.load_state_dict(z)
    group = other.param_groups[0]
    assert {k: group[k] for k in extra} == {"tag": "encoder", "scale": 0.5, "ids": [1, 2], "sched.warmup": 100}


@pytest.mark.parametrize("where,message", [
    ("option", "group 0 option 'extra' is a object; a state dict holds only numbers, strings and lists"),
    ("option in a list", "group 0 option 'extra' is a object; a state dict holds only numbers, strings and lists"),
    ("state", "state 'note' is a object; a state dict holds only numbers, strings and lists"),
])
def test_state_dict_refuses_what_savez_would_pickle(where, message):
    p = T(np.ones(2), requires_grad=True)
    opt = optim.SGD([{"params": [p]}], lr=0.1)
    if where == "state":
        opt.state[p] = {"note": object()}
    else:
        opt.param_groups[0]["extra"] = object() if where == "option" else [1, object()]
    with pytest.raises(TypeError, match=_exactly(message)):
        opt.state_dict()


class _Averaging(optim.SGD):
    """SGD that also keeps the running mean of each parameter, under state names with dots."""

    def _update(self, x, grad, state, opts):
        super()._update(x, grad, state, opts)
        n = state.get("mean.count", 0) + 1
        mean = state.get("mean.value")
        state["mean.value"] = x.copy() if mean is None else mean + (x - mean) / n
        state["mean.count"] = n


def test_a_subclass_with_dotted_state_names_round_trips():
    init, grads = make_data(12, steps=4)
    params = [T(a.copy(), requires_grad=True) for a in init]
    opt = _Averaging(params, lr=0.1, momentum=0.5)
    drive(opt, params, grads)
    sd = opt.state_dict()
    assert "state.0.0.mean.value" in sd and sd["scalar.0.0.mean.count"] == 4
    fresh = [T(host(p).copy(), requires_grad=True) for p in params]
    again = _Averaging(fresh, lr=0.1, momentum=0.5)
    again.load_state_dict(sd)
    for p, q in zip(params, fresh):
        assert set(again.state[q]) == set(opt.state[p]) == {"momentum_buffer", "mean.value", "mean.count"}
        assert again.state[q]["mean.count"] == opt.state[p]["mean.count"]
        np.testing.assert_array_equal(host(again.state[q]["mean.value"]), host(opt.state[p]["mean.value"]))
