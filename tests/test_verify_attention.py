"""Attention's float masks and MultiHeadAttention's torch options against torch, in float64.

scaled_dot_product_attention with a float attn_mask that requires grad (broadcast over batch,
heads or queries), and nn.MultiheadAttention with a float attn_mask or key_padding_mask that
requires grad, with add_bias_kv / add_zero_attn, batch_first both ways and need_weights both ways.
Outputs, the gradients of the inputs, of the masks and of every parameter (bias_k and bias_v
included) agree with torch to 1e-10, absolute and relative to the largest torch entry. Weights go
over by state_dict name. Run with -s to print the worst differences seen.
"""

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.nn import functional as F
from tests.helpers import T, host

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.verify

TOL = 1e-10
WORST = {}        # name -> [max abs difference, max relative difference]


@pytest.fixture(scope="module", autouse=True)
def worst_differences():
    yield
    print("\nworst difference to torch, float64 (absolute, relative to the largest torch entry)")
    for name, (a, r) in sorted(WORST.items()):
        print(f"  {name:36s} abs {a:.2e}  rel {r:.2e}")


def close(name, what, ours, theirs):
    assert ours is not None, f"{name}: {what}: npformer gave no gradient (torch did)"
    a, b = host(ours), theirs.detach().numpy()
    assert a.shape == b.shape, f"{name}: {what}: shape {a.shape} vs torch {b.shape}"
    d = float(np.abs(a - b).max()) if b.size else 0.0
    rel = d / max(float(np.abs(b).max()) if b.size else 0.0, 1e-30)
    slot = WORST.setdefault(name, [0.0, 0.0])
    slot[0], slot[1] = max(slot[0], d), max(slot[1], rel)
    assert d <= TOL and rel <= TOL, f"{name}: {what}: max abs difference {d:.3g}, relative {rel:.3g} > {TOL:g}"


def compare(name, arrays, wanted, call_ours, call_torch, pairs=()):
    """Run both on float64 `arrays` (the i-th requiring grad when i in `wanted`), back-propagate one
    cotangent, compare the output and every gradient; `pairs`: (name, our Parameter, torch Parameter)."""
    ours = [T(a, requires_grad=i in wanted) for i, a in enumerate(arrays)]
    theirs = [torch.tensor(a, requires_grad=i in wanted) for i, a in enumerate(arrays)]
    out, tout = call_ours(*ours), call_torch(*theirs)
    close(name, "output", out, tout)
    cot = np.random.default_rng(0).standard_normal(tuple(tout.shape))
    out.backward(T(cot).data)
    tout.backward(torch.tensor(cot))
    for i in wanted:
        close(name, f"gradient of input {i}", ours[i].grad, theirs[i].grad)
    for pname, p, tp in pairs:
        close(name, f"gradient of {pname}", p.grad, tp.grad)


# ----------------------------------------------------------------------------- scaled_dot_product_attention

BIAS_SHAPES = [(4, 5), (1, 1, 4, 5), (2, 1, 1, 5), (3, 4, 5), (2, 3, 4, 5), (3, 1, 5)]
WANTED = [(0, 1, 2, 3), (3,), (0, 1, 2)]     # all; the mask alone (q, k, v frozen); q, k, v alone (mask frozen)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("wanted", WANTED, ids=["all", "mask-only", "qkv-only"])
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
def test_sdpa_float_attn_mask_gradient(shape, wanted, need_weights):
    rng = np.random.default_rng(len(shape) * 7 + shape[0])
    arrays = [rng.standard_normal(s) for s in ((2, 3, 4, 6), (2, 3, 5, 6), (2, 3, 5, 2), shape)]
    arrays[3][..., 1] = -np.inf                   # a masked key: its gradient is 0 on both sides

    def ours(q, k, v, m):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.45, need_weights=need_weights)
        return out[0] if need_weights else out
    compare("F.scaled_dot_product_attention", arrays, wanted, ours,
            lambda q, k, v, m: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.45))


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_attention_op_bias_with_causal_equals_torch_with_the_bias_masked(path):
    """ALiBi-style: ops.attention(bias=, causal=True) against torch SDPA given bias + the causal -inf."""
    L = 6
    rng = np.random.default_rng(1)
    slopes = 2.0 ** -np.arange(1, 4)
    alibi = -slopes[:, None, None] * (np.arange(L)[:, None] - np.arange(L)[None, :])      # (H, L, L)
    arrays = [rng.standard_normal(s) for s in ((2, 3, L, 4), (2, 3, L, 4), (2, 3, L, 4))] + [alibi]
    causal = torch.tensor(np.where(np.tri(L, L, dtype=bool), 0.0, -np.inf))
    with nf.ops.use(path):
        compare(f"ops.attention(bias=, causal) {path}", arrays, (0, 1, 2, 3),
                lambda q, k, v, b: nf.attention(q, k, v, bias=b, causal=True, scale=0.5),
                lambda q, k, v, b: torch.nn.functional.scaled_dot_product_attention(q, k, v, b + causal, scale=0.5))


# ----------------------------------------------------------------------------- nn.MultiheadAttention

def twins(E, H, seed, **kw):
    """Our MultiHeadAttention and torch's with the same random float64 weights, copied by state_dict name."""
    twin = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    ours = nn.MultiHeadAttention(E, H, dtype=np.float64, **kw)
    assert list(ours.state_dict()) == list(twin.state_dict()), "state_dict names differ from torch's"
    ours.load_state_dict({k: v.numpy() for k, v in twin.state_dict().items()})
    return ours, twin


MHA_CASES = [  # (add_bias_kv, add_zero_attn, batch_first, attn_mask, key_padding_mask, need_weights, self-attention)
    (False, False, True, "float2d", None, True, False),
    (False, False, False, None, "float", False, False),
    (False, False, True, "float3d", "float", False, True),
    (False, False, False, "bool2d", "float", True, False),
    (True, False, True, None, None, True, True),
    (True, False, False, "float2d", "bool", False, False),
    (False, True, True, "bool2d", "bool", True, False),
    (False, True, False, "float3d", "float", True, True),
    (True, True, True, "float2d", "float", False, False),
    (True, True, False, "bool3d", "float", True, True),
    (True, True, True, None, None, False, False),
]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")   # torch's, on mixed masks
@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_multihead_attention_options_and_float_mask_gradients(case):
    bias_kv, zero_attn, batch_first, am_kind, kpm_kind, need_weights, self_attn = case
    E, H, B, L = 6, 2, 2, 4
    S = L if self_attn else 5
    rng = np.random.default_rng(sum(map(ord, str(case))))
    ours, twin = twins(E, H, seed=L + S, add_bias_kv=bias_kv, add_zero_attn=zero_attn, batch_first=batch_first)
    lay = (lambda t: (B, t, E)) if batch_first else (lambda t: (t, B, E))
    arrays = [rng.standard_normal(lay(L))] + ([] if self_attn else [rng.standard_normal(lay(S))] * 2)
    am = {None: None, "float2d": rng.standard_normal((L, S)), "float3d": rng.standard_normal((B * H, L, S)),
          "bool2d": rng.random((L, S)) < 0.3, "bool3d": rng.random((B * H, L, S)) < 0.3}[am_kind]
    kpm = {None: None, "float": rng.standard_normal((B, S)), "bool": np.zeros((B, S), bool)}[kpm_kind]
    if am is not None and am.dtype == bool:
        am[..., 0] = False                                        # every query keeps key 0
    if kpm_kind == "bool":
        kpm[1, -2:] = True
    n_in = len(arrays)
    floats = [m for m in (am, kpm) if m is not None and m.dtype != bool]    # these are inputs too
    arrays += floats
    consts = {"attn_mask": am if am is not None and am.dtype == bool else None,
              "key_padding_mask": kpm if kpm is not None and kpm.dtype == bool else None}

    def call(module, wrap, cat):
        def fn(*ts):
            x, rest = ts[:n_in], list(ts[n_in:])
            q, k, v = (x[0], x[0], x[0]) if self_attn else (x[0], x[1], x[2])
            masks = {name: (None if kind is None else wrap(consts[name]) if consts[name] is not None else rest.pop(0))
                     for name, kind in (("attn_mask", am_kind), ("key_padding_mask", kpm_kind))}
            out, w = module(q, k, v, need_weights=need_weights, **masks)
            return out if w is None else cat(out, w)
        return fn
    tparams = dict(twin.named_parameters())
    pairs = [(n, p, tparams[n]) for n, p in ours.named_parameters()]
    for mode in ("train", "eval"):                 # dropout is 0: eval with grad enabled keeps torch's reference path
        getattr(ours, mode)(), getattr(twin, mode)()
        ours.zero_grad(), twin.zero_grad()
        compare("nn.MultiheadAttention", arrays, tuple(range(len(arrays))),
                call(ours, T, lambda o, w: nf.concatenate([o.reshape(-1), w.reshape(-1)])),
                call(twin, torch.tensor, lambda o, w: torch.cat([o.reshape(-1), w.reshape(-1)])), pairs)


def test_multihead_attention_unbatched_float_key_padding_mask():
    ours, twin = twins(4, 2, seed=3, add_bias_kv=True, add_zero_attn=True)
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5,))]
    tparams = dict(twin.named_parameters())
    compare("nn.MultiheadAttention unbatched", arrays, (0, 1, 2),
            lambda x, m, kpm: ours(x, m, m, key_padding_mask=kpm)[0],
            lambda x, m, kpm: twin(x, m, m, key_padding_mask=kpm)[0],
            [(n, p, tparams[n]) for n, p in ours.named_parameters()])


def test_multihead_attention_scale_equals_torch_with_the_query_projection_rescaled():
    """torch has no scale: ours with scale=s equals torch's with W^Q and b^Q multiplied by s sqrt(d_head)."""
    E, H, s = 6, 2, 1.0                            # T5's scale
    _, twin = twins(E, H, seed=5, add_bias_kv=True, batch_first=True)
    ours = nn.MultiHeadAttention(E, H, dtype=np.float64, add_bias_kv=True, scale=s)
    ours.load_state_dict({k: v.numpy() for k, v in twin.state_dict().items()})
    with torch.no_grad():
        twin.in_proj_weight[:E] *= s * np.sqrt(E // H)
        twin.in_proj_bias[:E] *= s * np.sqrt(E // H)
    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal((2, 4, E)), rng.standard_normal((2, 5, E)), rng.standard_normal((2, 5))]
    compare("nn.MultiheadAttention scale", arrays, (0, 1, 2),
            lambda x, m, kpm: ours(x, m, m, key_padding_mask=kpm)[0],
            lambda x, m, kpm: twin(x, m, m, key_padding_mask=kpm)[0])
