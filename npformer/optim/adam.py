"""Adam (L2 weight decay added to the gradient) and AdamW (decoupled weight decay).

The update is PyTorch's ``torch.optim.Adam`` / ``AdamW`` (amsgrad off). For each parameter x with
gradient g, moments m and v (zeros at first) and step counter t (per parameter, from 1):

    x <- x * (1 - lr * weight_decay)                  (AdamW)
    g <- g + weight_decay * x                         (Adam)
    m <- m + (1 - beta1) * (g - m)                    ( = beta1 m + (1 - beta1) g )
    v <- beta2 * v + (1 - beta2) * g * g
    x <- x - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Updates are in place on the parameter's array (its identity is kept) with the parameter's array
module and dtype: float32 stays float32, every scalar is a Python float.
"""

from __future__ import annotations

from .. import backend
from .optimizer import Optimizer, as_float, nonnegative


def _check_betas(betas) -> tuple:
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}") from None
    out = []
    for i, b in enumerate((beta1, beta2)):
        b = as_float(f"betas[{i}]", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1); got {b!r}")
        out.append(b)
    return tuple(out)


class Adam(Optimizer):
    """Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0).

    weight_decay is an L2 penalty added to the gradient. State per parameter: ``step`` (int),
    ``exp_avg`` (m) and ``exp_avg_sq`` (v), shaped like the parameter.
    """

    decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _check_options(self, group: dict) -> dict:
        return dict(lr=nonnegative("lr", group["lr"]), betas=_check_betas(group["betas"]),
                    eps=nonnegative("eps", group["eps"]),
                    weight_decay=nonnegative("weight_decay", group["weight_decay"]))

    def _update(self, x, grad, state: dict, opts: dict) -> None:
        xp = backend.get_array_module(x)
        lr, eps, wd = opts["lr"], opts["eps"], opts["weight_decay"]
        beta1, beta2 = opts["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(x)
            state["exp_avg_sq"] = xp.zeros_like(x)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = state["step"]

        g = grad  # never written
        if wd != 0:
            if self.decoupled_weight_decay:
                x *= 1.0 - lr * wd       # AdamW: decay the weights themselves
            else:
                g = xp.multiply(x, wd, out=xp.empty_like(x))  # Adam: g = grad + wd * x
                g += grad

        work = xp.empty_like(x)          # the one scratch array of this step
        xp.subtract(g, m, out=work)      # m = m + (1 - beta1) * (g - m)
        work *= 1.0 - beta1
        m += work
        v *= beta2                       # v = beta2 * v + (1 - beta2) * g * g
        xp.multiply(g, 1.0 - beta2, out=work)
        work *= g
        v += work

        bias_correction1 = 1.0 - beta1 ** t
        bias_correction2 = 1.0 - beta2 ** t
        xp.sqrt(v, out=work)             # denom = sqrt(v) / sqrt(bc2) + eps
        work /= bias_correction2 ** 0.5
        work += eps
        xp.divide(m, work, out=work)     # x = x - lr / bc1 * m / denom
        work *= -(lr / bias_correction1)
        x += work


class AdamW(Adam):
    """AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2).

    Decoupled weight decay: x <- x * (1 - lr * weight_decay) before the Adam step on the raw gradient.
    """

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
