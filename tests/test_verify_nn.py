"""npformer.nn against torch.nn: outputs and the gradients of every parameter and input, with
weights copied over by state_dict name. Float64 to 1e-9 relative, float32 to 1e-4.

Relative difference = max |ours - torch| / max |torch| over the compared entries. Rows whose
keys are all masked are compared with torch only where torch is defined there (see each test);
our own behaviour on them (zeros, zero gradients) is tested in test_nn_attention.py.
Run with -s to print the worst difference seen per module.
"""

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.nn import functional as F
from tests.helpers import T, host

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.verify

TOL = {np.float64: 1e-9, np.float32: 1e-4}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}
WORST: dict = {}


@pytest.fixture(scope="module", autouse=True)
def worst_differences():
    yield
    print("\nworst relative difference to torch (outputs and gradients)")
    for name in sorted(WORST):
        print(f"  {name:28s} " + "  ".join(f"{np.dtype(d).name}: {v:.2e}" for d, v in sorted(
            WORST[name].items(), key=lambda kv: np.dtype(kv[0]).itemsize, reverse=True)))


def close(name, what, ours, theirs, dtype, where=None):
    """Assert ours ~ theirs (arrays) to TOL[dtype] relative; record the worst per module and dtype."""
    a = host(ours).astype(np.float64)
    b = theirs.detach().double().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs, np.float64)
    assert a.shape == b.shape, f"{name} {what}: shape {a.shape} vs torch {b.shape}"
    if where is not None:
        a, b = a[where], b[where]
    d = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if b.size else 0.0
    slot = WORST.setdefault(name, {})
    slot[dtype] = max(slot.get(dtype, 0.0), d)
    assert d <= TOL[dtype], f"{name} {what}: relative difference {d:.3g} > {TOL[dtype]:g}"


def twin_weights(ours, twin, seed):
    """Randomise the torch twin's parameters, check the names match ours in order, copy them over."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    theirs = twin.state_dict()
    assert list(ours.state_dict()) == list(theirs), "state_dict names differ from torch's"
    ours.load_state_dict({k: v.detach().cpu().numpy() for k, v in theirs.items()})


def run_both(name, ours, twin, arrays, call_ours, call_twin, dtype, seed, out_rows=None):
    """Forward both on the same inputs, backward the same random cotangent, compare everything.

    arrays: float inputs (NumPy), differentiated; out_rows: boolean index of the output entries
    to compare (the cotangent is zero elsewhere).
    """
    xs = [T(a.astype(dtype), requires_grad=True) for a in arrays]
    ts = [torch.tensor(a.astype(dtype), requires_grad=True) for a in arrays]
    out, tout = call_ours(*xs), call_twin(*ts)
    rng = np.random.default_rng(seed)
    cot = rng.standard_normal(tout.shape)
    if out_rows is not None:
        cot = np.where(out_rows, cot, 0.0)
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype}, expected {np.dtype(dtype)} (no upcasting)"
    close(name, "output", out, tout, dtype, where=out_rows)
    out.backward(T(cot.astype(dtype)).data)
    tout.backward(torch.tensor(cot, dtype=TORCH_DTYPE[dtype]))
    for i, (x, t) in enumerate(zip(xs, ts)):
        close(name, f"grad of input {i}", x.grad, t.grad, dtype)
    tparams = dict(twin.named_parameters())
    for pname, p in ours.named_parameters():
        tg = tparams[pname].grad
        close(name, f"grad of {pname}", p.grad, torch.zeros_like(tparams[pname]) if tg is None else tg, dtype)


DTYPES = [np.float64, np.float32]


# ----------------------------------------------------------------------------- functional and basic layers

@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_ops(dtype):
    tF = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5))
    tgt = np.array([1, -100, 4, 0])
    w, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    cases = {
        "F.softmax": (lambda x: F.softmax(x, dim=0), lambda x: tF.softmax(x, dim=0)),
        "F.log_softmax": (lambda x: F.log_softmax(x, dim=-1), lambda x: tF.log_softmax(x, dim=-1)),
        "F.cross_entropy": (lambda x: F.cross_entropy(x, T(tgt), label_smoothing=0.2),
                            lambda x: tF.cross_entropy(x, torch.tensor(tgt), label_smoothing=0.2)),
        "F.gelu": (lambda x: F.gelu(x, approximate="tanh"), lambda x: tF.gelu(x, approximate="tanh")),
        "F.layer_norm": (lambda x: F.layer_norm(x, (5,), eps=1e-3), lambda x: tF.layer_norm(x, (5,), eps=1e-3)),
        "F.linear": (lambda x: F.linear(x, T(w.astype(dtype)), T(b.astype(dtype))),
                     lambda x: tF.linear(x, torch.tensor(w.astype(dtype)), torch.tensor(b.astype(dtype)))),
    }
    for name, (ours, theirs) in cases.items():
        run_both(name, nn.Module(), torch.nn.Module(), [x], ours, theirs, dtype, seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_basic_layers(dtype):
    rng = np.random.default_rng(1)
    tn, kw, tkw = torch.nn, dict(dtype=dtype), dict(dtype=TORCH_DTYPE[dtype])
    x = rng.standard_normal((2, 3, 6))
    pairs = {
        "Linear": (nn.Linear(6, 4, **kw), tn.Linear(6, 4, **tkw)),
        "Linear(bias=False)": (nn.Linear(6, 4, bias=False, **kw), tn.Linear(6, 4, bias=False, **tkw)),
        "LayerNorm": (nn.LayerNorm(6, eps=1e-4, **kw), tn.LayerNorm(6, eps=1e-4, **tkw)),
        "LayerNorm(bias=False)": (nn.LayerNorm((3, 6), bias=False, **kw), tn.LayerNorm((3, 6), bias=False, **tkw)),
        "LayerNorm(no affine)": (nn.LayerNorm(6, elementwise_affine=False, **kw),
                                 tn.LayerNorm(6, elementwise_affine=False, **tkw)),
        "GELU": (nn.GELU(), tn.GELU()), "ReLU": (nn.ReLU(), tn.ReLU()), "Tanh": (nn.Tanh(), tn.Tanh()),
        "Sequential": (nn.Sequential(nn.Linear(6, 5, **kw), nn.GELU("tanh"), nn.Linear(5, 2, **kw)),
                       tn.Sequential(tn.Linear(6, 5, **tkw), tn.GELU("tanh"), tn.Linear(5, 2, **tkw))),
    }
    for i, (name, (ours, twin)) in enumerate(pairs.items()):
        twin_weights(ours, twin, seed=i)
        run_both(name, ours, twin, [x], ours, twin, dtype, seed=i)
    emb, temb = nn.Embedding(7, 3, **kw), tn.Embedding(7, 3, **tkw)
    twin_weights(emb, temb, seed=9)
    idx = np.array([[0, 6, 6, 2], [1, 0, 3, 3]])
    run_both("Embedding", emb, temb, [], lambda: emb(T(idx)), lambda: temb(torch.tensor(idx)), dtype, seed=9)


# ----------------------------------------------------------------------------- attention

SDPA_CASES = [  # (batch, L, S, E, Ev, mask kind, mask shape, scale)
    ((2,), 3, 5, 4, 2, "bool", (3, 5), None),
    ((2, 3), 4, 4, 3, 3, "float", (2, 1, 4, 4), 0.7),
    ((1,), 4, 6, 2, 5, "causal", None, None),
    ((2,), 5, 3, 4, 4, "causal", None, 0.25),          # L > S: top-left alignment matters
    ((3,), 3, 4, 2, 2, "bool_dead_row", (1, 3, 4), None),
    ((2,), 3, 3, 4, 3, "float_dead_row", (3, 3), None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: c[5])
def test_scaled_dot_product_attention(case, dtype):
    batch, L, S, E, Ev, kind, mshape, scale = case
    rng = np.random.default_rng(L * 10 + S)
    q, k, v = (rng.standard_normal(batch + s) for s in ((L, E), (S, E), (S, Ev)))
    mask, live = None, None
    if kind.startswith("bool"):
        mask = rng.random(mshape) < 0.7
        mask[..., 0] = True
        if kind.endswith("dead_row"):
            mask[..., 1, :] = False                        # query 1 may attend nothing
            live = np.ones(batch + (L, Ev), bool)
            live[..., 1, :] = False
    elif kind.startswith("float"):
        mask = rng.standard_normal(mshape)
        if kind.endswith("dead_row"):
            mask[2] = -np.inf
            live = np.ones(batch + (L, Ev), bool)
            live[..., 2, :] = False
    tmask = None if mask is None else torch.tensor(mask.astype(dtype) if mask.dtype != bool else mask)
    causal = kind == "causal"
    run_both("scaled_dot_product_attention", nn.Module(), torch.nn.Module(), [q, k, v],
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, None if mask is None else T(tmask.numpy()),
                                                            is_causal=causal, scale=scale),
             lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, tmask, is_causal=causal,
                                                                              scale=scale),
             dtype, seed=3, out_rows=live)


MHA_CASES = [  # (batch_first, kdim, vdim, bias, attn_mask kind, padding kind, need_weights, average)
    (True, None, None, True, "bool2d", "bool", True, True),
    (False, None, None, True, "float3d", None, True, False),
    (True, 3, 5, True, None, "float", True, True),
    (False, 3, 2, False, "bool3d", "bool", False, True),
    (True, None, None, True, "causal", None, True, True),
    (True, None, None, True, "dead_row", "bool", False, True),
]


# self-attention (query is key is value) only where kdim == vdim == embed_dim
MHA_PARAMS = [(c, sa) for c in MHA_CASES for sa in (True, False) if not (sa and c[1] is not None)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,self_attention", MHA_PARAMS,
                         ids=lambda c: f"{c[4]}-{c[5]}-bf{c[0]}-kd{c[1]}" if isinstance(c, tuple) else f"self{c}")
def test_multihead_attention(case, self_attention, dtype):
    batch_first, kdim, vdim, bias, am_kind, kpm_kind, need_weights, average = case
    E, H, B, L = 6, 2, 2, 4
    S = L if self_attention else 5
    rng = np.random.default_rng(sum(map(ord, str(case))))
    ours = nn.MultiHeadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=dtype)
    twin = torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first,
                                       dtype=TORCH_DTYPE[dtype])
    twin_weights(ours, twin, seed=L + S)
    lay = (lambda b, t, d: (b, t, d)) if batch_first else (lambda b, t, d: (t, b, d))
    x = rng.standard_normal(lay(B, L, E))
    mem_k = rng.standard_normal(lay(B, S, kdim or E))
    mem_v = rng.standard_normal(lay(B, S, vdim or E))
    am = {None: None, "bool2d": rng.random((L, S)) < 0.3, "float3d": rng.standard_normal((B * H, L, S)),
          "bool3d": rng.random((B * H, L, S)) < 0.3, "causal": np.triu(np.ones((L, S), bool), 1),
          "dead_row": np.zeros((L, S), bool)}[am_kind]
    if am_kind in ("bool2d", "bool3d"):
        am[..., 0] = False                                  # key 0 stays visible: no row is fully masked
    if am_kind == "dead_row":
        am[1] = True                                        # query 1 attends nothing
    kpm = {None: None, "bool": np.zeros((B, S), bool), "float": rng.standard_normal((B, S))}[kpm_kind]
    if kpm_kind == "bool":
        kpm[1, S - 2:] = True
    kw = dict(need_weights=need_weights, average_attn_weights=average)
    t_am = None if am is None else torch.tensor(am if am.dtype == bool else am.astype(dtype))
    t_kpm = None if kpm is None else torch.tensor(kpm if kpm.dtype == bool else kpm.astype(dtype))
    o_am, o_kpm = (None if m is None else T(m.numpy()) for m in (t_am, t_kpm))
    causal = am_kind == "causal"

    def call_ours(*a):
        q, k, v = (a[0], a[0], a[0]) if self_attention else a
        out, w = ours(q, k, v, key_padding_mask=o_kpm, attn_mask=None if causal else o_am, is_causal=causal, **kw)
        return out if w is None else nf.concatenate([out.reshape(-1), w.reshape(-1)])

    def call_twin(*a):
        q, k, v = (a[0], a[0], a[0]) if self_attention else a
        out, w = twin(q, k, v, key_padding_mask=t_kpm, attn_mask=t_am, is_causal=causal, **kw)
        return out if w is None else torch.cat([out.reshape(-1), w.reshape(-1)])
    inputs = [x] if self_attention else [x, mem_k, mem_v]
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(twin, mode)()
        for m in (ours, twin):
            m.zero_grad()
        run_both("MultiHeadAttention", ours, twin, inputs, call_ours, call_twin, dtype, seed=5)


# ----------------------------------------------------------------------------- Transformer

LAYER_CASES = [  # (batch_first, norm_first, activation, masks)
    (True, False, "relu", "causal_padding"),
    (False, True, "gelu", "causal_padding"),
    (True, True, "gelu", "dead_row"),
    (False, False, "relu", "float"),
]


def layer_masks(kind, B, T_, S, rng, dtype):
    """(self mask (T, T), self padding (B, T), cross mask (T, S), memory padding (B, S)) as arrays or None."""
    if kind == "causal_padding":
        pad_t, pad_s = np.zeros((B, T_), bool), np.zeros((B, S), bool)
        pad_t[0, -1] = pad_s[1, -2:] = True
        return np.triu(np.ones((T_, T_), bool), 1), pad_t, None, pad_s
    if kind == "dead_row":
        self_mask = np.zeros((T_, T_), bool)
        self_mask[1] = True                                 # position 1 attends nothing
        cross = np.zeros((T_, S), bool)
        cross[2] = True
        return self_mask, None, cross, None
    return (rng.standard_normal((T_, T_)).astype(dtype), rng.standard_normal((B, T_)).astype(dtype),
            rng.standard_normal((T_, S)).astype(dtype), None)


def _both(arrays):
    return ([None if a is None else T(a) for a in arrays], [None if a is None else torch.tensor(a) for a in arrays])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_transformer_layers_and_stacks(case, dtype):
    batch_first, norm_first, activation, mask_kind = case
    d, H, ff, B, T_, S = 6, 2, 10, 2, 4, 5
    rng = np.random.default_rng(sum(map(ord, str(case))))
    kw = dict(dim_feedforward=ff, dropout=0.0, activation=activation, batch_first=batch_first,
              norm_first=norm_first, layer_norm_eps=1e-4)
    tkw = dict(kw, dtype=TORCH_DTYPE[dtype])
    lay = (lambda b, t: (b, t, d)) if batch_first else (lambda b, t: (t, b, d))
    src, tgt = rng.standard_normal(lay(B, S)), rng.standard_normal(lay(B, T_))
    (sm, sp, _, _), (tm, tp, mm, mp) = layer_masks(mask_kind, B, S, S, rng, dtype), layer_masks(mask_kind, B, T_, S, rng, dtype)
    (o_sm, o_sp, o_tm, o_tp, o_mm, o_mp), (t_sm, t_sp, t_tm, t_tp, t_mm, t_mp) = _both([sm, sp, tm, tp, mm, mp])
    tn = torch.nn
    cases = {
        "TransformerEncoderLayer": (nn.TransformerEncoderLayer(d, H, dtype=dtype, **kw),
                                    tn.TransformerEncoderLayer(d, H, **tkw), [src],
                                    lambda m, s: m(s, o_sm, o_sp), lambda m, s: m(s, t_sm, t_sp)),
        "TransformerDecoderLayer": (nn.TransformerDecoderLayer(d, H, dtype=dtype, **kw),
                                    tn.TransformerDecoderLayer(d, H, **tkw), [tgt, src],
                                    lambda m, t, s: m(t, s, o_tm, o_mm, o_tp, o_mp),
                                    lambda m, t, s: m(t, s, t_tm, t_mm, t_tp, t_mp)),
        "TransformerEncoder": (nn.TransformerEncoder(nn.TransformerEncoderLayer(d, H, dtype=dtype, **kw), 2,
                                                     nn.LayerNorm(d, dtype=dtype)),
                               tn.TransformerEncoder(tn.TransformerEncoderLayer(d, H, **tkw), 2,
                                                     tn.LayerNorm(d, dtype=TORCH_DTYPE[dtype]),
                                                     enable_nested_tensor=False), [src],
                               lambda m, s: m(s, o_sm, o_sp), lambda m, s: m(s, t_sm, t_sp)),
        "TransformerDecoder": (nn.TransformerDecoder(nn.TransformerDecoderLayer(d, H, dtype=dtype, **kw), 2),
                               tn.TransformerDecoder(tn.TransformerDecoderLayer(d, H, **tkw), 2), [tgt, src],
                               lambda m, t, s: m(t, s, o_tm, o_mm, o_tp, o_mp),
                               lambda m, t, s: m(t, s, t_tm, t_mm, t_tp, t_mp)),
        "Transformer": (nn.Transformer(d, H, 2, 1, dtype=dtype, **kw), tn.Transformer(d, H, 2, 1, **tkw),
                        [src, tgt],
                        lambda m, s, t: m(s, t, o_sm, o_tm, o_mm, o_sp, o_tp, o_mp),
                        lambda m, s, t: m(s, t, t_sm, t_tm, t_mm, t_sp, t_tp, t_mp)),
    }
    for i, (name, (ours, twin, inputs, call_ours, call_twin)) in enumerate(cases.items()):
        twin_weights(ours, twin, seed=i)
        for mode in ("train", "eval"):        # eval with grad enabled: torch keeps its reference path
            getattr(ours, mode)(), getattr(twin, mode)()
            ours.zero_grad(), twin.zero_grad()
            run_both(name, ours, twin, inputs, lambda *a: call_ours(ours, *a), lambda *a: call_twin(twin, *a),
                     dtype, seed=i)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_flags_equal_torch_with_explicit_masks(dtype):
    """Our tgt_is_causal / is_causal without a mask equals torch given the square subsequent mask."""
    rng = np.random.default_rng(11)
    d, H = 4, 2
    ours = nn.Transformer(d, H, 1, 2, 8, dropout=0.0, activation="gelu", dtype=dtype)
    twin = torch.nn.Transformer(d, H, 1, 2, 8, dropout=0.0, activation="gelu", batch_first=True,
                                dtype=TORCH_DTYPE[dtype])
    twin_weights(ours, twin, seed=11)
    src, tgt = rng.standard_normal((2, 5, d)), rng.standard_normal((2, 3, d))
    ours_mask = nn.Transformer.generate_square_subsequent_mask(3, dtype=dtype)
    t_mask = torch.nn.Transformer.generate_square_subsequent_mask(3, dtype=TORCH_DTYPE[dtype])
    np.testing.assert_array_equal(host(ours_mask), t_mask.numpy())
    s_mask = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=TORCH_DTYPE[dtype])
    run_both("Transformer", ours, twin, [src, tgt],
             lambda s, t: ours(s, t, src_is_causal=True, tgt_is_causal=True),
             lambda s, t: twin(s, t, src_mask=s_mask, tgt_mask=t_mask, src_is_causal=True, tgt_is_causal=True),
             dtype, seed=11)


def test_encoder_eval_fast_path_outputs_on_unpadded_positions():
    """Under no_grad in eval, torch takes its fused path and zeroes padded positions: compare the rest."""
    rng = np.random.default_rng(12)
    d, H = 8, 2
    ours = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, H, 16, dtype=np.float64), 2).eval()
    twin = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(d, H, 16, batch_first=True,
                                                                        dtype=torch.float64), 2).eval()
    twin_weights(ours, twin, seed=12)
    src = rng.standard_normal((2, 5, d))
    pad = np.zeros((2, 5), bool)
    pad[0, 3:] = True
    with torch.no_grad():
        theirs = twin(torch.tensor(src), src_key_padding_mask=torch.tensor(pad))
    with nf.no_grad():
        mine = ours(T(src), src_key_padding_mask=T(pad))
    close("TransformerEncoder(eval fast path)", "output", mine, theirs, np.float64, where=~pad)
