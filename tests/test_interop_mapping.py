"""npformer.interop.mapping: TorchMapping routes torch names to a twin's (patterns, prefixes, dropped
entries, functions, transposed and fused q/k/v weights) and back exactly; load_torch_state_dict
copies through the twin's load_state_dict, keeps its dtype without silent rounding, remembers the
mapping, and lists every missing, unexpected and mis-shaped entry at once with the likely fix.

The routing tests use NumPy arrays only; those that load from torch modules skip without torch.
"""

import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.interop import TorchMapping, load_torch_state_dict
from npformer.interop.mapping import Route
from tests.helpers import host


def arrays(*specs, seed=0):
    """{name: random array} for (name, shape) pairs."""
    rng = np.random.default_rng(seed)
    return OrderedDict((name, rng.standard_normal(shape)) for name, shape in specs)


# ----------------------------------------------------------------------------- routing

def test_patterns_prefixes_and_dropped_entries():
    m = TorchMapping(rename={"*.feed_forward.w_1.*": "*.linear1.*", "generator.proj": "generator",
                             "*.pe": None, "gen": "never"})
    assert m.route("enc.layers.3.feed_forward.w_1.bias") == Route("enc.layers.3.feed_forward.w_1.bias",
                                                                  "enc.layers.3.linear1.bias", False, None)
    assert m.route("generator.proj.weight").twin_name == "generator.weight"
    assert m.route("generator.projection.weight").twin_name == "generator.projection.weight"   # not a prefix
    assert m.route("generator.weight").twin_name == "generator.weight"                           # "gen" neither
    assert m.route("src_embed.1.pe").twin_name is None
    assert m.route("untouched.weight").twin_name == "untouched.weight"


def test_first_matching_entry_wins_and_stages_chain():
    m = TorchMapping(rename={"a.*": "first.*", "a.b": "second"})
    assert m.route("a.b.c").twin_name == "first.b.c"
    chained = TorchMapping(rename=[{"model.": "never", "model": ""}, lambda n: n.lstrip("."),
                                   {"*.w_2.*": "*.linear2.*"}])
    assert chained.route("model.layers.0.w_2.weight").twin_name == "layers.0.linear2.weight"
    assert TorchMapping(rename=lambda n: None if n.startswith("skip") else n.upper()).route("x.y").twin_name == "X.Y"


def test_to_twin_transposes_and_fuses_and_to_torch_inverts_exactly():
    state = arrays(("h.0.c_fc.weight", (4, 6)), ("blk.q.weight", (3, 5)), ("blk.k.weight", (3, 5)),
                   ("blk.v.weight", (3, 5)), ("blk.q.bias", (3,)), ("blk.k.bias", (3,)), ("blk.v.bias", (3,)),
                   ("blk.out.weight", (5, 3)), ("buf", (2,)))
    m = TorchMapping(rename={"blk.out": "blk.out_proj", "buf": None}, transpose=["*.c_fc.weight"],
                     fuse_qkv={"blk.in_proj_*": ("blk.q.*", "blk.k.*", "blk.v.*")})
    twin = m.to_twin(state)
    assert list(twin) == ["h.0.c_fc.weight", "blk.in_proj_weight", "blk.in_proj_bias", "blk.out_proj.weight"]
    np.testing.assert_array_equal(twin["h.0.c_fc.weight"], state["h.0.c_fc.weight"].T)
    np.testing.assert_array_equal(twin["blk.in_proj_weight"],
                                  np.concatenate([state[f"blk.{x}.weight"] for x in "qkv"]))
    assert m.route("blk.k.bias") == Route("blk.k.bias", "blk.in_proj_bias", False, 1)
    back = m.to_torch(twin)                                        # the names last passed to to_twin
    assert list(back) == [k for k in state if k != "buf"]
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k])
        assert v.flags.c_contiguous
    assert list(m.to_torch({"blk.out_proj.weight": twin["blk.out_proj.weight"]}, ["blk.out.weight", "buf"])) == \
        ["blk.out.weight"]                                      # absent or dropped sources are left out


def test_mapping_problems_are_listed_together():
    m = TorchMapping(transpose=["*.bias"], fuse_qkv={"in_proj_*": ("q.*", "k.*", "v.*")}, rename={"a": "c"})
    state = arrays(("lin.bias", (3,)), ("q.weight", (2, 4)), ("k.weight", (2, 4)), ("a", (1,)), ("c", (1,)))
    with pytest.raises(ValueError) as err:
        m.to_twin(state)
    msg = str(err.value)
    assert "lin.bias: transpose= matches it but it has shape (3,), not 2-D" in msg
    assert "fuse_qkv in_proj_weight: torch has no v: v.weight" in msg
    assert "a, c: all map to the twin entry c" in msg
    with pytest.raises(ValueError, match="divisible by 3"):
        m.to_torch({"in_proj_weight": np.zeros((4, 4))}, ["q.weight"])
    with pytest.raises(ValueError, match="pass torch_names"):
        TorchMapping().to_torch({})


def test_bad_specs_are_refused_naming_the_entry():
    with pytest.raises(ValueError, match=r"rename 'a\.\*' -> 'b': both sides need the same number of `\*`"):
        TorchMapping(rename={"a.*": "b"})
    with pytest.raises(ValueError, match=r"fuse_qkv\['in_proj_\*'\] must be three torch patterns"):
        TorchMapping(fuse_qkv={"in_proj_*": ("q.*", "k.*")})
    with pytest.raises(TypeError, match="rename takes dicts and functions"):
        TorchMapping(rename=[3])
    assert "transpose=('w',)" in repr(TorchMapping(transpose="w"))


# ----------------------------------------------------------------------------- loading into a twin

class Block(nn.Module):
    """in_proj (3E, E) fused attention weights, a Linear and a LayerNorm."""

    def __init__(self, E=4, dtype=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, dtype=dtype)
        self.linear1 = nn.Linear(E, 6, dtype=dtype)
        self.norm = nn.LayerNorm(E, dtype=dtype)
        self.pe = nn.SinusoidalPositionalEncoding(E, max_len=8, dtype=dtype)   # a formula buffer


def torch_like_state(E=4, seed=1, dtype=np.float64):
    """A state dict shaped as a torch module with separate q/k/v layers would give it."""
    specs = [(f"attn.{x}.{p}", (E, E) if p == "weight" else (E,)) for x in "qkv" for p in ("weight", "bias")]
    specs += [("attn.o.weight", (E, E)), ("attn.o.bias", (E,)), ("ff.w_1.weight", (6, E)), ("ff.w_1.bias", (6,)),
              ("norm.weight", (E,)), ("norm.bias", (E,))]
    return OrderedDict((k, v.astype(dtype)) for k, v in arrays(*specs, seed=seed).items())


RIGHT = dict(rename={"attn.o": "attn.out_proj", "ff.w_1": "linear1"},
             fuse_qkv={"attn.in_proj_*": ("attn.q.*", "attn.k.*", "attn.v.*")})


def test_load_copies_exactly_keeps_the_dtype_and_remembers_the_mapping():
    state = torch_like_state()
    with nf.default_dtype(np.float64):
        twin = Block()
    pe = host(twin.pe.pe)
    mapping = load_torch_state_dict(twin, state, **RIGHT)
    assert twin.torch_mapping is mapping and isinstance(mapping, TorchMapping)
    np.testing.assert_array_equal(host(twin.attn.in_proj_weight), np.concatenate([state[f"attn.{x}.weight"]
                                                                                 for x in "qkv"]))
    np.testing.assert_array_equal(host(twin.linear1.bias), state["ff.w_1.bias"])
    np.testing.assert_array_equal(host(twin.pe.pe), pe)                          # not in torch's state: kept
    assert all(p.dtype == np.float64 for p in twin.parameters())
    back = mapping.to_torch({k: v for k, v in twin.state_dict().items()}, list(state))
    assert all(np.array_equal(back[k], v) for k, v in state.items())


def test_float64_weights_into_a_float32_twin_are_refused_unless_cast():
    state = torch_like_state()
    twin = Block(dtype=np.float32)
    with pytest.raises(ValueError, match=r"would lose precision.*npformer.default_dtype"):
        load_torch_state_dict(twin, state, **RIGHT)
    load_torch_state_dict(twin, state, **RIGHT, cast=True)
    assert twin.linear1.weight.dtype == np.float32
    np.testing.assert_array_equal(host(twin.linear1.weight), state["ff.w_1.weight"].astype(np.float32))
    with nf.default_dtype(np.float64):                                      # float32 into float64: exact
        wide = Block()
    load_torch_state_dict(wide, torch_like_state(dtype=np.float32), **RIGHT)
    assert wide.norm.weight.dtype == np.float64


def test_every_missing_unexpected_and_misshaped_entry_is_listed_with_a_suggestion():
    state = torch_like_state()
    state["linear1.weight"] = state.pop("ff.w_1.weight").T.copy()          # stored (in, out)
    with nf.default_dtype(np.float64):
        twin = Block()
    with pytest.raises(ValueError) as err:
        load_torch_state_dict(twin, state, rename={"attn.o": "attn.out_proj", "ff.w_1": "linear1"})
    msg = str(err.value)
    assert msg.startswith("load_torch_state_dict into Block: 2 missing, 6 unexpected, 1 mis-shaped")
    assert ("mis-shaped: twin linear1.weight (6, 4) <- torch linear1.weight (4, 6): transposed? (transpose=)"
            in msg)
    assert ("missing: twin attn.in_proj_weight (12, 4): no torch entry maps to it; fused q/k/v? (fuse_qkv=) of "
            "attn.q.weight, attn.k.weight, attn.v.weight (4, 4)" in msg)
    for x in "qkv":
        assert f"unexpected: torch attn.{x}.weight (4, 4)" in msg
    assert "closest twin entry: attn.in_proj_weight (12, 4), fused q/k/v? (fuse_qkv=)" in msg
    assert "missing: twin attn.in_proj_bias (12,)" in msg                  # all listed, not only the first


def test_a_misspelt_rename_suggests_the_closest_twin_name():
    state = torch_like_state()
    with nf.default_dtype(np.float64):
        twin = Block()
    with pytest.raises(ValueError) as err:
        load_torch_state_dict(twin, state, rename={"attn.o": "attn.out_prj", "ff.w_1": "linear1"},
                              fuse_qkv=RIGHT["fuse_qkv"])
    msg = str(err.value)
    assert ("unexpected: torch attn.o.weight (mapped to attn.out_prj.weight) (4, 4): the twin has no "
            "attn.out_prj.weight; closest twin entry: attn.out_proj.weight (4, 4)") in msg
    assert "missing: twin attn.out_proj.bias (4,): no torch entry maps to it; closest torch entry: attn.o.bias" in msg
    twin2 = Block(dtype=np.float64)
    load_torch_state_dict(twin2, state, rename={"attn.o": "attn.out_prj", "ff.w_1": "linear1"},
                          fuse_qkv=RIGHT["fuse_qkv"], strict=False, cast=False)   # tolerated, compare reports them
    with pytest.raises(ValueError, match="either mapping= or rename="):
        load_torch_state_dict(twin2, state, mapping=TorchMapping(), rename={})


def test_loading_from_a_torch_module_and_comparing_through_the_remembered_mapping():
    torch = pytest.importorskip("torch")

    class Conv1DLike(torch.nn.Module):
        """A Linear stored (in, out), as HF's Conv1D stores it, under another name."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
            self.b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))

        def forward(self, x):
            return x @ self.w + self.b
    torch.manual_seed(2)
    theirs = Conv1DLike()
    with nf.default_dtype(np.float64):
        ours = nn.Linear(3, 5)
    load_torch_state_dict(ours, theirs, rename={"w": "weight", "b": "bias"}, transpose="w")
    from npformer.interop import compare
    report = compare(theirs, ours, np.random.default_rng(2).standard_normal((4, 3)), steps=1)
    report.assert_close(rtol=1e-10)
    assert [(e.name, e.shape) for e in report.select("grad")] == [("w", (3, 5)), ("b", (5,))]   # torch's layout


def test_mapping_works_without_torch_and_compare_says_it_needs_it():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import numpy as np\n"
            "from npformer import nn\n"
            "from npformer.interop import compare, load_torch_state_dict\n"
            "lin = nn.Linear(2, 3)\n"
            "load_torch_state_dict(lin, {'w': np.ones((2, 3), np.float32), 'b': np.zeros(3, np.float32)},\n"
            "                      rename={'w': 'weight', 'b': 'bias'}, transpose='w')\n"
            "assert (lin.weight.data == 1).all() and lin.weight.shape == (3, 2)\n"
            "try:\n    compare(object(), lin)\n"
            "except ImportError as e:\n    print('needs torch' if 'PyTorch' in str(e) else e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "needs torch"
