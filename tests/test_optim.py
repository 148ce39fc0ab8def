"""npformer.optim: optimizers step for step against torch.optim (float64), dtype and identity of
updated arrays, gradient clipping, schedules, parameter groups (state dicts: tests/test_optim_state.py)."""

import functools
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npformer import backend, optim
from tests.helpers import T, host

SHAPES = [(3, 4), (5,), ()]
STEPS = 10
TOL = dict(rtol=1e-12, atol=1e-13)


def make_data(seed, shapes=SHAPES, steps=STEPS):
    """Initial values and a gradient sequence; some grads are None (skipped by both libraries)."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]
    if steps > 3:
        grads[0][1] = None  # state is created late for this one
        grads[3][2] = None
    return init, grads


def groups_of(params, spec):
    """spec: None (one plain list) or [{"idx": [...], option: value}, ...]."""
    if spec is None:
        return params
    return [{"params": [params[i] for i in g["idx"]], **{k: v for k, v in g.items() if k != "idx"}}
            for g in spec]


def drive(opt, params, grads, dtype=None, before=None):
    """Step `opt` through `grads` (calling before(it) first); each step must update p.data in
    place, keep its dtype and leave the grads alone. Returns host copies after every step."""
    arrays, traj = [p.data for p in params], []
    for it, gs in enumerate(grads):
        if before:
            before(it)
        for p, g in zip(params, gs):
            p.grad = None if g is None else T(g.copy(), dtype=dtype).data  # copies: T shares memory
        opt.step()
        for p, a, g in zip(params, arrays, gs):
            assert p.data is a and (g is None or np.array_equal(host(p.grad), np.asarray(g, p.dtype)))
        traj.append([host(p).copy() for p in params])
    return traj


def run_ours(cls, kwargs, init, grads, spec=None, dtype=None):
    params = [T(a.copy(), requires_grad=True, dtype=dtype) for a in init]
    opt = getattr(optim, cls)(groups_of(params, spec), **kwargs)
    return drive(opt, params, grads, dtype), params, opt


def run_torch(torch, cls, kwargs, init, grads, spec=None, schedule=None):
    params = [torch.tensor(a, requires_grad=True) for a in init]
    opt = getattr(torch.optim, cls)(groups_of(params, spec), **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    traj = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else torch.tensor(g)
        opt.step()
        if sched:
            sched.step()
        traj.append([p.detach().numpy().copy() for p in params])
    return traj, params, opt


def assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for i, (x, y) in enumerate(zip(a, b)):
            np.testing.assert_allclose(x, y, err_msg=f"step {step} parameter {i}", **TOL)


def sgd_configs():
    for mu, damp, wd, nesterov in itertools.product((0.0, 0.9), (0.0, 0.25), (0.0, 0.1), (False, True)):
        if not nesterov or (mu > 0 and damp == 0):
            yield dict(lr=0.1, momentum=mu, dampening=damp, weight_decay=wd, nesterov=nesterov)


def adam_configs(wds):
    for wd, betas, eps in itertools.product(wds, ((0.9, 0.999), (0.5, 0.0), (0.0, 0.9)), (1e-8, 0.5)):
        yield dict(lr=0.01, betas=betas, eps=eps, weight_decay=wd)


CONFIGS = ([("SGD", c) for c in sgd_configs()] + [("Adam", c) for c in adam_configs((0.0, 0.1))]
           + [("AdamW", c) for c in adam_configs((0.0, 1e-2, 0.3))] + [("Adam", {}), ("AdamW", {})])


# ----------------------------------------------------------------------------- against torch.optim

@pytest.mark.verify
@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=lambda v: v if isinstance(v, str) else None)
def test_matches_torch_step_for_step(cls, kwargs):
    torch = pytest.importorskip("torch")
    init, grads = make_data(0)
    ours, params, opt = run_ours(cls, kwargs, init, grads)
    theirs, tparams, topt = run_torch(torch, cls, kwargs, init, grads)
    assert_same_trajectory(ours, theirs)
    for p, tp in zip(params, tparams):  # the optimizer state agrees too
        mine, ref = opt.state.get(p, {}), topt.state[tp]
        assert set(mine) == set(ref)
        for key in mine:
            want = ref[key].item() if key == "step" else ref[key].numpy()
            np.testing.assert_allclose(host(mine[key]) if key != "step" else mine[key], want, **TOL)


@pytest.mark.verify
@pytest.mark.parametrize("cls,kwargs", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
                                        ("Adam", dict(lr=0.01, weight_decay=0.01)),
                                        ("AdamW", dict(lr=0.01))])
def test_param_groups_with_own_lr_and_weight_decay(cls, kwargs):
    torch = pytest.importorskip("torch")
    spec = [{"idx": [0], "lr": 0.05, "weight_decay": 0.2}, {"idx": [2, 1]}]
    init, grads = make_data(1)
    ours, _, opt = run_ours(cls, kwargs, init, grads, spec)
    theirs, _, _ = run_torch(torch, cls, kwargs, init, grads, spec)
    assert_same_trajectory(ours, theirs)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[1]["lr"] == kwargs["lr"]


# ----------------------------------------------------------------------------- dtype and identity

@pytest.mark.parametrize("cls,kwargs", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)),
                                        ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5)),
                                        ("Adam", dict(lr=0.01, weight_decay=0.1)),
                                        ("AdamW", dict(lr=0.01, weight_decay=0.1))])
def test_float32_stays_float32_in_place(cls, kwargs):
    init, grads = make_data(4)
    params = [T(a.copy(), requires_grad=True, dtype=np.float32) for a in init]
    opt = getattr(optim, cls)(params, **kwargs)
    optim.set_lr(opt, np.float64(kwargs["lr"]))       # NumPy scalars are turned into Python floats
    opt.param_groups[0]["weight_decay"] = np.float64(kwargs.get("weight_decay", 0.0))
    last = drive(opt, params, grads, dtype=np.float32)[-1]
    assert type(opt.param_groups[0]["lr"]) is float and type(opt.param_groups[0]["weight_decay"]) is float
    for p in params:
        assert p.dtype == np.float32 and all(v.dtype == np.float32 for v in opt.state[p].values()
                                             if backend.is_array(v))
    ref, _, _ = run_ours(cls, kwargs, init, grads)  # float64 run
    for a, r in zip(last, ref[-1]):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kwargs", [("SGD", dict(lr=0.1, momentum=0.9)),
                                        ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)),
                                        ("Adam", dict(lr=0.01, weight_decay=0.1))])
def test_float64_grads_on_float32_parameters_leave_them_and_their_state_float32(cls, kwargs):
    init, grads = make_data(5)
    params = [T(a.copy(), requires_grad=True, dtype=np.float32) for a in init]
    opt = getattr(optim, cls)(params, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else T(g.copy()).data          # float64
        opt.step()
    ref, _, _ = run_ours(cls, kwargs, init, grads)                    # all float64
    for p, r in zip(params, ref[-1]):
        assert p.dtype == np.float32 and all(v.dtype == np.float32 for v in opt.state[p].values()
                                             if backend.is_array(v))
        np.testing.assert_allclose(host(p), r, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- API and arguments

@pytest.mark.parametrize("make,match", [
    (lambda ps: optim.SGD(ps, lr=-0.1), r"\blr must be >= 0"),
    (lambda ps: optim.SGD(ps, lr=float("nan")), r"\blr must be >= 0"),
    (lambda ps: optim.SGD(ps, lr="fast"), r"\blr must be a real number"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=-0.9), "momentum must be >= 0"),
    (lambda ps: optim.SGD(ps, lr=0.1, weight_decay=-1), "weight_decay must be >= 0"),
    (lambda ps: optim.SGD(ps, lr=0.1, nesterov=True), "nesterov=True needs momentum > 0"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening == 0"),
    (lambda ps: optim.Adam(ps, lr=-1e-3), r"\blr must be >= 0"),
    (lambda ps: optim.AdamW(ps, betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
    (lambda ps: optim.Adam(ps, betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
    (lambda ps: optim.Adam(ps, betas=(0.9,)), "betas must be a pair"),
    (lambda ps: optim.AdamW(ps, eps=-1e-8), "eps must be >= 0"),
    (lambda ps: optim.Adam(ps, weight_decay=-0.1), "weight_decay must be >= 0"),
    (lambda ps: optim.Adam([{"params": ps[:1], "lr": -1.0}, {"params": ps[1:]}]), r"\blr must be >= 0"),
    (lambda ps: optim.Adam([]), "empty parameter list"),
    (lambda ps: optim.Adam([{"params": ps}, {"params": ps[:1]}]), "more than one parameter group"),
    (lambda ps: optim.Adam([ps[0] * 2]), "not a leaf tensor"),
    (lambda ps: optim.Adam([{"params": ps, "param_names": ["a"]}]), "param_names has 1 names for 2"),
])
def test_bad_arguments_raise_value_error_naming_them(make, match):
    params = [T(np.ones((2, 2)), requires_grad=True), T(np.ones(2), requires_grad=True)]
    with pytest.raises(ValueError, match=match):
        make(params)


def test_bad_types_edited_options_and_grad_shapes_are_caught():
    p = T(np.ones(3), requires_grad=True)
    with pytest.raises(TypeError, match="not a single Tensor"):
        optim.SGD(p, lr=0.1)
    with pytest.raises(TypeError, match="parameter 0 is a ndarray"):
        optim.SGD([np.ones(3)], lr=0.1)
    opt = optim.Adam([p])
    opt.param_groups[0]["lr"] = -1.0  # checked again at step time
    p.grad = T(np.ones(3)).data
    with pytest.raises(ValueError, match=r"\blr must be >= 0"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.1
    p.grad = T(np.ones(4)).data
    with pytest.raises(ValueError, match=r"group 0 parameter 0: grad shape \(4,\)"):
        opt.step()


def test_zero_grad_and_closure():
    p, q = T(np.array([1.0, -2.0]), requires_grad=True), T(np.ones(3), requires_grad=True)
    opt = optim.SGD([p, q], lr=0.5, momentum=0.5)
    loss = opt.step(lambda: (p * p).sum().backward() or 7.0)  # grad = 2p
    assert loss == 7.0 and np.allclose(host(p), [0.0, 0.0])
    p.grad = T(np.ones(2)).data
    opt.zero_grad(set_to_none=False)
    assert np.array_equal(host(p.grad), [0.0, 0.0])
    opt.zero_grad()
    assert p.grad is None
    opt.step()  # no grad: nothing moves; q never had one, so it has no state
    assert np.allclose(host(p), [0.0, 0.0]) and p in opt.state and q not in opt.state
    assert np.array_equal(host(q), np.ones(3)) and q.grad is None


# ----------------------------------------------------------------------------- clipping

@pytest.mark.verify
@pytest.mark.parametrize("max_norm,norm_type", [(0.5, 2.0), (100.0, 2.0), (0.5, math.inf), (1.0, 1.5)])
def test_clip_grad_norm_matches_torch(max_norm, norm_type):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    grads = [rng.standard_normal(s) for s in SHAPES]
    params = [T(np.zeros(s), requires_grad=True) for s in SHAPES] + [T(np.zeros(2), requires_grad=True)]
    tparams = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES + [(2,)]]
    for p, tp, g in zip(params, tparams, grads):  # the last parameter has no grad
        p.grad, tp.grad = T(g.copy()).data, torch.tensor(g)
    total = optim.clip_grad_norm(params, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(tparams, max_norm, norm_type).item()
    assert type(total) is float and math.isclose(total, want, rel_tol=1e-13)
    for p, tp in zip(params, tparams[:3]):
        np.testing.assert_allclose(host(p.grad), tp.grad.numpy(), **TOL)
    assert params[3].grad is None


@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), max_norm=st.floats(0.01, 20.0), scale=st.floats(1e-3, 1e3))
def test_clip_grad_norm_bounds_the_norm(seed, max_norm, scale):
    rng = np.random.default_rng(seed)
    grads = [scale * rng.standard_normal(s) for s in SHAPES]
    params = [T(np.zeros(s), requires_grad=True) for s in SHAPES]
    for p, g in zip(params, grads):
        p.grad = T(g.copy()).data  # clipped in place
    total = optim.clip_grad_norm(params, max_norm)
    expect = math.sqrt(sum(float((g * g).sum()) for g in grads))
    assert math.isclose(total, expect, rel_tol=1e-12)
    after = math.sqrt(sum(float((host(p.grad) ** 2).sum()) for p in params))
    assert after <= max_norm * (1 + 1e-12)
    if total <= max_norm:
        assert all(np.array_equal(host(p.grad), g) for p, g in zip(params, grads))


def test_clip_grad_norm_non_finite_and_empty():
    p = T(np.zeros(3), requires_grad=True)
    assert optim.clip_grad_norm([p], 1.0) == 0.0
    p.grad = T(np.array([1.0, np.inf, 2.0])).data
    assert optim.clip_grad_norm(p, 1.0) == math.inf
    assert np.array_equal(host(p.grad), [1.0, np.inf, 2.0])  # left as it was
    with pytest.raises(RuntimeError, match="norm of the gradients is inf"):
        optim.clip_grad_norm([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        optim.clip_grad_norm([p], -1.0)


# ----------------------------------------------------------------------------- schedules

def test_warmup_cosine_hand_computed():
    f = functools.partial(optim.warmup_cosine, lr=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=12)
    assert math.isclose(f(0), 1 / 5) and math.isclose(f(3), 4 / 5)             # warmup (it + 1) / 5
    assert f(4) == 1.0                                                           # cosine starts at lr
    assert math.isclose(f(6), 0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)))            # quarter way: cos(pi/4)
    assert math.isclose(f(8), 0.55)                                              # half way
    assert math.isclose(f(12), 0.1) and f(13) == 0.1 and f(10**6) == 0.1
    values = [f(i) for i in range(4, 13)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert optim.constant(123, 3e-4) == 3e-4


def test_noam_hand_computed():
    f = functools.partial(optim.noam, d_model=16, warmup=4)
    assert f(0) == f(1) == 0.25 * 4 ** -1.5                       # step 0 counts as step 1
    assert math.isclose(f(4), 0.25 * 0.5)                          # peak at step == warmup
    assert math.isclose(f(16), 0.25 * 16 ** -0.5)                  # then step^-0.5
    assert f(3) < f(4) > f(5)
    assert math.isclose(optim.noam(16, 16, 4, factor=2.0), 2 * f(16))


@pytest.mark.verify
def test_schedules_match_lambdalr_and_drive_the_same_training():
    torch = pytest.importorskip("torch")
    wc = functools.partial(optim.warmup_cosine, lr=0.5, min_lr=0.05, warmup_iters=3, lr_decay_iters=8)
    topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda it: wc(it) / 0.5)
    for it in range(12):
        assert math.isclose(topt.param_groups[0]["lr"], wc(it), rel_tol=1e-14), it
        topt.step()
        sched.step()
    # our SGD driven by set_lr(noam(it)) == torch SGD with lr=1 and LambdaLR(noam)
    noam = functools.partial(optim.noam, d_model=8, warmup=3, factor=4.0)
    init, grads = make_data(7)
    kwargs = dict(lr=1.0, momentum=0.9)
    params = [T(a.copy(), requires_grad=True) for a in init]
    opt = optim.SGD(params, **kwargs)
    ours = drive(opt, params, grads, before=lambda it: optim.set_lr(opt, noam(it)))
    theirs, _, _ = run_torch(torch, "SGD", kwargs, init, grads, schedule=noam)
    assert_same_trajectory(ours, theirs)


def test_set_lr_and_schedule_arguments():
    ps = [T(np.ones(2), requires_grad=True), T(np.ones(3), requires_grad=True)]
    opt = optim.Adam([{"params": ps[:1]}, {"params": ps[1:]}])
    optim.set_lr(opt, [0.1, np.float32(0.25)])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.25]
    assert all(type(g["lr"]) is float for g in opt.param_groups)
    with pytest.raises(ValueError, match="3 learning rates for 2 parameter groups"):
        optim.set_lr(opt, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\blr must be >= 0"):
        optim.set_lr(opt, -0.1)
    with pytest.raises(ValueError, match="lr_decay_iters must be > warmup_iters"):
        optim.warmup_cosine(0, 1.0, 0.1, warmup_iters=5, lr_decay_iters=5)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        optim.warmup_cosine(-1, 1.0, 0.1, 2, 5)
    with pytest.raises(ValueError, match="warmup must be a positive integer"):
        optim.noam(1, 16, 0)
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        optim.noam(1, 0, 4)


# ----------------------------------------------------------------------------- weight-decay groups

def _named():
    rng = np.random.default_rng(8)
    wte = T(rng.standard_normal((6, 4)), requires_grad=True)
    return [("wte.weight", wte), ("h.0.ln.weight", T(rng.standard_normal(4), requires_grad=True)),
            ("h.0.attn.weight", T(rng.standard_normal((4, 4)), requires_grad=True)),
            ("h.0.attn.bias", T(rng.standard_normal(4), requires_grad=True)),
            ("frozen", T(rng.standard_normal((2, 2)))), ("lm_head.weight", wte)]


def test_weight_decay_groups_split_by_rank():
    decay, no_decay = optim.weight_decay_groups(_named(), 0.1)
    assert decay["param_names"] == ["wte.weight", "h.0.attn.weight"] and decay["weight_decay"] == 0.1
    assert no_decay["param_names"] == ["h.0.ln.weight", "h.0.attn.bias"] and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        optim.weight_decay_groups(_named(), -0.1)


def test_weight_decay_groups_skip_frozen_and_repeated_tensors_wherever_they_are():
    named = _named()                                   # frozen and tied ones first: the rest still counts
    decay, no_decay = optim.weight_decay_groups([named[4], named[0], named[5]] + named[1:4], 0.1)
    assert decay["param_names"] == ["wte.weight", "h.0.attn.weight"]
    assert no_decay["param_names"] == ["h.0.ln.weight", "h.0.attn.bias"]


@pytest.mark.verify
def test_weight_decay_groups_drive_adamw_like_torch():
    torch = pytest.importorskip("torch")
    groups = optim.weight_decay_groups(_named(), 0.1)
    params = [p for g in groups for p in g["params"]]
    init = [host(p).copy() for p in params]
    _, grads = make_data(9, shapes=[p.shape for p in params])
    ours = drive(optim.AdamW(groups, lr=0.01), params, grads)
    spec = [{"idx": [0, 1], "weight_decay": 0.1}, {"idx": [2, 3], "weight_decay": 0.0}]
    theirs, _, _ = run_torch(torch, "AdamW", dict(lr=0.01), init, grads, spec)
    assert_same_trajectory(ours, theirs)
