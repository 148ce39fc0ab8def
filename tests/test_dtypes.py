"""The default dtype (npformer.default_dtype / set_default_dtype), lossless load_state_dict, and
buffers recomputed from their formula by .to(dtype) / .double()."""

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.models import GPT, GPTConfig, Seq2SeqConfig, Seq2SeqTransformer
from npformer.nn.positional import sinusoidal_table
from tests.helpers import host

CFG = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, dropout=0.0)


def arrays_of(module):
    return list(module.state_dict().items())


def test_default_is_float32_and_the_context_makes_whole_models_float64():
    assert nf.get_default_dtype() == np.float32
    with nf.default_dtype(np.float64) as dt:
        assert dt == np.float64 == nf.get_default_dtype()
        made = [nf.zeros(2), nf.ones(2), nf.full((2,), 3.0), nf.randn(2), nf.rand(2), nf.arange(0.0, 2.0)]
        gpt = GPT(CFG)
        s2s = Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=7, tgt_vocab_size=9, d_model=8, nhead=2,
                                               num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                                               max_len=12))
        mask = nn.Transformer.generate_square_subsequent_mask(3)
    assert all(t.dtype == np.float64 for t in made) and mask.dtype == np.float64
    for model in (gpt, s2s):
        assert all(a.dtype == np.float64 for _, a in arrays_of(model)), model
    # the table is the float64 formula itself, not a float32 table cast up
    np.testing.assert_array_equal(host(s2s.pos_encoding.pe), sinusoidal_table(12, 8, np.float64))
    assert nf.get_default_dtype() == np.float32 and nf.zeros(1).dtype == np.float32
    assert all(a.dtype == np.float32 for _, a in arrays_of(GPT(CFG)))


def test_explicit_dtype_wins_and_float64_gpt_weights_are_not_float32_rounded():
    g64 = GPT(CFG, dtype=np.float64)
    w = host(g64.transformer.h[0].attn.c_attn.weight)
    assert w.dtype == np.float64 and not np.array_equal(w, w.astype(np.float32).astype(np.float64))
    with nf.default_dtype(np.float64):
        assert nf.zeros(1, dtype=np.float32).dtype == np.float32
        assert nn.Linear(2, 3, dtype=np.float32).weight.dtype == np.float32


def test_set_default_dtype_and_its_errors():
    try:
        nf.set_default_dtype("float64")
        assert nn.LayerNorm(3).weight.dtype == np.float64
    finally:
        nf.set_default_dtype(np.float32)
    assert nn.LayerNorm(3).weight.dtype == np.float32
    for bad in (np.int64, bool, "complex128"):
        with pytest.raises(TypeError, match=r"^set_default_dtype: the default dtype must be floating"):
            nf.set_default_dtype(bad)
    with pytest.raises(TypeError, match=r"^default_dtype: .* is not a dtype"):
        with nf.default_dtype("no such dtype"):
            pass
    with pytest.raises(RuntimeError, match="inside"):
        with nf.default_dtype(np.float64):
            raise RuntimeError("inside")
    assert nf.get_default_dtype() == np.float32          # restored after an exception


def test_load_state_dict_refuses_float64_into_float32_naming_each_entry():
    """The silent failure this guards: a float64 reference state loaded into a float32 module was
    rounded to float32, and a float64 input still gave a float64 result that was 5e-8 off."""
    rng = np.random.default_rng(0)
    src = nn.Linear(3, 2, dtype=np.float64, generator=nf.random.Generator(1, "cpu"))
    state = {k: host(v) + 1e-12 * rng.standard_normal(v.shape) for k, v in src.state_dict().items()}
    dst = nn.Linear(3, 2)
    before = host(dst.weight).copy()
    with pytest.raises(ValueError, match=r"^load_state_dict for Linear: 2 entries would lose precision: "
                                         r"weight \(float64 -> float32\), bias \(float64 -> float32\); "
                                         r".*cast=True"):
        dst.load_state_dict(state)
    np.testing.assert_array_equal(host(dst.weight), before)          # nothing half-loaded
    dst.load_state_dict(state, cast=True)
    np.testing.assert_array_equal(host(dst.weight), state["weight"].astype(np.float32))
    with nf.default_dtype(np.float64):
        exact = nn.Linear(3, 2)
    exact.load_state_dict(state)
    np.testing.assert_array_equal(host(exact.weight), state["weight"])
    up = nn.Linear(3, 2, dtype=np.float64)
    up.load_state_dict({k: v.astype(np.float32) for k, v in state.items()})    # widening is lossless
    assert up.weight.dtype == np.float64
    with pytest.raises(ValueError, match=r"weight \(int64 -> float32\)"):
        nn.Linear(1, 1, bias=False).load_state_dict({"weight": np.array([[2 ** 40]])})


def test_double_and_to_recompute_formula_buffers():
    """The second silent failure: .double() upcast a float32-rounded sinusoidal table (3e-8 off)."""
    pe32 = nn.SinusoidalPositionalEncoding(6, max_len=10)
    assert host(pe32.pe).dtype == np.float32
    pe32.double()
    np.testing.assert_array_equal(host(pe32.pe), sinusoidal_table(10, 6, np.float64))
    pe32.float()
    np.testing.assert_array_equal(host(pe32.pe), sinusoidal_table(10, 6, np.float32))
    pe32.to(dtype=np.float64)
    assert np.abs(host(pe32.pe) - sinusoidal_table(10, 6, np.float32).astype(np.float64)).max() > 1e-9
    np.testing.assert_array_equal(host(pe32.pe), sinusoidal_table(10, 6, np.float64))
