"""Rotary position embedding: rotate_half, apply_rotary_pos_emb and RotaryEmbedding against HF LLaMA's
(float64, forward and gradients to 1e-12), against the paper's pairwise rotation written here in
NumPy, float64 gradient checks, the float32 tables' precision next to HF's, and errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer as nf
from npformer.nn.rotary import RotaryEmbedding, apply_rotary_pos_emb, rotate_half
from tests.helpers import DEVICE, T, host


def hf_llama():
    """(torch, transformers' modeling_llama, LlamaConfig), or skip the test."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama
    return torch, modeling_llama, LlamaConfig


def ref_rotate(x, positions, theta):
    """The paper's rotation in LLaMA's pairing, per pair: feature i with i + d/2 by angle m theta^(-2i/d).

    x: (..., T, d); positions: (T,) or broadcastable (..., T)."""
    d = x.shape[-1]
    h = d // 2
    ang = np.asarray(positions, np.float64)[..., None] * theta ** (-2.0 * np.arange(h) / d)   # (..., T, d/2)
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], axis=-1)


# ----------------------------------------------------------------------------- rotate_half, apply_rotary_pos_emb

@pytest.mark.verify
@pytest.mark.parametrize("layout", ["heads_first", "heads_second"])
def test_apply_rotary_pos_emb_matches_hf_with_gradients(layout):
    """Same formula, same float64 arithmetic: outputs and the gradients of q, k, cos and sin to 1e-12."""
    torch, ml, _ = hf_llama()
    rng = np.random.default_rng(0)
    B, H, Hkv, Tn, d = 2, 4, 2, 5, 6
    shape_q, shape_k = ((B, H, Tn, d), (B, Hkv, Tn, d)) if layout == "heads_first" else ((B, Tn, H, d), (B, Tn, Hkv, d))
    dim = 1 if layout == "heads_first" else 2
    arrays = [rng.standard_normal(s) for s in (shape_q, shape_k, (B, Tn, d), (B, Tn, d))]
    ours = [T(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    oq, ok = apply_rotary_pos_emb(*ours, unsqueeze_dim=dim)
    tq, tk = ml.apply_rotary_pos_emb(*theirs, unsqueeze_dim=dim)
    gq, gk = rng.standard_normal(shape_q), rng.standard_normal(shape_k)
    ((oq * T(gq)).sum() + (ok * T(gk)).sum()).backward()
    ((tq * torch.tensor(gq)).sum() + (tk * torch.tensor(gk)).sum()).backward()
    np.testing.assert_allclose(host(oq), tq.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(ok), tk.detach().numpy(), rtol=1e-12, atol=1e-12)
    for name, a, b in zip("q k cos sin".split(), ours, theirs):
        np.testing.assert_allclose(host(a.grad), b.grad.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(host(rotate_half(T(x))), ml.rotate_half(torch.tensor(x)).numpy())


@st.composite
def rope_case(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    Tn, half = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    theta = draw(st.sampled_from([10.0, 10000.0, 500000.0]))
    return batch, Tn, 2 * half, theta, draw(st.integers(0, 2 ** 16))


@given(rope_case())
def test_apply_is_the_papers_rotation_and_its_gradient_the_inverse_rotation(case):
    """Pairs (i, i + d/2) turn by m theta_i; the norm is kept; the gradient of <g, R x> is R^T g = R_{-m} g;
    scores depend on the positions only through their difference."""
    batch, Tn, d, theta, seed = case
    rng = np.random.default_rng(seed)
    rope = RotaryEmbedding(d, max_position_embeddings=64, rope_theta=theta, dtype=np.float64, device=DEVICE)
    pos = rng.integers(0, 64, size=Tn)
    cos, sin = rope(T(pos))
    x, y, g = (rng.standard_normal(batch + (Tn, d)) for _ in range(3))
    xt = T(x, requires_grad=True)
    rx, ry = apply_rotary_pos_emb(xt, T(y), cos, sin, unsqueeze_dim=None)
    np.testing.assert_allclose(host(rx), ref_rotate(x, pos, theta), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(host(rx), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    (rx * T(g)).sum().backward()
    np.testing.assert_allclose(host(xt.grad), ref_rotate(g, -pos, theta), rtol=1e-12, atol=1e-12)
    # <R_m x, R_n y> = <R_{m+s} x, R_{n+s} y>: only m - n matters
    shift = int(rng.integers(1, 20))
    cos_s, sin_s = rope(T(pos + shift))
    sx, sy = apply_rotary_pos_emb(T(x), T(y), cos_s, sin_s, unsqueeze_dim=None)
    scores = host(rx) @ np.swapaxes(host(ry), -1, -2)
    np.testing.assert_allclose(host(sx) @ np.swapaxes(host(sy), -1, -2), scores, rtol=1e-9, atol=1e-10)


@settings(max_examples=10)
@given(rope_case())
def test_apply_rotary_pos_emb_gradcheck(case):
    """Central differences through q, k, cos and sin (cos and sin as free inputs, not a rotation)."""
    batch, Tn, d, _, seed = case
    rng = np.random.default_rng(seed)
    q, k = (T(rng.standard_normal(batch + (2, Tn, d)), requires_grad=True) for _ in range(2))
    cos, sin = (T(rng.standard_normal((Tn, d)), requires_grad=True) for _ in range(2))
    assert nf.gradcheck(lambda q, k, c, s: nf.concatenate(
        [t.reshape(-1) for t in apply_rotary_pos_emb(q, k, c, s, unsqueeze_dim=None)]), [q, k, cos, sin])


def test_gradcheck_catches_a_wrong_rotation():
    """The property above can fail: a rotation the wrong way round is not the reference."""
    rng = np.random.default_rng(3)
    rope = RotaryEmbedding(4, 16, dtype=np.float64, device=DEVICE)
    pos = np.arange(1, 5)
    cos, sin = rope(T(pos))
    x = rng.standard_normal((4, 4))
    backwards, _ = apply_rotary_pos_emb(T(x), T(x), cos, -sin, unsqueeze_dim=None)
    assert np.abs(host(backwards) - ref_rotate(x, pos, 10000.0)).max() > 1e-3


# ----------------------------------------------------------------------------- RotaryEmbedding

@pytest.mark.verify
def test_rotary_embedding_matches_hf_up_to_hfs_float32_angles():
    """inv_freq and the tables against LlamaRotaryEmbedding. HF computes the angles in float32 whatever the
    dtype, so a float64 table agrees with it only to float32 rounding of the angle: |error| grows as
    |angle| 2^-24. Ours, computed in float64, is exact to float64 rounding, and our float32 table is the
    correctly rounded one (within 2^-25 of the truth), tighter than HF's for all but the first positions."""
    torch, ml, LlamaConfig = hf_llama()
    d, theta, n = 16, 10000.0, 512
    cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, max_position_embeddings=n,
                      rope_theta=theta)
    hf = ml.LlamaRotaryEmbedding(cfg)
    pos = np.arange(n)
    hc, hs = (t[0].double().numpy() for t in hf(torch.zeros(1, dtype=torch.float64), torch.tensor(pos)[None]))
    exact = ref_rotate(np.eye(d)[None].repeat(n, 0), pos[:, None], theta)       # rotated basis vectors
    exact_cos = np.einsum("tii->ti", exact)                                     # R e_i . e_i = cos
    ours = RotaryEmbedding(d, n, theta, dtype=np.float64, device=DEVICE)
    oc, os_ = (host(t) for t in ours(T(pos)))
    np.testing.assert_allclose(oc, exact_cos, rtol=0, atol=1e-12)
    np.testing.assert_allclose(host(ours.inv_freq), hf.inv_freq.double().numpy(), rtol=1e-7)   # HF's is float32
    angle = pos[:, None] * np.concatenate([host(ours.inv_freq)] * 2)[None]         # (n, d), halves alike
    bound = 4 * (np.abs(angle) + 1) * 2.0 ** -24
    assert (np.abs(oc - hc) <= bound).all() and (np.abs(os_ - hs) <= bound).all()
    o32 = RotaryEmbedding(d, n, theta, dtype=np.float32, device=DEVICE)
    c32 = host(o32.cos_cached).astype(np.float64)
    assert np.abs(c32 - oc).max() <= 2.0 ** -25 * 1.01                          # correctly rounded
    assert np.abs(hc - oc).max() > 10 * np.abs(c32 - oc).max()                  # HF's float32 angles


def test_rotary_embedding_positions_shapes_tables_and_extension():
    d, n = 8, 16
    rope = RotaryEmbedding(d, n, rope_theta=100.0, dtype=np.float64, device=DEVICE)
    assert [name for name, _ in rope.named_buffers()] == ["inv_freq", "cos_cached", "sin_cached"]
    assert host(rope.cos_cached).shape == (n, d) and rope.parameters() == []
    pos = np.array([[0, 3, 15], [2, 2, 9]])
    cos, sin = rope(T(pos))
    assert cos.shape == sin.shape == (2, 3, d) and not cos.requires_grad and cos.dtype == np.float64
    np.testing.assert_array_equal(host(cos), host(rope.cos_cached)[pos])
    cos1, _ = rope([4, 5])                                                      # a list, (T,)
    assert cos1.shape == (2, d)
    # past the table: the formula, the same numbers a longer table has; the buffers unchanged
    longer = RotaryEmbedding(d, 64, rope_theta=100.0, dtype=np.float64, device=DEVICE)
    far = np.array([3, 15, 16, 40])
    before = host(rope.cos_cached).copy()
    for ours, theirs in zip(rope(T(far)), longer(T(far))):
        np.testing.assert_allclose(host(ours), host(theirs), rtol=0, atol=1e-15)
    assert np.array_equal(host(rope.cos_cached), before) and host(rope.cos_cached).shape == (n, d)
    # the tables are formulas: a float32 module cast to float64 has the float64 tables, not rounded ones
    r32 = RotaryEmbedding(d, n, rope_theta=100.0, dtype=np.float32, device=DEVICE)
    assert host(r32(T(far))[0]).dtype == np.float32
    r32.double()
    np.testing.assert_array_equal(host(r32.sin_cached), host(rope.sin_cached))


def test_rotary_errors_name_the_argument():
    with pytest.raises(ValueError, match="head_dim must be even .* got 5"):
        RotaryEmbedding(5)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        RotaryEmbedding(0)
    with pytest.raises(ValueError, match="max_position_embeddings must be a positive int"):
        RotaryEmbedding(4, 0)
    with pytest.raises(ValueError, match="rope_theta must be a positive finite number"):
        RotaryEmbedding(4, 8, rope_theta=-1.0)
    rope = RotaryEmbedding(4, 8, dtype=np.float64, device=DEVICE)
    with pytest.raises(ValueError, match="positions must be >= 0; got -1"):
        rope(T(np.array([0, -1])))
    with pytest.raises(ValueError, match=r"positions must be integers of shape \(T,\) or \(B, T\); got dtype float64"):
        rope(T(np.array([0.0, 1.0])))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 2\)"):
        rope(T(np.zeros((1, 1, 2), int)))
    with pytest.raises(ValueError, match="rotate_half: the last axis of x .* must be even"):
        rotate_half(T(np.zeros((2, 3))))
    q, cos = T(np.zeros((1, 2, 3, 4))), T(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="unsqueeze_dim=1 .* pass unsqueeze_dim=None"):
        apply_rotary_pos_emb(q, q, cos, cos)
    with pytest.raises(ValueError, match=r"k of shape \(1, 2, 3, 6\) must end with cos's last axis 4"):
        apply_rotary_pos_emb(q, T(np.zeros((1, 2, 3, 6))), cos, cos, unsqueeze_dim=None)
    with pytest.raises(ValueError, match=r"cos \(3, 4\) and sin \(2, 4\) must have the same shape"):
        apply_rotary_pos_emb(q, q, cos, T(np.zeros((2, 4))), unsqueeze_dim=None)
    with pytest.raises(ValueError, match=r"cos and sin of shape \(5, 4\) .* do not broadcast with q"):
        apply_rotary_pos_emb(q, q, T(np.zeros((5, 4))), T(np.zeros((5, 4))), unsqueeze_dim=None)
    with pytest.raises(TypeError, match="q is float32 but cos, sin are float64"):
        apply_rotary_pos_emb(T(np.zeros((1, 2, 3, 4), np.float32)), q, cos, cos, unsqueeze_dim=None)
