"""The reverse-mode engine: graph recording, topological order, accumulation.

An op applied while gradients are enabled records a ``Node`` on its output tensor
(``tensor._node``): a ``backward`` closure that maps the gradient of the output to one
gradient per input (or None for an input that needs none), and, per input, the input's
own Node, or the input itself when it is a leaf that requires grad. The graph is made of
Nodes, not of the tensors: an intermediate tensor that the caller drops is freed with its
data even though the graph lives on (the arrays a backward needs are held by its closure).
``backward`` walks the graph once in reverse topological order, summing every contribution
a node receives before passing its gradient on, so a tensor used twice gets both
contributions. Backward closures never mutate anything: the engine alone accumulates.

See docs/autograd.md for a walk-through.
"""

from __future__ import annotations

import contextlib
import threading

from . import backend

_state = threading.local()


class Node:
    """One recorded op application: what backward needs, without the output's data.

    backward: the op's closure, gradient of the output -> one gradient per input.
    parents: per input, its Node; the input tensor itself when it is a leaf that requires
    grad; None when it needs no gradient. op: the op's name. dtype, shape: the output's.
    retained: a weak reference to the output tensor after ``retain_grad()`` (weak, so that the
    tensor and the node do not keep each other, and the graph, alive), else None. freed: backward has
    run without retain_graph, so the closure (and the arrays it saved) are gone.
    """

    __slots__ = ("backward", "parents", "op", "dtype", "shape", "retained", "freed")

    def __init__(self, backward, parents: tuple, op: str, dtype, shape: tuple):
        self.backward, self.parents, self.op = backward, parents, op
        self.dtype, self.shape = dtype, shape
        self.retained, self.freed = None, False


def record(data, parents, backward, op: str):
    """The Node for an op's output `data` computed from `parents` (tensors), or None.

    None when gradients are disabled or no parent requires grad (the output is then a
    constant). Called by npformer.ops._core.result.
    """
    if not is_grad_enabled():
        return None
    edges = tuple((p._node if p._node is not None else p) if p._requires_grad else None for p in parents)
    if all(e is None for e in edges):
        return None
    return Node(backward, edges, op, data.dtype, tuple(data.shape))


def is_grad_enabled() -> bool:
    """True unless inside ``no_grad()``."""
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def set_grad_enabled(enabled: bool):
    """Context manager that turns graph recording on or off."""
    prev = is_grad_enabled()
    _state.grad_enabled = bool(enabled)
    try:
        yield
    finally:
        _state.grad_enabled = prev


def no_grad():
    """Context manager: ops inside record no graph and their results need no grad."""
    return set_grad_enabled(False)


def _topological_order(root):
    """Graph items reachable from `root` (a Node or a leaf tensor), each after all its parents.

    Iterative depth-first search (a chain of 100,000 ops must not hit Python's
    recursion limit). Leaves that require grad are included.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        visited.add(id(t))
        stack.append((t, True))
        parents = t.parents if isinstance(t, Node) else None
        if parents is not None:
            # parents pushed last-first, so the first parent's subtree is finished first and a
            # leaf parent (a weight) lands right before its consumer in `order`: backward then
            # completes the weight's gradient right after the consumer's backward
            for p in reversed(parents):
                if p is not None and id(p) not in visited:
                    stack.append((p, False))
    return order


def backward(root, grad=None, retain_graph: bool = False, sink=None) -> None:
    """Accumulate d(root)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

    root: the tensor to differentiate. grad: d(loss)/d(root), same shape as root;
    may be omitted only when root has one element (it is then 1).
    retain_graph: keep the recorded graph so backward can run through it again.
    sink: a callable ``sink(leaf, gradient)`` that receives each leaf's gradient instead of
    ``leaf.grad`` (which is then not touched), once per leaf, as soon as that gradient is
    complete: right after the backward of the leaf's last consumer, while the array is still
    in cache. The array may be shared (``add`` hands one array to both inputs; it may be
    `grad` itself), so the sink must not write into it. A retained non-leaf still gets ``.grad``.
    """
    if not root.requires_grad:
        raise RuntimeError("backward: the tensor does not require grad and has no grad_fn "
                           "(was it computed under no_grad(), or from tensors with requires_grad=False?)")
    xp = backend.get_array_module(root.data)
    if grad is None:
        if root.data.size != 1:
            raise RuntimeError(f"backward: grad can be implicitly created only for a tensor with one "
                               f"element; got shape {tuple(root.shape)}; pass grad= of that shape")
        grad = xp.ones_like(root.data)
    else:
        grad = grad.data if hasattr(grad, "_node") else grad
        if backend.get_array_module(grad) is not xp:
            raise backend.DeviceMismatchError(
                f"backward: grad is on {backend.device_of(grad)} but the tensor is on {root.device}")
        if tuple(grad.shape) != tuple(root.shape):
            raise ValueError(f"backward: grad has shape {tuple(grad.shape)} but the tensor has shape "
                             f"{tuple(root.shape)}")
        grad = grad.astype(root.dtype, copy=False)

    start = root._node if root._node is not None else root
    grads = {id(start): grad}
    order = _topological_order(start)
    del root, start          # popping items off `order` then lets each node's saved arrays go
    while order:             # as soon as its backward has run, instead of after the whole pass
        t = order.pop()
        g = grads.pop(id(t), None)
        if g is None:
            continue
        if not isinstance(t, Node):  # a leaf
            if not t._requires_grad:  # switched off since the forward (a frozen weight): no .grad
                continue
            if sink is None:
                t._accumulate(g)
            else:
                sink(t, g)
            continue
        if t.freed:
            raise RuntimeError("backward: trying to backward through the graph a second time; "
                               "its buffers were freed. Pass retain_graph=True the first time.")
        kept = t.retained() if t.retained is not None else None
        if kept is not None:
            kept._accumulate(g)
        parent_grads = t.backward(g)
        for p, pg in zip(t.parents, parent_grads):
            if pg is None or p is None:
                continue
            if not backend.is_array(pg):  # a 0-d result may come back as a scalar
                pg = xp.asarray(pg, dtype=p.dtype)
            prev = grads.get(id(p))
            grads[id(p)] = pg if prev is None else prev + pg
        if not retain_graph:
            t.backward, t.parents, t.retained, t.freed = None, None, None, True
