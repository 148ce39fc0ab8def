"""Optimizers, clipping and schedules (npformer/optim/) against their formulas, without PyTorch.

Every expected value is written out here from the formula in the module's docstring, in plain
Python floats, and compared in float64 with rtol 1e-12: a wrong or missing term (eps, a bias
correction, the decay's place, the first momentum step, the clipping's 1e-6) moves the result by
far more than that.
"""

import math

import numpy as np
import pytest

from npformer import optim
from tests.helpers import T, host

RTOL = 1e-12

X0 = [1.0, -2.0]                                          # a 2-element parameter
GRADS = [[0.5, -0.3], [0.1, 0.4], [-0.2, 0.25]]           # its gradient at steps 1, 2, 3


def run(make_opt, grads=GRADS, x0=X0):
    """The parameter after one step per gradient in `grads`, on the device under test, as a list."""
    p = T(np.array(x0), requires_grad=True)
    opt = make_opt([p])
    out = []
    for g in grads:
        p.grad = T(np.array(g)).data
        opt.step()
        out.append(host(p).tolist())
    return out


# ----------------------------------------------------------------------------- Adam and AdamW

def adam_by_hand(x0, grads, lr, beta1, beta2, eps, weight_decay, decoupled):
    """The parameter after each step, element by element:

        x <- x * (1 - lr * wd)              (AdamW)       g <- g + wd * x      (Adam)
        m <- beta1 m + (1 - beta1) g        v <- beta2 v + (1 - beta2) g^2
        x <- x - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    """
    xs, m, v, out = list(x0), [0.0] * len(x0), [0.0] * len(x0), []
    for t, g in enumerate(grads, start=1):
        for i in range(len(xs)):
            gi = g[i]
            if decoupled:
                xs[i] = xs[i] * (1.0 - lr * weight_decay)
            else:
                gi = gi + weight_decay * xs[i]
            m[i] = beta1 * m[i] + (1.0 - beta1) * gi
            v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi
            m_hat = m[i] / (1.0 - beta1 ** t)
            v_hat = v[i] / (1.0 - beta2 ** t)
            xs[i] = xs[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
        out.append(list(xs))
    return out


def test_adamw_first_step_written_out():
    # t = 1: m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps) after the decay
    lr, wd, eps = 0.1, 0.1, 1e-8
    got = run(lambda ps: optim.AdamW(ps, lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=wd), GRADS[:1])[0]
    expected = [1.0 * (1 - 0.01) - 0.1 * 0.5 / (0.5 + 1e-8),
                -2.0 * (1 - 0.01) - 0.1 * -0.3 / (0.3 + 1e-8)]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.8)])
def test_adamw_decoupled_decay_and_bias_correction_over_three_steps(betas):
    lr, eps, wd = 0.1, 1e-8, 0.1
    got = run(lambda ps: optim.AdamW(ps, lr=lr, betas=betas, eps=eps, weight_decay=wd))
    expected = adam_by_hand(X0, GRADS, lr, *betas, eps, wd, decoupled=True)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


def test_adam_adds_l2_weight_decay_to_the_gradient():
    lr, betas, eps, wd = 0.05, (0.8, 0.9), 1e-8, 0.3
    got = run(lambda ps: optim.Adam(ps, lr=lr, betas=betas, eps=eps, weight_decay=wd))
    expected = adam_by_hand(X0, GRADS, lr, *betas, eps, wd, decoupled=False)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)
    # and it differs from AdamW's decoupled decay by far more than the tolerance
    assert not np.allclose(got, adam_by_hand(X0, GRADS, lr, *betas, eps, wd, decoupled=True), rtol=1e-6)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_adam_weight_decay_of_one(cls):
    # wd = 1 is a weight decay like any other: AdamW shrinks x by lr, Adam adds x to the gradient
    got = run(lambda ps: getattr(optim, cls)(ps, lr=0.05, betas=(0.8, 0.9), eps=1e-8, weight_decay=1.0))
    expected = adam_by_hand(X0, GRADS, 0.05, 0.8, 0.9, 1e-8, 1.0, decoupled=cls == "AdamW")
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


def test_adam_eps_is_added_after_the_bias_corrected_square_root():
    # a tiny gradient, where eps is not negligible: 1e-9 / (sqrt(1e-18) + 1e-8) at step 1
    got = run(lambda ps: optim.Adam(ps, lr=1.0, eps=1e-8), [[1e-9, -1e-9]], x0=[0.0, 0.0])[0]
    np.testing.assert_allclose(got, [-1e-9 / (1e-9 + 1e-8), 1e-9 / (1e-9 + 1e-8)], rtol=RTOL, atol=0)


# ----------------------------------------------------------------------------- SGD

def sgd_by_hand(x0, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """The parameter after each step:

        g <- g + wd * x
        b <- g (first step), else momentum * b + (1 - dampening) * g
        g <- g + momentum * b (nesterov), else b
        x <- x - lr * g
    """
    xs, b, out = list(x0), None, []
    for g in grads:
        g = [gi + weight_decay * xi for gi, xi in zip(g, xs)]
        if momentum != 0:
            b = list(g) if b is None else [momentum * bi + (1.0 - dampening) * gi for bi, gi in zip(b, g)]
            g = [gi + momentum * bi for gi, bi in zip(g, b)] if nesterov else b
        xs = [xi - lr * gi for xi, gi in zip(xs, g)]
        out.append(list(xs))
    return out


SGD_CASES = {
    "plain": dict(lr=0.1),
    "weight decay": dict(lr=0.1, weight_decay=0.05),
    "momentum": dict(lr=0.1, momentum=0.9),
    "momentum, dampening, weight decay": dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05),
    "weight decay of one": dict(lr=0.1, weight_decay=1.0),
    "momentum, dampening of one": dict(lr=0.1, momentum=0.9, dampening=1.0),     # b = mu * b after step 1
    "nesterov": dict(lr=0.1, momentum=0.8, nesterov=True),
    "nesterov, weight decay": dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05),
}


@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_over_three_steps(case):
    kw = SGD_CASES[case]
    got = run(lambda ps: optim.SGD(ps, **kw))
    np.testing.assert_allclose(got, sgd_by_hand(X0, GRADS, **kw), rtol=RTOL, atol=0)


def test_sgd_momentum_written_out():
    # momentum 0.9, dampening 0.3, lr 0.1 on x = 1 with g = 0.5, then 0.1:
    # b1 = 0.5 (no dampening on the first step), x1 = 1 - 0.05 = 0.95
    # b2 = 0.9 * 0.5 + 0.7 * 0.1 = 0.52,          x2 = 0.95 - 0.052 = 0.898
    got = run(lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3), [[0.5], [0.1]], x0=[1.0])
    np.testing.assert_allclose([x[0] for x in got], [0.95, 0.898], rtol=RTOL, atol=0)


# ----------------------------------------------------------------------------- gradient clipping

CLIP_GRADS = [[3.0, -4.0], [[1.0, 2.0], [-2.0, 0.5]]]
FLAT = [3.0, -4.0, 1.0, 2.0, -2.0, 0.5]
NORMS = {                                   # the total norm of FLAT, by hand
    2.0: math.sqrt(9 + 16 + 1 + 4 + 4 + 0.25),
    1.0: 3 + 4 + 1 + 2 + 2 + 0.5,
    math.inf: 4.0,
    3.0: (27 + 64 + 1 + 8 + 8 + 0.125) ** (1 / 3),
}


def clip_params(grads=CLIP_GRADS):
    ps = [T(np.array(g), requires_grad=True) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = T(np.array(g)).data
    frozen = T(np.array([100.0, 100.0]))                   # no grad: not counted, not touched
    return ps + [frozen]


@pytest.mark.parametrize("norm_type", sorted(NORMS))
@pytest.mark.parametrize("max_norm", [1.0, "total", 100.0])
def test_clip_grad_norm(norm_type, max_norm):
    """total = ||g||_p over every grad; the grads are scaled by max_norm / (total + 1e-6) when that is < 1."""
    total = NORMS[norm_type]
    max_norm = total if max_norm == "total" else max_norm   # at the norm: still scaled, by total / (total + 1e-6)
    params = clip_params()
    got = optim.clip_grad_norm(params, max_norm, norm_type=norm_type)
    assert math.isclose(got, total, rel_tol=RTOL, abs_tol=0)
    scale = min(1.0, max_norm / (total + 1e-6))
    flat = np.concatenate([host(p.grad).reshape(-1) for p in params[:2]])
    np.testing.assert_allclose(flat, [scale * g for g in FLAT], rtol=RTOL, atol=0)
    assert params[2].grad is None and host(params[2]).tolist() == [100.0, 100.0]


@pytest.mark.parametrize("norm_type", sorted(NORMS))
def test_clip_grad_norm_of_all_zero_gradients(norm_type):
    params = clip_params([[0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]]])
    assert optim.clip_grad_norm(params, 1.0, norm_type=norm_type) == 0.0
    for p in params[:2]:
        assert not host(p.grad).any() and np.isfinite(host(p.grad)).all()


def test_clip_grad_norm_with_only_frozen_parameters():
    assert optim.clip_grad_norm([T(np.ones(2)), T(np.ones(3))], 1.0) == 0.0


@pytest.mark.parametrize("norm_type", sorted(NORMS))
def test_clip_grad_norm_ignores_empty_gradients(norm_type):
    """A parameter with no elements (as torch does: it adds nothing to any norm, the max-abs one included)."""
    params = clip_params()
    empty = T(np.zeros((0, 3)), requires_grad=True)
    empty.grad = T(np.zeros((0, 3))).data
    got = optim.clip_grad_norm([empty] + params, 1.0, norm_type=norm_type)
    assert math.isclose(got, NORMS[norm_type], rel_tol=RTOL, abs_tol=0)
    assert empty.grad.shape == (0, 3)
    flat = np.concatenate([host(p.grad).reshape(-1) for p in params[:2]])
    np.testing.assert_allclose(flat, [g / (NORMS[norm_type] + 1e-6) for g in FLAT], rtol=RTOL, atol=0)


# ----------------------------------------------------------------------------- schedules

def test_warmup_cosine_at_a_few_steps():
    lr, min_lr = 6e-4, 6e-5
    f = lambda step: optim.warmup_cosine(step, lr, min_lr, warmup_iters=10, lr_decay_iters=110)   # noqa: E731
    expected = {
        0: 6e-4 * 1 / 11,                                          # warmup: lr (step + 1) / (warmup + 1)
        9: 6e-4 * 10 / 11,
        10: 6e-4,                                                  # r = 0: cos 0 = 1
        35: 6e-5 + 0.5 * (1 + math.sqrt(0.5)) * 5.4e-4,            # r = 1/4
        60: 6e-5 + 0.5 * 5.4e-4,                                   # r = 1/2
        85: 6e-5 + 0.5 * (1 - math.sqrt(0.5)) * 5.4e-4,            # r = 3/4
        110: 6e-5,                                                 # r = 1
        111: 6e-5,                                                 # past the decay
        10_000: 6e-5,
    }
    for step, want in expected.items():
        assert math.isclose(f(step), want, rel_tol=RTOL, abs_tol=0), (step, f(step), want)


@pytest.mark.parametrize("warmup_iters", [2, 5, 11])
def test_warmup_cosine_at_its_boundaries(warmup_iters):
    """The cosine takes over at step == warmup_iters, where it is exactly lr (the warmup's formula,
    lr * (w + 1) / (w + 1), rounds to 0.10000000000000002 here), and ends exactly at min_lr."""
    f = lambda step, min_lr=0.0: optim.warmup_cosine(step, 0.1, min_lr, warmup_iters, 20)   # noqa: E731
    assert f(warmup_iters - 1) == 0.1 * warmup_iters / (warmup_iters + 1)
    assert f(warmup_iters) == 0.1
    assert f(20, min_lr=0.01) == 0.01 and f(21, min_lr=0.01) == 0.01


def test_noam_at_a_few_steps():
    # factor * d_model^-1/2 * min(step^-1/2, step * warmup^-3/2), d_model 512, warmup 4000
    f = lambda step, factor=1.0: optim.noam(step, d_model=512, warmup=4000, factor=factor)   # noqa: E731
    expected = {
        0: 1 / math.sqrt(512) / 4000 ** 1.5,                       # step 0 counts as step 1
        1: 1 / math.sqrt(512) / 4000 ** 1.5,
        100: 100 / math.sqrt(512) / 4000 ** 1.5,                   # rising
        4000: 1 / math.sqrt(512 * 4000),                           # the peak: both terms equal
        16_000: 1 / math.sqrt(512 * 16_000),                       # decaying as step^-1/2
    }
    for step, want in expected.items():
        assert math.isclose(f(step), want, rel_tol=RTOL, abs_tol=0), (step, f(step), want)
    assert math.isclose(f(100, factor=2.0), 2 * expected[100], rel_tol=RTOL, abs_tol=0)
