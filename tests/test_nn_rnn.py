"""RNN, LSTM and GRU: float64 parity with torch.nn (outputs, final states and the gradients of the input,
of hx / c_0 and of every parameter, to 1e-10 relative) over every option combination, padded batches
against torch's pack_padded_sequence, from_torch / to_torch round trips bit for bit, hypothesis-driven
central-difference gradient checks, dropout between layers, initialisation, and the errors.

Relative difference = max |ours - torch| / max |torch|.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer as nf
from npformer import nn
from npformer.interop import from_torch, to_torch
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

torch = pytest.importorskip("torch")

F64 = dict(dtype=np.float64, device=DEVICE)
RTOL = 1e-10
MODES = {"rnn_tanh": ("RNN", dict(nonlinearity="tanh")), "rnn_relu": ("RNN", dict(nonlinearity="relu")),
         "lstm": ("LSTM", {}), "gru": ("GRU", {})}
I, H, B, STEPS = 3, 4, 3, 4          # input_size, hidden_size, batch, time steps of the parity tests


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(what, ours, theirs):
    a = host(ours) if isinstance(ours, nf.Tensor) or not isinstance(ours, np.ndarray) else ours
    b = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs torch {b.shape}"
    d = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))
    assert d <= RTOL, f"{what}: relative difference {d:.3g} > {RTOL:g}"


def torch_module(mode, seed, **options):
    """A float64 torch module of `mode`, its weights drawn from U(-0.6, 0.6) by a seeded generator (wider
    than torch's default, so the nonlinearities are exercised)."""
    kind, extra = MODES[mode]
    m = getattr(torch.nn, kind)(I, H, **extra, **options, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) - 0.5) * 1.2)
    return m


def run_both(m, twin, x, states, call_torch, call_ours, seed):
    """Forward both, contract every output with the same random cotangents, backward; returns
    (ours, theirs): dicts of output, h_n, c_n and the gradients of the inputs and of every parameter."""
    tx = torch.tensor(x, requires_grad=True)
    tstates = [torch.tensor(s, requires_grad=True) for s in states]
    ox = T(x, requires_grad=True)
    ostates = [T(s, requires_grad=True) for s in states]
    tout, thn = call_torch(m, tx, tstates)
    out, hn = call_ours(twin, ox, ostates)
    touts = [tout] + (list(thn) if isinstance(thn, tuple) else [thn])
    outs = [out] + (list(hn) if isinstance(hn, tuple) else [hn])
    rng = np.random.default_rng(seed)
    cots = [rng.standard_normal(tuple(t.shape)) for t in touts]
    sum(((t * torch.tensor(c)).sum() for t, c in zip(touts, cots))).backward()
    sum(((o * T(c)).sum() for o, c in zip(outs, cots))).backward()
    names = ["output", "h_n", "c_n"][: len(outs)]
    ours = {n: o for n, o in zip(names, outs)}
    theirs = {n: t for n, t in zip(names, touts)}
    ours["grad input"], theirs["grad input"] = ox.grad, tx.grad
    for name, o, t in zip(["grad h_0", "grad c_0"], ostates, tstates):
        ours[name], theirs[name] = o.grad, t.grad
    tparams = dict(m.named_parameters())
    assert [n for n, _ in twin.named_parameters()] == list(tparams)
    for name, p in twin.named_parameters():
        ours[f"grad {name}"], theirs[f"grad {name}"] = p.grad, tparams[name].grad
    return ours, theirs


def assert_round_trip(m, twin):
    """to_torch(twin) is m again: same class and options, every weight bit for bit."""
    back = to_torch(twin)
    assert type(back) is type(m) and back.training == m.training
    for option in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                   "proj_size"):
        assert getattr(back, option) == getattr(m, option), option
    assert getattr(back, "nonlinearity", None) == getattr(m, "nonlinearity", None)
    ours, theirs = back.state_dict(), m.state_dict()
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert np.array_equal(ours[k].numpy().view(np.uint8), v.detach().numpy().view(np.uint8)), k


def call(m, x, states, **kw):
    hx = None if not states else states[0] if len(states) == 1 else tuple(states)
    return m(x, hx, **kw)


def initial_states(rng, mode, n, *batch):
    return [rng.standard_normal((n, *batch, H)) * 0.5 for _ in range(2 if mode == "lstm" else 1)]


# ----------------------------------------------------------------------------- parity with torch

GRID = list(itertools.product(MODES, [1, 2], [True, False], [True, False], [False, True]))


@pytest.mark.parametrize("mode,num_layers,bias,batch_first,bidirectional", GRID,
                         ids=[f"{m}-L{n}-bias{b}-bf{f}-bi{d}" for m, n, b, f, d in GRID])
def test_matches_torch_every_option(mode, num_layers, bias, batch_first, bidirectional):
    """Outputs, h_n (c_n), and the gradients of the input, h_0 (c_0) and every parameter equal torch's to
    1e-10; with two layers dropout=0.25 is carried and both are in eval mode (dropout then off)."""
    seed = GRID.index((mode, num_layers, bias, batch_first, bidirectional))
    dropout = 0.25 if num_layers == 2 else 0.0
    m = torch_module(mode, seed, num_layers=num_layers, bias=bias, batch_first=batch_first,
                     bidirectional=bidirectional, dropout=dropout)
    if dropout:
        m.eval()
    twin = from_torch(m)
    kind = MODES[mode][0]
    assert type(twin) is getattr(nn, kind) and twin.training == m.training
    assert (twin.batch_first, twin.dropout, twin.bias) == (batch_first, dropout, bias)
    assert list(twin.state_dict()) == list(m.state_dict())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, STEPS, I) if batch_first else (STEPS, B, I))
    states = initial_states(rng, mode, num_layers * (2 if bidirectional else 1), B)
    ours, theirs = run_both(m, twin, x, states, call, call, seed)
    D = 2 if bidirectional else 1
    assert ours["output"].shape == ((B, STEPS, D * H) if batch_first else (STEPS, B, D * H))
    assert ours["h_n"].shape == (num_layers * D, B, H)
    for what in theirs:
        close(what, ours[what], theirs[what])
    assert_round_trip(m, twin)


@pytest.mark.parametrize("mode", list(MODES))
def test_unbatched_input_and_default_hx_match_torch(mode, ops_path):
    """Unbatched input (T, input_size) with hx (L*D, H), and batched input with hx=None (zeros), on both
    ops paths."""
    m = torch_module(mode, 40, num_layers=2, bidirectional=True)
    twin = from_torch(m)
    assert twin.batch_first is False                               # torch's default, carried
    rng = np.random.default_rng(40)
    x = rng.standard_normal((STEPS, I))
    ours, theirs = run_both(m, twin, x, initial_states(rng, mode, 4), call, call, 40)
    assert ours["output"].shape == (STEPS, 2 * H) and ours["h_n"].shape == (4, H)
    for what in theirs:
        close(what, ours[what], theirs[what])
    x = rng.standard_normal((STEPS, B, I))
    ours, theirs = run_both(m, twin, x, [], call, call, 41)
    for what in theirs:
        close(what, ours[what], theirs[what])


LENGTH_CASES = list(itertools.product(MODES, [True, False], [False, True]))


@pytest.mark.parametrize("mode,batch_first,bidirectional", LENGTH_CASES,
                         ids=[f"{m}-bf{f}-bi{d}" for m, f, d in LENGTH_CASES])
def test_lengths_match_pack_padded_sequence(mode, batch_first, bidirectional):
    """lengths (unsorted, the shortest 1, the longest T) against pack_padded_sequence(enforce_sorted=False)
    + pad_packed_sequence(total_length=T): outputs (zero at padded steps), h_n, c_n and every gradient;
    padded input steps get exactly zero gradient."""
    seed = 50 + LENGTH_CASES.index((mode, batch_first, bidirectional))
    m = torch_module(mode, seed, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    twin = from_torch(m)
    lengths = [2, STEPS, 1]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, STEPS, I) if batch_first else (STEPS, B, I))
    states = initial_states(rng, mode, 4 if bidirectional else 2, B) if seed % 2 else []

    def call_torch(mod, tx, tstates):
        pack = torch.nn.utils.rnn
        packed = pack.pack_padded_sequence(tx, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
        out, hn = call(mod, packed, tstates)
        return pack.pad_packed_sequence(out, batch_first=batch_first, total_length=STEPS)[0], hn

    ours, theirs = run_both(m, twin, x, states, call_torch, lambda mod, ox, s: call(mod, ox, s, lengths=lengths),
                            seed)
    for what in theirs:
        close(what, ours[what], theirs[what])
    out, gx = host(ours["output"]), host(ours["grad input"])
    if not batch_first:
        out, gx = out.swapaxes(0, 1), gx.swapaxes(0, 1)
    for b, n in enumerate(lengths):
        assert not out[b, n:].any() and not gx[b, n:].any()       # exactly zero, not merely small


def test_npformer_built_module_exports_to_torch():
    """An LSTM built in npformer (batch_first=True, our default) goes to a torch LSTM with batch_first=True
    that computes the same; from_torch of that gives every weight back bit for bit."""
    ours = nn.LSTM(I, H, num_layers=2, bidirectional=True, generator=nf.random.Generator(3, DEVICE), **F64)
    theirs = to_torch(ours)
    assert theirs.batch_first and theirs.bidirectional and theirs.num_layers == 2
    x = np.random.default_rng(3).standard_normal((B, STEPS, I))
    out, (h, c) = ours(T(x))
    tout, (th, tc) = theirs(torch.tensor(x))
    for what, a, b in (("output", out, tout), ("h_n", h, th), ("c_n", c, tc)):
        close(what, a, b)
    again = from_torch(theirs)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and np.array_equal(host(a), host(b))


# ----------------------------------------------------------------------------- gradient checks

@st.composite
def rnn_case(draw):
    mode = draw(st.sampled_from(list(MODES)))
    num_layers, bidirectional = draw(st.integers(1, 2)), draw(st.booleans())
    batch, steps = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    lengths = draw(st.none() | st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    return (mode, num_layers, bidirectional, draw(st.booleans()), draw(st.booleans()), batch, steps,
            draw(st.integers(1, 3)), lengths, draw(st.booleans()), draw(st.integers(0, 2 ** 16)))


@settings(max_examples=20)
@given(rnn_case())
def test_gradcheck(case):
    """Central differences agree with backward for the input, h_0 (c_0) and every parameter, through
    output, h_n and c_n, with and without lengths, every element of every input."""
    mode, num_layers, bidirectional, bias, batch_first, batch, steps, n_in, lengths, with_hx, seed = case
    kind, extra = MODES[mode]
    m = getattr(nn, kind)(n_in, 3, num_layers=num_layers, bias=bias, batch_first=batch_first,
                          bidirectional=bidirectional, generator=nf.random.Generator(seed, DEVICE), **extra, **F64)
    rng = np.random.default_rng(seed)
    x = T(rng.standard_normal((batch, steps, n_in) if batch_first else (steps, batch, n_in)), requires_grad=True)
    n = num_layers * (2 if bidirectional else 1)
    states = [T(rng.standard_normal((n, batch, 3)), requires_grad=True)
              for _ in range(2 if mode == "lstm" else 1)] if with_hx else []

    def flat(result):
        out, hn = result
        return (out,) + (hn if isinstance(hn, tuple) else (hn,))

    def forward(x, *states):
        return call(m, x, list(states), lengths=lengths)
    assert gradcheck_module(_Call(forward, m), [x, *states], pick=flat, seed=seed)


class _Call(nn.Module):
    """forward(*inputs) = fn(*inputs), owning `inner` so gradcheck_module sees its parameters."""

    def __init__(self, fn, inner):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args):
        return self.fn(*args)


# ----------------------------------------------------------------------------- structure, init, dropout

def test_parameter_names_shapes_and_init_follow_torch():
    """Names, shapes and state_dict order are torch's; every weight is drawn from U(-1/sqrt(H), 1/sqrt(H))
    by the generator (the same seed gives the same weights)."""
    for kind, G in (("RNN", 1), ("LSTM", 4), ("GRU", 3)):
        ours = getattr(nn, kind)(I, 5, num_layers=2, bidirectional=True, generator=nf.random.Generator(1), **F64)
        theirs = getattr(torch.nn, kind)(I, 5, num_layers=2, bidirectional=True)
        assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
               [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
        assert ours.weight_hh_l1_reverse.shape == (G * 5, 5) and ours.weight_ih_l1.shape == (G * 5, 10)
        values = np.concatenate([host(p).ravel() for p in ours.parameters()])
        assert np.abs(values).max() <= 1 / np.sqrt(5) and np.abs(values).max() > 0.95 / np.sqrt(5)
        assert abs(values.mean()) < 0.05 and len(np.unique(values)) == values.size
        same = getattr(nn, kind)(I, 5, num_layers=2, bidirectional=True, generator=nf.random.Generator(1), **F64)
        other = getattr(nn, kind)(I, 5, num_layers=2, bidirectional=True, generator=nf.random.Generator(2), **F64)
        assert np.array_equal(values, np.concatenate([host(p).ravel() for p in same.parameters()]))
        assert not np.array_equal(values, np.concatenate([host(p).ravel() for p in other.parameters()]))
    no_bias = nn.GRU(I, 4, bias=False, **F64)
    assert [n for n, _ in no_bias.named_parameters()] == ["weight_ih_l0", "weight_hh_l0"]
    assert repr(nn.RNN(3, 4, 2, "relu", dropout=0.5)) == "RNN(3, 4, num_layers=2, nonlinearity='relu', " \
                                                          "batch_first=True, dropout=0.5)"


def test_dropout_between_layers_in_training_only():
    """Training with dropout: outputs differ from eval mode and between seeds, and the same npformer.manual_seed
    gives the same outputs; one layer has no dropout after it, so train == eval there."""
    m = nn.GRU(I, 4, num_layers=2, dropout=0.5, generator=nf.random.Generator(0), **F64)
    x = T(np.random.default_rng(0).standard_normal((B, STEPS, I)))
    runs = {}
    for seed in (1, 1, 2):
        nf.manual_seed(seed)
        runs.setdefault(seed, []).append(host(m(x)[0]))
    np.testing.assert_array_equal(runs[1][0], runs[1][1])
    assert not np.allclose(runs[1][0], runs[2][0])
    m.eval()
    evaluated = host(m(x)[0])
    assert not np.allclose(runs[1][0], evaluated)
    nf.manual_seed(1)
    np.testing.assert_array_equal(host(m(x)[0]), evaluated)        # eval: no draw, no change
    single = nn.LSTM(I, 4, dropout=0.5, generator=nf.random.Generator(0), **F64)
    nf.manual_seed(1)
    train = host(single(x)[0])
    np.testing.assert_array_equal(train, host(single.eval()(x)[0]))


# ----------------------------------------------------------------------------- errors

def test_constructor_errors():
    with pytest.raises(ValueError, match=r"^RNN: nonlinearity must be 'tanh' or 'relu'; got 'gelu'$"):
        nn.RNN(3, 4, nonlinearity="gelu")
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^LSTM: dropout must be a number in \[0, 1\); got {bad}$"):
            nn.LSTM(3, 4, dropout=bad)
    for args, name, value in (((0, 4), "input_size", "0"), ((3, -1), "hidden_size", "-1"),
                              ((3, 4, 0), "num_layers", "0"), ((3, 2.5), "hidden_size", "2.5")):
        with pytest.raises(ValueError, match=rf"^GRU: {name} must be a positive integer; got {value}$"):
            nn.GRU(*args)


def test_input_and_state_errors():
    lstm = nn.LSTM(3, 4, num_layers=2, **F64)
    x = T(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match=r"^LSTM: input must be 3-D \(B, T, input_size\) or 2-D \(T, input_size\) "
                                         r"unbatched; got shape \(2, 2, 5, 3\)$"):
        lstm(T(np.zeros((2, 2, 5, 3))))
    with pytest.raises(ValueError, match=r"^LSTM: input of shape \(2, 5, 4\) has feature size 4; expected "
                                         r"input_size 3$"):
        lstm(T(np.zeros((2, 5, 4))))
    with pytest.raises(ValueError, match=r"has no time steps"):
        lstm(T(np.zeros((2, 0, 3))))
    with pytest.raises(TypeError, match=r"^LSTM: input has dtype float32 but the weights are float64$"):
        lstm(T(np.zeros((2, 5, 3), np.float32)))
    with pytest.raises(TypeError, match=r"^LSTM: hx must be a tuple \(h_0, c_0\); got Tensor$"):
        lstm(x, T(np.zeros((2, 2, 4))))
    good, bad = T(np.zeros((2, 2, 4))), T(np.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match=r"^LSTM: c_0 has shape \(1, 2, 4\); expected \(num_layers \* "
                                         r"num_directions, B, hidden_size\) = \(2, 2, 4\)$"):
        lstm(x, (good, bad))
    gru = nn.GRU(3, 4, bidirectional=True, batch_first=False, **F64)
    with pytest.raises(ValueError, match=r"^GRU: input must be 3-D \(T, B, input_size\)"):
        gru(T(np.zeros(3)))
    with pytest.raises(ValueError, match=r"^GRU: hx has shape \(2, 2, 4\); expected .* = \(2, 5, 4\)$"):
        gru(x, T(np.zeros((2, 2, 4))))                             # time first: B is 5 here
    with pytest.raises(ValueError, match=r"^GRU: hx has shape \(2, 1, 4\); expected \(num_layers \* num_directions, "
                                         r"hidden_size\) for unbatched input = \(2, 4\)$"):
        gru(T(np.zeros((5, 3))), T(np.zeros((2, 1, 4))))


@pytest.mark.parametrize("lengths,shown", [([0, 3], r"\[0, 3\]"), ([6, 3], r"\[6, 3\]"), ([3], r"\[3\]"),
                                           ([2.0, 3.0], r"\[2.0, 3.0\]"), ([[1, 2]], r"\[\[1, 2\]\]")])
def test_lengths_errors(lengths, shown):
    rnn = nn.RNN(3, 4, **F64)
    with pytest.raises(ValueError, match=rf"^RNN: lengths must be B = 2 integers in \[1, T\] with T = 5; "
                                         rf"got {shown}$"):
        rnn(T(np.zeros((2, 5, 3))), lengths=lengths)


def test_lengths_need_batched_input_and_torch_projection_is_refused():
    with pytest.raises(ValueError, match=r"^RNN: lengths needs batched input"):
        nn.RNN(3, 4, **F64)(T(np.zeros((5, 3))), lengths=[5])
    with pytest.raises(ValueError, match=r"^LSTM: proj_size=2 is not supported"):
        from_torch(torch.nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(ValueError, match=r"^RNN: dropout must be a number in \[0, 1\); got 1.0$"):
        from_torch(torch.nn.RNN(3, 4, num_layers=2, dropout=1.0))
