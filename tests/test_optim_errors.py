"""npformer.optim: the messages a user reads for a bad argument (each anchored at its start and naming the
argument), the argument checks of the schedules, the forms of `params` an optimizer accepts, and its repr."""

import math
import re

import numpy as np
import pytest

from npformer import optim
from tests.helpers import T, host


def _params():
    return [T(np.ones((2, 2)), requires_grad=True), T(np.ones(2), requires_grad=True)]


def _exactly(message):
    return "^" + re.escape(message) + "$"


# ----------------------------------------------------------------------------- messages

@pytest.mark.parametrize("make,error,message", [
    (lambda ps: optim.SGD(ps[0], lr=0.1), TypeError,
     "params must be an iterable of Tensors or of dicts, not a single Tensor"),
    (lambda ps: optim.Adam([]), ValueError, "optimizer got an empty parameter list"),
    (lambda ps: optim.Adam(ps).add_param_group({"lr": 0.1}), TypeError,
     "a parameter group must be a dict with a 'params' entry; got dict"),
    (lambda ps: optim.Adam(ps[:1]).add_param_group(ps[1:]), TypeError,
     "a parameter group must be a dict with a 'params' entry; got list"),
    (lambda ps: optim.Adam([ps[0], ps[1] * 2.0]), ValueError,
     "parameter 1 is not a leaf tensor (it was computed by mul); optimize the leaves"),
    (lambda ps: optim.Adam([{"params": [ps[0], ps[1], ps[0]]}]), ValueError,
     "parameter 2 appears in more than one parameter group (or twice in one)"),
    (lambda ps: optim.Adam(ps[:1]).add_param_group({"params": ps}), ValueError,
     "parameter 0 appears in more than one parameter group (or twice in one)"),
    (lambda ps: optim.Adam(ps, betas=(0.9, "slow")), ValueError, "betas[1] must be a real number; got 'slow'"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening="x"), ValueError,
     "dampening must be a real number; got 'x'"),
], ids=["single tensor", "empty", "no params entry", "not a dict", "not a leaf", "twice in a group",
        "in two groups", "betas", "dampening"])
def test_optimizer_argument_messages(make, error, message):
    with pytest.raises(error, match=_exactly(message)):
        make(_params())


@pytest.mark.parametrize("norm_type,message", [
    ("two", "norm_type must be a real number; got 'two'"),
    (0, "norm_type must be > 0 (or math.inf); got 0.0"),                  # the 0-"norm" counts nonzeros
    (-2.0, "norm_type must be > 0 (or math.inf); got -2.0"),
    (math.nan, "norm_type must be > 0 (or math.inf); got nan"),
])
def test_clip_grad_norm_refuses_a_norm_type_that_is_not_positive(norm_type, message):
    p = T(np.ones(2), requires_grad=True)
    p.grad = T(np.array([3.0, 4.0])).data
    with pytest.raises(ValueError, match=_exactly(message)):
        optim.clip_grad_norm([p], 1.0, norm_type=norm_type)
    assert host(p.grad).tolist() == [3.0, 4.0]


@pytest.mark.parametrize("call,message", [
    (lambda: optim.constant(0, -1.0), "lr must be >= 0; got -1.0"),
    (lambda: optim.warmup_cosine(0, -1.0, 0.1, 2, 5), "lr must be >= 0; got -1.0"),
    (lambda: optim.warmup_cosine(0, 1.0, -0.1, 2, 5), "min_lr must be >= 0; got -0.1"),
    (lambda: optim.noam(1, 16, 4, factor=-2), "factor must be >= 0; got -2"),
    (lambda: optim.warmup_cosine(True, 1.0, 0.1, 2, 5), "step must be an integer >= 0; got True"),
    (lambda: optim.warmup_cosine(2.0, 1.0, 0.1, 2, 5), "step must be an integer >= 0; got 2.0"),
    (lambda: optim.constant(np.float64(3.0), 0.1), "step must be an integer >= 0; got np.float64(3.0)"),
    (lambda: optim.noam(1, True, 4), "d_model must be a positive integer; got True"),
    (lambda: optim.noam(1, 16.0, 4), "d_model must be a positive integer; got 16.0"),
    (lambda: optim.noam(1, 16, False), "warmup must be a positive integer; got False"),
    (lambda: optim.noam(1, 16, 4.0), "warmup must be a positive integer; got 4.0"),
])
def test_schedule_argument_messages(call, message):
    with pytest.raises(ValueError, match=_exactly(message)):
        call()


def test_schedules_take_numpy_integers_and_the_smallest_sizes():
    assert optim.noam(np.int64(1), d_model=1, warmup=1) == 1.0             # 1 * 1 * min(1, 1)
    assert optim.noam(4, d_model=np.int32(1), warmup=np.int64(1)) == 0.5   # min(4^-1/2, 4) = 1/2
    assert optim.warmup_cosine(np.int64(0), 0.5, 0.0, warmup_iters=np.int64(1), lr_decay_iters=2) == 0.25


# ----------------------------------------------------------------------------- forms of params

def test_a_single_group_dict_is_one_group():
    p, q = _params()
    opt = optim.SGD({"params": [p, q], "lr": 0.5}, lr=0.1)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["params"] == [p, q]
    p.grad = T(np.ones((2, 2))).data
    opt.step()
    np.testing.assert_array_equal(host(p), np.full((2, 2), 0.5))


def test_a_group_of_one_tensor_holds_a_list_and_steps():
    p, q = _params()
    opt = optim.SGD([p], lr=0.1)
    given = {"params": q, "lr": 0.25}
    opt.add_param_group(given)
    group = opt.param_groups[1]
    assert type(group["params"]) is list and group["params"] == [q] and given["params"] is q
    q.grad = T(np.array([1.0, -2.0])).data
    assert opt.step() is None                                              # no closure: no loss
    np.testing.assert_array_equal(host(q), [0.75, 1.5])


def test_param_names_are_kept_as_a_list_of_str():
    p, q = _params()
    opt = optim.Adam([{"params": (p, q), "param_names": ("w", np.str_("b")), "lr": 0.1}])
    group = opt.param_groups[0]
    assert group["param_names"] == ["w", "b"] and all(type(n) is str for n in group["param_names"])
    assert type(group["params"]) is list
    assert set(group) == {"params", "param_names", "lr", "betas", "eps", "weight_decay"}


def test_repr_lists_each_groups_size_and_options_but_not_its_tensors_or_names():
    p, q = _params()
    opt = optim.SGD([{"params": [p, q], "param_names": ["w", "b"]}, {"params": [T(np.ones(3), requires_grad=True)],
                                                                     "lr": 0.5}], lr=0.1, momentum=0.9)
    assert repr(opt) == (
        "SGD (\n"
        "  group 0: 2 params, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False\n"
        "  group 1: 1 params, lr=0.5, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False\n"
        ")")
