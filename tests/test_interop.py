"""npformer.interop with torch.nn: from_torch twins of random torch modules compute the same outputs
and the same gradients of every parameter and input (float64 to 1e-9 relative, float32 to 1e-4),
with causal masks and key padding, batch_first both ways, pre- and post-LN; to_torch(from_torch(m))
gives m back with every weight bit for bit; unsupported modules and options raise.

Relative difference = max |ours - torch| / max |torch|. Run with -s to print the worst per module.
"""

import subprocess
import sys

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.interop import SUPPORTED, from_torch, to_torch
from tests.torch_compare import Worst
from tests.helpers import T, host

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.verify, pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")]

TD = {np.float64: torch.float64, np.float32: torch.float32}
DTYPES = [np.float64, np.float32]
WORST = Worst("worst relative difference of from_torch twins to torch (outputs and gradients)", other="torch")
close = WORST.close
ACTIVATIONS = [lambda: "relu", lambda: "gelu", lambda: torch.nn.GELU("tanh"), lambda: torch.nn.ReLU()]


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    """One torch thread (these tiny ops run 20x slower when threads contend for a few cores), then
    print the worst differences."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    WORST.report()



def randomise(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return m


def compare(name, m, twin, arrays, masks, call, dtype, seed):
    """call(module, *inputs, **masks) on torch and on the twin; the same random cotangent backward;
    compare the output, every input's gradient and every parameter's gradient (by name)."""
    ts = [torch.tensor(a.astype(dtype), requires_grad=True) for a in arrays]
    xs = [T(a.astype(dtype), requires_grad=True) for a in arrays]
    tout = call(m, *ts, **{k: torch.tensor(v) for k, v in masks.items()})
    out = call(twin, *xs, **{k: T(v) for k, v in masks.items()})
    assert out.dtype == dtype
    close(name, "output", out, tout, dtype)
    cot = np.random.default_rng(seed).standard_normal(tuple(tout.shape))
    tout.backward(torch.tensor(cot, dtype=TD[dtype]))
    out.backward(T(cot.astype(dtype)).data)
    for i, (x, t) in enumerate(zip(xs, ts)):
        close(name, f"grad of input {i}", x.grad, t.grad, dtype)
    theirs = dict(m.named_parameters())
    assert list(theirs) == [n for n, _ in twin.named_parameters()]
    for pname, p in twin.named_parameters():
        close(name, f"grad of {pname}", p.grad, theirs[pname].grad, dtype)
    return tout


def assert_round_trip(m, twin, rerun):
    """to_torch(twin) is m again: same class, same names, every weight bit for bit, same outputs."""
    back = to_torch(twin)
    assert type(back) is type(m) and back.training == m.training
    ours, theirs = back.state_dict(), m.state_dict()
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert np.array_equal(ours[k].numpy().view(np.uint8), v.detach().numpy().view(np.uint8)), k
    with torch.no_grad():
        assert torch.equal(rerun(back), rerun(m))                  # the same computation, bit for bit


# ----------------------------------------------------------------------------- random configurations

def draw(seed, batch_first, norm_first):
    """Random layer arguments; batch_first and norm_first are given so that all four pairs are tested."""
    rng = np.random.default_rng(seed)
    nhead = int(rng.integers(1, 4))
    d_head = int(rng.integers(2, 4)) if nhead > 1 else int(rng.integers(4, 6))   # d_model >= 4: a LayerNorm
    return dict(d_model=nhead * d_head, nhead=nhead, dim_feedforward=int(rng.integers(3, 10)),  # of 2 is flat
                dropout=0.0, activation=ACTIVATIONS[int(rng.integers(4))](),
                layer_norm_eps=float(10.0 ** rng.uniform(-6, -2)), batch_first=batch_first, norm_first=norm_first,
                bias=bool(rng.random() < 0.75))


def masks_for(rng, B, Tn, S, float_masks):
    """Causal (T, T) mask and (B, T), (B, S) key padding: True = masked out, or -inf added."""
    causal = np.triu(np.ones((Tn, Tn), bool), 1)
    pad_t, pad_s = np.zeros((B, Tn), bool), np.zeros((B, S), bool)
    pad_t[0, -1] = True
    pad_s[B - 1, -int(rng.integers(1, S)):] = True               # key 0 stays visible: no empty row
    if float_masks:
        causal, pad_t, pad_s = (np.where(m, -np.inf, 0.0) for m in (causal, pad_t, pad_s))
    return causal, pad_t, pad_s


def build(kind, cfg, dtype, rng):
    """(torch module, input shapes as (batch, length) pairs, call(module, *inputs, **masks), mask names)."""
    tn, td = torch.nn, TD[dtype]
    layer_cfg = dict(cfg, dtype=td)
    d, H = cfg["d_model"], cfg["nhead"]
    norm = (lambda: tn.LayerNorm(d, eps=cfg["layer_norm_eps"], bias=cfg["bias"], dtype=td)) \
        if rng.random() < 0.7 else (lambda: None)
    if kind == "TransformerEncoderLayer":
        return (tn.TransformerEncoderLayer(**layer_cfg), ["src"],
                lambda m, s, **k: m(s, src_mask=k["causal"], src_key_padding_mask=k["pad_t"]))
    if kind == "TransformerDecoderLayer":
        return (tn.TransformerDecoderLayer(**layer_cfg), ["tgt", "src"],
                lambda m, t, s, **k: m(t, s, tgt_mask=k["causal"], tgt_key_padding_mask=k["pad_t"],
                                       memory_key_padding_mask=k["pad_s"], tgt_is_causal=True))
    if kind == "TransformerEncoder":
        return (tn.TransformerEncoder(tn.TransformerEncoderLayer(**layer_cfg), 2, norm(), enable_nested_tensor=False),
                ["tgt"], lambda m, s, **k: m(s, mask=k["causal"], src_key_padding_mask=k["pad_t"]))
    if kind == "TransformerDecoder":
        return (tn.TransformerDecoder(tn.TransformerDecoderLayer(**layer_cfg), 2, norm()), ["tgt", "src"],
                lambda m, t, s, **k: m(t, s, tgt_mask=k["causal"], tgt_key_padding_mask=k["pad_t"],
                                       memory_key_padding_mask=k["pad_s"]))
    layer_cfg.pop("d_model"), layer_cfg.pop("nhead")
    return (tn.Transformer(d, H, 2, 1, **layer_cfg), ["src", "tgt"],
            lambda m, s, t, **k: m(s, t, tgt_mask=k["causal"], src_key_padding_mask=k["pad_s"],
                                   tgt_key_padding_mask=k["pad_t"], memory_key_padding_mask=k["pad_s"]))


KINDS = ["TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
         "Transformer"]
LAYOUTS = [(bf, nf_) for bf in (True, False) for nf_ in (False, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("batch_first,norm_first", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", KINDS)
def test_transformer_twins_match_torch(kind, batch_first, norm_first, dtype):
    seed = KINDS.index(kind) * 10 + LAYOUTS.index((batch_first, norm_first))
    cfg = draw(seed, batch_first, norm_first)
    rng = np.random.default_rng(seed)
    m, inputs, call = build(kind, cfg, dtype, rng)
    randomise(m, seed)
    twin = from_torch(m)
    assert type(twin) is getattr(nn, kind) and twin.training
    assert all(p.dtype == dtype for p in twin.parameters())
    assert list(twin.state_dict()) == list(m.state_dict())       # names map one-to-one
    B, lengths = 2, {"src": 5, "tgt": 4}
    shape = lambda name: (B, lengths[name], cfg["d_model"]) if batch_first else (lengths[name], B, cfg["d_model"])
    arrays = [rng.standard_normal(shape(n)) for n in inputs]
    Tn = lengths["tgt"] if "tgt" in inputs else lengths["src"]            # the self-attending sequence
    causal, pad_t, pad_s = masks_for(rng, B, Tn, lengths["src"], float_masks=rng.random() < 0.4)
    if dtype == np.float32 and causal.dtype != bool:
        causal, pad_t, pad_s = (a.astype(np.float32) for a in (causal, pad_t, pad_s))
    masks = dict(causal=causal, pad_t=pad_t, pad_s=pad_s)
    compare(kind, m, twin, arrays, masks, call, dtype, seed)
    tensors = [torch.tensor(a.astype(dtype)) for a in arrays]
    assert_round_trip(m, twin, lambda mod: call(mod, *tensors, **{k: torch.tensor(v) for k, v in masks.items()}))


MHA_CASES = [  # (batch_first, self-attention, kdim, vdim, bias, float masks, averaged weights)
    (True, True, None, None, True, False, True),
    (False, True, None, None, False, True, False),
    (True, False, 3, 5, True, True, True),
    (False, False, None, None, True, False, False),
    (False, False, 2, 7, False, False, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: f"bf{c[0]}-self{c[1]}-kd{c[2]}-bias{c[4]}")
def test_multihead_attention_twin_matches_torch(case, dtype):
    batch_first, self_attn, kdim, vdim, bias, float_masks, average = case
    E, H, B, L = 6, 3, 2, 4
    S = L if self_attn else 5
    rng = np.random.default_rng(MHA_CASES.index(case))
    m = randomise(torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first,
                                              dtype=TD[dtype]), 7)
    twin = from_torch(m)
    assert twin.batch_first == batch_first                          # torch's default (False) carried over
    lay = (lambda b, t, f: (b, t, f)) if batch_first else (lambda b, t, f: (t, b, f))
    arrays = [rng.standard_normal(lay(B, L, E))]
    if not self_attn:
        arrays += [rng.standard_normal(lay(B, S, kdim or E)), rng.standard_normal(lay(B, S, vdim or E))]
    causal, _, pad = masks_for(rng, B, L, S, float_masks)
    causal = np.triu(np.ones((L, S), bool), 1) if not float_masks else np.triu(np.full((L, S), -np.inf), 1)
    masks = {k: v.astype(dtype) if v.dtype != bool else v for k, v in dict(attn_mask=causal, pad=pad).items()}

    def call(mod, q, k=None, v=None, attn_mask=None, pad=None):
        k, v = (q, q) if k is None else (k, v)
        out, w = mod(q, k, v, key_padding_mask=pad, attn_mask=attn_mask, need_weights=True,
                     average_attn_weights=average)
        cat = torch.cat if isinstance(out, torch.Tensor) else nf.concatenate
        return cat([out.reshape(-1), w.reshape(-1)])
    compare("MultiheadAttention", m, twin, arrays, masks, call, dtype, seed=3)
    tensors = [torch.tensor(a.astype(dtype)) for a in arrays]
    assert_round_trip(m, twin, lambda mod: call(mod, *tensors, **{k: torch.tensor(v) for k, v in masks.items()}))


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
def test_multihead_attention_with_bias_kv_and_zero_attn(add_bias_kv, add_zero_attn):
    """torch's add_bias_kv / add_zero_attn are carried over (bias_k, bias_v copied); compare() finds the
    outputs, weights, input and parameter gradients and one AdamW step equal; the round trip is exact."""
    E, H, B, L, S = 6, 3, 2, 4, 5
    m = randomise(torch.nn.MultiheadAttention(E, H, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                              batch_first=True, dtype=torch.float64), 11)
    twin = from_torch(m)
    assert (twin.bias_k is not None) == add_bias_kv and twin.add_zero_attn == add_zero_attn
    rng = np.random.default_rng(11)
    q, k, v = rng.standard_normal((B, L, E)), rng.standard_normal((B, S, E)), rng.standard_normal((B, S, E))
    pad = np.zeros((B, S), bool)
    pad[1, -2:] = True
    report = nf.interop.compare(m, twin, q, k, v, kwargs=dict(key_padding_mask=pad, need_weights=True),
                                steps=1, optimizer=("AdamW", {"lr": 1e-2}))
    report.assert_close(rtol=1e-10)
    assert len(report.select("input_grad")) == 3
    tensors = [torch.tensor(a) for a in (q, k, v)]
    assert_round_trip(m, twin, lambda mod: mod(*tensors, key_padding_mask=torch.tensor(pad))[0])


def test_attention_options_torch_cannot_hold_raise_on_export():
    with pytest.raises(ValueError, match="scale=1.0 is not supported by torch.nn.MultiheadAttention"):
        to_torch(nn.MultiheadAttention(4, 2, scale=1.0))
    layer = nn.TransformerEncoderLayer(4, 2, 8)
    layer.self_attn = nn.MultiheadAttention(4, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match=r"self_attn: add_bias_kv=True is not supported inside a Transformer"):
        to_torch(layer)


def test_eval_mode_dropout_and_dtype_carry_over():
    """A float64 torch layer in eval mode with dropout 0.3: the twin is in eval mode with p = 0.3, so both
    are deterministic and equal; dtype=np.float32 gives a float32 twin; the global RNGs are untouched."""
    m = randomise(torch.nn.TransformerDecoderLayer(4, 2, 6, dropout=0.3, dtype=torch.float64), 1).eval()
    nf.manual_seed(5)
    expected = host(nf.randn(3))
    nf.manual_seed(5)
    torch_state = torch.get_rng_state()
    twin, twin32 = from_torch(m), from_torch(m, dtype=np.float32)
    back = to_torch(twin)
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(host(nf.randn(3)), expected)
    assert not twin.training and not back.training
    assert twin.dropout.p == twin.dropout1.p == twin.self_attn.dropout == 0.3 and back.dropout3.p == 0.3
    assert all(p.dtype == np.float32 for p in twin32.parameters())
    assert to_torch(twin32).linear1.weight.dtype == torch.float32
    assert to_torch(twin32, dtype=np.float64).linear1.weight.dtype == torch.float64
    rng = np.random.default_rng(1)
    tgt, mem = rng.standard_normal((3, 2, 4)), rng.standard_normal((5, 2, 4))
    want = m(torch.tensor(tgt), torch.tensor(mem)).detach()
    close("TransformerDecoderLayer", "eval output", twin(T(tgt), T(mem)), want, np.float64)
    close("TransformerDecoderLayer", "eval output", twin32(T(tgt, dtype=np.float32), T(mem, dtype=np.float32)),
          want, np.float32)


def test_export_of_an_npformer_module_matches_it():
    """to_torch of a module built in npformer (batch_first=True, our default) computes what it computes."""
    ours = nn.TransformerEncoder(nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, activation="gelu", norm_first=True,
                                                            dtype=np.float64), 2, nn.LayerNorm(6, dtype=np.float64))
    rng = np.random.default_rng(8)
    for p in ours.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.5)
    theirs = to_torch(ours)
    assert theirs.layers[0].self_attn.batch_first and theirs.layers[0].norm_first
    x = rng.standard_normal((2, 5, 6))
    close("TransformerEncoder", "export output", ours(T(x), is_causal=True),
          theirs(torch.tensor(x), mask=torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64),
                 is_causal=True), np.float64)
    again = from_torch(theirs)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and np.array_equal(host(a), host(b))


# ----------------------------------------------------------------------------- bad input

def test_unsupported_module_type_raises_type_error_listing_the_supported():
    with pytest.raises(TypeError, match=r"Conv1d is not supported; supported: MultiheadAttention, .*Transformer"):
        from_torch(torch.nn.Conv1d(2, 2, 3))

    class MyLayer(torch.nn.TransformerEncoderLayer):
        pass
    with pytest.raises(TypeError, match="MyLayer"):
        from_torch(MyLayer(4, 2, 8))                                # a subclass may compute something else
    with pytest.raises(TypeError, match="LearnedPositionalEmbedding"):
        to_torch(nn.LearnedPositionalEmbedding(3, 2))
    with pytest.raises(TypeError, match=r"TransformerEncoder.norm: .*RMSNorm is not supported here; expected Layer"):
        from_torch(torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(4, 2, 8), 1, torch.nn.RMSNorm(4),
                                               enable_nested_tensor=False))
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(4, 2, 8), 2, enable_nested_tensor=False)
    enc.layers[1] = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"layers.1 is a Linear; expected TransformerEncoderLayer"):
        from_torch(enc)
    assert set(SUPPORTED) >= {"MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
                              "TransformerEncoder", "TransformerDecoder", "Transformer"}


@pytest.mark.parametrize("make,option", [
    (lambda: torch.nn.TransformerEncoderLayer(4, 2, 8, activation=torch.tanh), "activation"),
    (lambda: torch.nn.TransformerDecoderLayer(4, 2, 8, activation=torch.nn.SiLU()), "activation"),
    (lambda: torch.nn.TransformerEncoderLayer(4, 2, 8).half(), "float16"),
])
def test_unsupported_options_raise_value_error_naming_them(make, option):
    with pytest.raises(ValueError, match=option):
        from_torch(make())


def test_inconsistent_submodules_raise_naming_the_option():
    m = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1)
    m.dropout1.p = 0.3
    with pytest.raises(ValueError, match="dropout"):
        from_torch(m)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(4, 2, 8), 2, enable_nested_tensor=False)
    enc.layers[1].norm_first = True
    with pytest.raises(ValueError, match="layers.1"):
        from_torch(enc)
    with pytest.raises(ValueError, match="dtype"):
        from_torch(torch.nn.Linear(2, 2), dtype=np.int32)
    assert from_torch(torch.nn.Linear(2, 2).half(), dtype=np.float32).weight.dtype == np.float32


def test_interop_imports_without_torch():
    """A numpy-only install imports npformer.interop; calling it says that torch is needed."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import npformer.interop as i\n"
            "try:\n    i.from_torch(object())\n"
            "except ImportError as e:\n    print('needs torch' if 'torch' in str(e) else e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "needs torch"
