"""npformer.optim state dicts: a round trip through np.savez continues identically, and
load_state_dict names what differs or is wrong (the optimizer left unchanged)."""

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
