"""Recurrent layers RNN, LSTM and GRU, with torch.nn's arguments, parameter names, gate order and numerics.

Each layer and direction runs one cell over time. With x_t the layer's input at step t and h the
previous hidden state (h_0 = hx, zeros when not given), the cells are torch's (docs/rnn.md):

    RNN:   h' = act(W_ih x_t + b_ih + W_hh h + b_hh)                  act = tanh or relu
    LSTM:  i, f, g, o = split(W_ih x_t + b_ih + W_hh h + b_hh)         four gates, in that order
           i, f, o = sigmoid(i, f, o);  g = tanh(g)
           c' = f * c + i * g;          h' = o * tanh(c')
    GRU:   r, z, n are the three gates, in that order, of W_ih x_t + b_ih and of W_hh h + b_hh:
           r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z)
           n = tanh(x_n + r * h_n)  (r multiplies W_hn h + b_hn, bias included, as in torch)
           h' = (1 - z) * n + z * h

weight_ih_l{k} (G*H, in) holds the G gates' input weights stacked (G = 1, 4, 3), weight_hh_l{k}
(G*H, H) the hidden ones; the reverse direction's are named with ``_reverse``. Layer k > 0 reads
the previous layer's output (H, or 2H when bidirectional), with dropout in between in training.

The reference path is a visible Python loop over the time steps composing existing ops, so
backpropagation through time is the engine's chain rule over the unrolled loop; no cell has a
backward of its own. Only the input half of the gates, W_ih x_t + b_ih, is computed for all steps
at once (one linear per layer and direction); the hidden half must wait for the previous step.

Unlike torch, ``batch_first=True`` is the default (input (B, T, in)); hx and h_n are always
(num_layers * num_directions, B, H), as in torch.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import backend, ops
from ..tensor import Tensor
from . import functional as F
from . import init
from .layers import empty_parameter
from .module import Module


def _unbind(a: Tensor) -> list:
    """The slices a[0], ..., a[n-1] along axis 0, each a separate tensor.

    Split in halves, recursively: T single getitems would each write a zero array the size of
    all of `a` in backward (O(T^2) work over T steps); halving makes it O(T log T).
    """
    n = a.shape[0]
    if n == 1:
        return [ops.reshape(a, a.shape[1:])]
    first, second = ops.split(a, [n // 2, n - n // 2], axis=0)
    return _unbind(first) + _unbind(second)


def _positive_int(where: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer; got {value!r}")
    return int(value)


class RNNBase(Module):
    """What RNN, LSTM and GRU share: the parameters, the checks, and the loop over layers, directions
    and time steps. A subclass sets GATES (gates per cell) and STATES (1, or 2 for LSTM's (h, c))
    and defines ``_cell``, the one step.

    input_size, hidden_size (H), num_layers: positive integers. bias: False drops bias_ih and bias_hh.
    batch_first: input and output (B, T, .) when True (our default; torch's is False), else (T, B, .).
    dropout: in [0, 1); dropout on each layer's output but the last's, in training, its masks drawn
        from the device's global generator (npformer.manual_seed), as npformer's other layers do.
    bidirectional: a second, right-to-left pass per layer with its own ``_reverse`` weights.
    generator: draws the initial weights, U(-1/sqrt(H), 1/sqrt(H)) as torch's; the global one when None.
    dtype, device: of the parameters (npformer's defaults when None).
    """

    GATES = 1
    STATES = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, dropout: float = 0.0, bidirectional: bool = False, generator=None,
                 dtype=None, device=None):
        super().__init__()
        where = type(self).__name__
        self.input_size = _positive_int(where, "input_size", input_size)
        self.hidden_size = _positive_int(where, "hidden_size", hidden_size)
        self.num_layers = _positive_int(where, "num_layers", num_layers)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{where}: dropout must be a number in [0, 1); got {dropout!r}")
        self.bias, self.batch_first, self.bidirectional = bool(bias), bool(batch_first), bool(bidirectional)
        self.dropout = float(dropout)
        H, G = self.hidden_size, self.GATES
        bound = 1.0 / math.sqrt(H)                       # torch: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H))
        for layer in range(self.num_layers):
            n_in = self.input_size if layer == 0 else H * self.num_directions
            for suffix in self._suffixes(layer):
                shapes = [("weight_ih", (G * H, n_in)), ("weight_hh", (G * H, H))]
                shapes += [("bias_ih", (G * H,)), ("bias_hh", (G * H,))] if self.bias else []
                for name, shape in shapes:               # torch's registration (and state_dict) order
                    p = empty_parameter(shape, dtype, device)
                    setattr(self, name + suffix, init.uniform_(p, -bound, bound, generator=generator))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self, layer: int) -> list:
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.num_directions]

    def _weights(self, layer: int, direction: int):
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer and direction (biases None without bias).

        Looked up by name on every call, so a swapped-in parameter is the one used."""
        s = self._suffixes(layer)[direction]
        return tuple(self._parameters.get(name + s) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    # ------------------------------------------------------------------ checks
    def _input(self, input):
        """input as a time-first Tensor (T, B, in), and whether it was batched."""
        where = type(self).__name__
        x = input if isinstance(input, Tensor) else Tensor(input)
        layout = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
        if x.ndim not in (2, 3):
            raise ValueError(f"{where}: input must be 3-D {layout} or 2-D (T, input_size) unbatched; "
                             f"got shape {x.shape}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{where}: input of shape {x.shape} has feature size {x.shape[-1]}; expected "
                             f"input_size {self.input_size}")
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype:
            raise TypeError(f"{where}: input has dtype {x.dtype} but the weights are {weight.dtype}")
        shape, batched = x.shape, x.ndim == 3
        if not batched:
            x = ops.reshape(x, (x.shape[0], 1, x.shape[1]))                     # (T, 1, in)
        elif self.batch_first:
            x = ops.transpose(x, 0, 1)                                          # (B, T, in) -> (T, B, in)
        if x.shape[0] == 0:
            raise ValueError(f"{where}: input of shape {shape} has no time steps")
        return x, batched

    def _initial_states(self, hx, x: Tensor, batched: bool) -> list:
        """Per layer and direction (index layer * num_directions + direction), the tuple of initial
        states, each (B, H): slices of hx, or zeros when hx is None."""
        where, B, H = type(self).__name__, x.shape[1], self.hidden_size
        n = self.num_layers * self.num_directions
        if hx is None:
            zero = Tensor(x.xp.zeros((B, H), dtype=x.dtype))
            return [(zero,) * self.STATES] * n
        names = ["hx"] if self.STATES == 1 else ["h_0", "c_0"]
        if self.STATES == 2 and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"{where}: hx must be a tuple (h_0, c_0); got {type(hx).__name__}")
        given = list(hx) if self.STATES == 2 else [hx]
        expected = (n, B, H) if batched else (n, H)
        shape_names = "(num_layers * num_directions, B, hidden_size)" if batched else \
            "(num_layers * num_directions, hidden_size) for unbatched input"
        states = []
        for name, h in zip(names, given):
            h = h if isinstance(h, Tensor) else Tensor(h)
            if h.shape != expected:
                raise ValueError(f"{where}: {name} has shape {h.shape}; expected {shape_names} = {expected}")
            if h.dtype != x.dtype:
                raise TypeError(f"{where}: {name} has dtype {h.dtype} but the input is {x.dtype}")
            states.append(h if batched else ops.reshape(h, (n, 1, H)))
        return [tuple(ops.getitem(h, k) for h in states) for k in range(n)]

    def _valid_steps(self, lengths, x: Tensor, batched: bool):
        """(T, B) bool array, True where step t is a real step of sequence b (t < lengths[b]); None when
        lengths is None."""
        if lengths is None:
            return None
        where, (T, B) = type(self).__name__, x.shape[:2]
        if not batched:
            raise ValueError(f"{where}: lengths needs batched input (B sequences); the input is unbatched")
        raw = lengths.data if isinstance(lengths, Tensor) else lengths
        lens = np.asarray(backend.to_numpy(raw) if backend.is_array(raw) else raw)   # host-side: B integers
        if lens.shape != (B,) or lens.dtype.kind not in "iu" or (lens < 1).any() or (lens > T).any():
            shown = lens.tolist() if lens.size <= 16 else f"an array of shape {lens.shape}, dtype {lens.dtype}"
            raise ValueError(f"{where}: lengths must be B = {B} integers in [1, T] with T = {T}; got {shown}")
        return backend.to_device(np.arange(T)[:, None] < lens[None, :], x.device)  # (T, B)

    # ------------------------------------------------------------------ forward
    def forward(self, input, hx=None, lengths=None):
        """Run every layer over the whole sequence.

        input: (B, T, input_size) with batch_first (our default), else (T, B, input_size); or
            unbatched (T, input_size).
        hx: initial state, (num_layers * num_directions, B, hidden_size) (unbatched: without B),
            a tuple (h_0, c_0) of two such for LSTM; zeros when None.
        lengths: (B,) integers in [1, T], the real length of each padded sequence (torch's
            pack_padded_sequence): steps t >= lengths[b] leave the state as it was and output
            zeros, h_n is each sequence's state after its last real step, and the reverse direction
            starts at that step.
        Returns (output, h_n) for RNN and GRU, (output, (h_n, c_n)) for LSTM: output (B, T, D * H)
        with batch_first, else (T, B, D * H), the last layer's h at every step, the two directions
        side by side (D = 2 when bidirectional); h_n, c_n (num_layers * D, B, H), row
        layer * D + direction.
        """
        x, batched = self._input(input)                                         # (T, B, in)
        initial = self._initial_states(hx, x, batched)
        valid = self._valid_steps(lengths, x, batched)
        D = self.num_directions
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:                                       # between layers, never after the last
                x = F.dropout(x, self.dropout, self.training)
            outs = []
            for direction in range(D):
                w_ih, w_hh, b_ih, b_hh = self._weights(layer, direction)
                gx = F.linear(x, w_ih, b_ih)                    # (T, B, G*H): input half of the gates, all steps
                out, final = self._scan(gx, initial[layer * D + direction], w_hh, b_hh, valid, direction == 1)
                outs.append(out)
                finals.append(final)
            x = outs[0] if D == 1 else ops.concatenate(outs, axis=-1)          # (T, B, D*H)
        if not batched:
            output = ops.reshape(x, (x.shape[0], x.shape[2]))                   # (T, D*H)
        else:
            output = ops.transpose(x, 0, 1) if self.batch_first else x          # (B, T, D*H) or (T, B, D*H)
        last = [ops.stack([f[i] for f in finals], axis=0) for i in range(self.STATES)]   # (L*D, B, H) each
        if not batched:
            last = [ops.reshape(s, (s.shape[0], s.shape[2])) for s in last]      # (L*D, H)
        return output, (last[0] if self.STATES == 1 else tuple(last))

    def _scan(self, gx: Tensor, state: tuple, w_hh, b_hh, valid, reverse: bool):
        """One layer and direction over time: the unrolled loop that backpropagation runs back through.

        gx: (T, B, G*H); state: the initial states, each (B, H); valid: (T, B) bool or None.
        Returns (outputs (T, B, H), the final states).
        """
        steps = _unbind(gx)                                                     # T tensors (B, G*H)
        outs = [None] * len(steps)
        for t in (reversed(range(len(steps))) if reverse else range(len(steps))):
            new = self._cell(steps[t], state, w_hh, b_hh)
            if valid is None:
                outs[t] = new[0]
            else:                                   # padded step of a sequence: keep its state, output 0
                pad = ~valid[t][:, None]                                        # (B, 1)
                new = tuple(ops.where(pad, old, s) for old, s in zip(state, new))
                outs[t] = ops.masked_fill(new[0], pad, 0.0)
            state = new
        return ops.stack(outs, axis=0), state

    def _cell(self, gx: Tensor, state: tuple, w_hh, b_hh) -> tuple:
        raise NotImplementedError

    def extra_repr(self) -> str:
        options = [f"{self.input_size}, {self.hidden_size}"]
        if self.num_layers != 1:
            options.append(f"num_layers={self.num_layers}")
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            options.append(f"nonlinearity={self.nonlinearity!r}")
        if not self.bias:
            options.append("bias=False")
        options.append(f"batch_first={self.batch_first}")
        if self.dropout:
            options.append(f"dropout={self.dropout}")
        if self.bidirectional:
            options.append("bidirectional=True")
        return ", ".join(options)


class RNN(RNNBase):
    """Elman RNN, torch.nn.RNN: h' = act(W_ih x_t + b_ih + W_hh h + b_hh), act = tanh or relu.

    weight_ih_l{k}: (H, in), weight_hh_l{k}: (H, H), bias_ih_l{k}, bias_hh_l{k}: (H,); "_reverse"
    for the backward direction. See RNNBase.forward for the shapes of the call.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = True, dropout: float = 0.0, bidirectional: bool = False,
                 generator=None, dtype=None, device=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu'; got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         generator, dtype, device)
        self.nonlinearity = nonlinearity

    def _cell(self, gx, state, w_hh, b_hh):
        (h,) = state
        a = gx + F.linear(h, w_hh, b_hh)                                        # (B, H)
        return (ops.tanh(a) if self.nonlinearity == "tanh" else ops.relu(a),)


class LSTM(RNNBase):
    """Long short-term memory, torch.nn.LSTM; gates in torch's order i, f, g, o.

    i, f, g, o = split(W_ih x_t + b_ih + W_hh h + b_hh);  c' = sig(f) * c + sig(i) * tanh(g);
    h' = sig(o) * tanh(c'). weight_ih_l{k}: (4H, in), weight_hh_l{k}: (4H, H), biases (4H,).
    forward returns (output, (h_n, c_n)); hx is a tuple (h_0, c_0). torch's proj_size is not supported.
    """

    GATES = 4
    STATES = 2

    def _cell(self, gx, state, w_hh, b_hh):
        h, c = state
        gates = gx + F.linear(h, w_hh, b_hh)                                    # (B, 4H)
        i, f, g, o = ops.split(gates, self.hidden_size, axis=-1)                # each (B, H)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        h = ops.sigmoid(o) * ops.tanh(c)
        return h, c


class GRU(RNNBase):
    """Gated recurrent unit, torch.nn.GRU; gates in torch's order r, z, n.

    r = sig(x_r + h_r), z = sig(x_z + h_z), n = tanh(x_n + r * h_n), h' = (1 - z) * n + z * h, where
    x_* are the thirds of W_ih x_t + b_ih and h_* those of W_hh h + b_hh (so r also scales b_hn).
    weight_ih_l{k}: (3H, in), weight_hh_l{k}: (3H, H), biases (3H,).
    """

    GATES = 3

    def _cell(self, gx, state, w_hh, b_hh):
        (h,) = state
        H = self.hidden_size
        x_r, x_z, x_n = ops.split(gx, H, axis=-1)                               # each (B, H)
        h_r, h_z, h_n = ops.split(F.linear(h, w_hh, b_hh), H, axis=-1)          # each (B, H)
        r = ops.sigmoid(x_r + h_r)
        z = ops.sigmoid(x_z + h_z)
        n = ops.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)
