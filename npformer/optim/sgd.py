"""Stochastic gradient descent with momentum, dampening, L2 weight decay and Nesterov momentum.

The update is PyTorch's ``torch.optim.SGD``, for each parameter x with gradient g:

    g <- g + weight_decay * x                          (when weight_decay != 0)
    b <- g on the first step, else momentum * b + (1 - dampening) * g
    g <- g + momentum * b  if nesterov  else  b        (when momentum != 0)
    x <- x - lr * g
"""

from __future__ import annotations

from .. import backend
from .optimizer import Optimizer, as_float, nonnegative


class SGD(Optimizer):
    """SGD(params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False).

    State per parameter (only when momentum != 0): ``momentum_buffer``, shaped like it.
    """

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _check_options(self, group: dict) -> dict:
        opts = dict(lr=nonnegative("lr", group["lr"]),
                    momentum=nonnegative("momentum", group["momentum"]),
                    dampening=as_float("dampening", group["dampening"]),
                    weight_decay=nonnegative("weight_decay", group["weight_decay"]),
                    nesterov=bool(group["nesterov"]))
        if opts["nesterov"] and (opts["momentum"] <= 0 or opts["dampening"] != 0):
            raise ValueError(f"nesterov=True needs momentum > 0 and dampening == 0; "
                             f"got momentum={opts['momentum']}, dampening={opts['dampening']}")
        return opts

    def _update(self, x, grad, state: dict, opts: dict) -> None:
        xp = backend.get_array_module(x)
        lr, mu, wd = opts["lr"], opts["momentum"], opts["weight_decay"]
        # `work`: this step's scratch array, allocated only when needed (and explicitly: ufuncs on
        # 0-d arrays return scalars); nesterov needs a second one. grad is never written.
        g, work = grad, None
        if wd != 0:
            work = xp.multiply(x, wd, out=xp.empty_like(x))  # g = grad + wd * x
            work += grad
            g = work
        if mu != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = xp.array(g, dtype=x.dtype, copy=True)
            else:
                buf *= mu              # b = mu * b + (1 - dampening) * g
                if opts["dampening"] == 0:
                    buf += g
                else:                  # no nesterov here, so g may be overwritten
                    work = xp.multiply(g, 1.0 - opts["dampening"], out=_scratch(xp, x, work))
                    buf += work
            if opts["nesterov"]:       # g + mu * b
                step = xp.multiply(buf, mu, out=xp.empty_like(x))
                step += g
                g = work = step
            else:
                g = buf
        # x = x - lr * g
        if g is work:
            work *= -lr
        else:
            work = xp.multiply(g, -lr, out=_scratch(xp, x, work))
        x += work


def _scratch(xp, x, work):
    """`work` when already allocated, else a new array like x."""
    return xp.empty_like(x) if work is None else work
