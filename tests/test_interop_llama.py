"""LLaMA against HF transformers (npformer/interop/llama.py, and the llama part of pretrained.py).

from_torch / to_torch of LlamaForCausalLM and LlamaModel checked with npformer.interop.compare in
float64: logits, loss, the gradients of every parameter and of the input embeddings, and one AdamW
step at rtol 1e-10, with num_key_value_heads in {H, H/2, 1}, tied and untied, with a padding mask.
Cached greedy generation equals HF's generate(do_sample=False). Checkpoint directories: HF's
save_pretrained -> from_pretrained and back, and one-line errors for damaged or mismatched ones
(those need only safetensors, not torch).

HF's float64 LLaMA is not float64 throughout (transformers 5.25): its eager attention takes the
softmax in float32 (so the models here use sdpa), LlamaRMSNorm normalises in float32,
LlamaRotaryEmbedding computes cos and sin in float32, and ForCausalLMLoss casts the logits to float32.
`exact` replaces the last three on one HF model by the same formulas in float64; without it the two
agree to about 1e-7 (test_hf_float64_is_float32_inside_by_about_1e_7 measures it).
Run with -s to print the worst relative difference per case and kind.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import npformer as nf
from npformer import models
from npformer.interop import from_pretrained, save_pretrained
from npformer.models.sampling import generate
from tests.helpers import T, host

stn = pytest.importorskip("safetensors.numpy")
H = 4
TINY = dict(vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=H,
            max_position_embeddings=8)
ADAMW = ("AdamW", {"lr": 1e-2, "weight_decay": 0.1})
WORST = {}


def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_report():
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:                                         # no torch: the checkpoint error tests still run
        yield
        return
    from tests.torch_compare import one_torch_thread, print_worst
    with one_torch_thread():
        yield
    print_worst("worst relative difference of LLaMA twins (compare, float64)", WORST)


def exact(model):
    """The HF LLaMA `model` with its float32 steps made float64 (this instance only; see the module
    docstring): RMSNorm, the RoPE tables and the loss, each the same formula in the input's dtype."""
    torch, transformers = _hf()
    ml = transformers.models.llama.modeling_llama

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope(self, x, position_ids):
        d = self.config.head_dim
        inv_freq = 1.0 / self.config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = position_ids[..., None].double() * inv_freq                  # (B, T, d/2)
        emb = torch.cat((angle, angle), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def loss(logits, labels, vocab_size, ignore_index=-100, **kwargs):
        shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1),
                                                 ignore_index=ignore_index)

    for m in model.modules():
        if isinstance(m, ml.LlamaRMSNorm):
            m.forward = types.MethodType(rms_norm, m)
        elif isinstance(m, ml.LlamaRotaryEmbedding):
            m.forward = types.MethodType(rope, m)
    if isinstance(model, ml.LlamaForCausalLM):
        model.loss_function = loss
    return model


def hf_llama(cls="LlamaForCausalLM", seed=0, dtype="float64", scale=0.2, **overrides):
    """A small HF LLaMA (sdpa) in eval mode with every parameter moved off its init, drawn from `seed`."""
    torch, transformers = _hf()
    config = transformers.LlamaConfig(**{**TINY, **overrides}, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls)(config).to(getattr(torch, dtype)).eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def batch(seed, B=3, Tn=6):
    """(input_ids, attention_mask, labels): row 1 left-padded by 2, row 2 right-padded by 1 (pad id 0),
    the labels -100 at the pads."""
    ids = np.random.default_rng(seed).integers(1, TINY["vocab_size"], (B, Tn))
    mask = np.ones((B, Tn), np.int64)
    mask[1, :2] = 0
    mask[2, -1] = 0
    ids[mask == 0] = 0
    return ids, mask, np.where(mask == 1, ids, -100)


def check(name, hf, twin, *inputs, **kwargs):
    """compare with one AdamW step at rtol 1e-10; the worst rel per kind recorded."""
    from npformer.interop import compare
    report = compare(hf, twin, *inputs, kwargs=kwargs, steps=1, optimizer=ADAMW)
    report.assert_close(rtol=1e-10)
    slot = WORST.setdefault(name, {})
    for kind in ("output", "loss", "input_grad", "grad", "updated"):
        if report.select(kind):
            slot[kind] = max([slot.get(kind, 0.0)] + [e.rel for e in report.select(kind)])
    return report


def assert_same_state(a: dict, b: dict):
    """Two torch state dicts: the same names, dtypes and bits."""
    assert list(a) == list(b)
    for k in a:
        x, y = a[k].detach().numpy(), b[k].detach().numpy()
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------- from_torch, compare, to_torch

@pytest.mark.verify
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("Hkv", [H, H // 2, 1])
def test_twin_matches_hf_with_padding_and_loss(Hkv, tie):
    hf = exact(hf_llama(seed=Hkv + 10 * tie, num_key_value_heads=Hkv, tie_word_embeddings=tie))
    twin = nf.interop.from_torch(hf)
    assert type(twin) is models.LlamaForCausalLM and not hasattr(twin, "torch_mapping")   # names are HF's
    assert twin.config.num_key_value_heads == Hkv and twin.config.tie_word_embeddings == tie
    assert (twin.lm_head.weight is twin.model.embed_tokens.weight) == tie
    ids, mask, labels = batch(Hkv)
    report = check(f"LlamaForCausalLM Hkv={Hkv} {'tied' if tie else 'untied'}", hf, twin, ids,
                   attention_mask=mask, labels=labels)
    assert [e.name for e in report.select("output")] == ["output.loss", "output.logits"]
    assert len(report.select("grad")) == len(list(hf.parameters())) and not any(e.note for e in report)
    back = nf.interop.to_torch(twin)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie
    assert_same_state(back.state_dict(), hf.state_dict())


@pytest.mark.verify
def test_gradient_of_the_input_embeddings_and_position_ids():
    hf = exact(hf_llama(seed=3, num_key_value_heads=2, pad_token_id=0))
    twin = nf.interop.from_torch(hf)
    ids, mask, labels = batch(3)
    emb = np.random.default_rng(3).standard_normal((3, 6, 16))
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)                      # HF generate's, for left padding
    report = check("LlamaForCausalLM inputs_embeds", hf, twin, inputs_embeds=emb, attention_mask=mask,
                   position_ids=pos, labels=labels)
    (e,) = report.select("input_grad")
    assert e.name == "inputs_embeds" and e.scale > 0
    assert twin.model.embed_tokens.padding_idx == 0 == hf.model.embed_tokens.padding_idx
    assert np.abs(host(twin.model.embed_tokens.weight)[0]).max() > 0.05   # the pad row's values, used as they are
    check("LlamaForCausalLM pad_token_id", hf, twin, ids, attention_mask=mask, labels=labels)   # its grad: 0 both


@pytest.mark.verify
def test_llama_model_and_npformer_to_hf():
    hf = exact(hf_llama("LlamaModel", seed=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                        rope_theta=500.0, rms_norm_eps=1e-5))
    twin = nf.interop.from_torch(hf)
    assert type(twin) is models.LlamaModel and twin.config.rope_theta == 500.0
    ids, mask, _ = batch(4)
    check("LlamaModel biases", hf, twin, ids, attention_mask=mask)
    assert_same_state(nf.interop.to_torch(twin).state_dict(), hf.state_dict())

    config = models.LlamaConfig(**{**TINY, "num_key_value_heads": 2, "hidden_act": "gelu_pytorch_tanh"})
    ours = models.LlamaForCausalLM(config, generator=np.random.default_rng(4), dtype=np.float64).eval()
    with nf.no_grad():
        for p in ours.parameters():
            p.data[...] += p.xp.asarray(np.random.default_rng(5).standard_normal(p.shape) * 0.2)
    back = nf.interop.to_torch(ours)
    assert type(back).__name__ == "LlamaForCausalLM" and back.config._attn_implementation == "sdpa"
    assert back.config.hidden_act == "gelu_pytorch_tanh" and back.config.rope_parameters["rope_theta"] == 10000.0
    check("npformer -> LlamaForCausalLM", exact(back), ours, ids, attention_mask=mask, labels=ids)


@pytest.mark.verify
def test_hf_float64_is_float32_inside_by_about_1e_7():
    """Unpatched, HF's float64 forward differs from npformer's (and from its own float64 formulas) by
    its float32 RMSNorm, RoPE and loss: far above 1e-10, within 1e-5; patched, to 1e-13."""
    torch, _ = _hf()
    hf = hf_llama(seed=5, num_key_value_heads=2)
    twin = nf.interop.from_torch(hf)
    ids, mask, labels = batch(5)
    with torch.no_grad():
        plain = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
        patched = exact(hf)(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            labels=torch.from_numpy(labels))
    ours = twin(T(ids), attention_mask=T(mask), labels=T(labels))
    assert 1e-9 < rel(host(ours.logits), plain.logits.numpy()) < 1e-5
    assert 1e-9 < abs(float(host(ours.loss)) - plain.loss.item()) < 1e-5 and plain.loss.dtype == torch.float32
    assert rel(host(ours.logits), patched.logits.numpy()) < 1e-13


@pytest.mark.verify
@pytest.mark.parametrize("Hkv", [H, 1])
def test_cached_greedy_generation_equals_hfs(Hkv):
    """Token for token, also past max_position_embeddings (8), where both compute RoPE from its formula."""
    torch, _ = _hf()
    hf = exact(hf_llama(seed=6 + Hkv, scale=0.5, num_key_value_heads=Hkv, tie_word_embeddings=Hkv == 1,
                        bos_token_id=None, eos_token_id=None))
    twin = nf.interop.from_torch(hf)
    prompt = np.random.default_rng(Hkv).integers(1, TINY["vocab_size"], (2, 3))
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(prompt), max_new_tokens=9, do_sample=False).numpy()
    got = generate(twin, prompt, 9, top_k=1, use_cache=True)
    np.testing.assert_array_equal(got, want)
    assert len({tuple(r) for r in want[:, 3:]}) == 2 and len(set(want[0, 3:])) > 2   # not one repeated token


@pytest.mark.verify
@pytest.mark.parametrize("overrides,match", [
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
     r"LlamaConfig.rope_parameters has rope_type 'linear', which is not supported"),
    (dict(hidden_act="relu"), r"LlamaConfig.hidden_act must be one of"),
])
def test_options_npformer_lacks_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        nf.interop.from_torch(hf_llama(seed=7, **overrides))


# ----------------------------------------------------------------------------- checkpoint directories

def _logits(model, ids):
    out = model(T(ids))
    return np.asarray(host(out.logits if hasattr(out, "logits") else out.last_hidden_state))


def _hf_logits(model, ids):
    torch, _ = _hf()
    with torch.no_grad():
        out = model(torch.from_numpy(ids))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


TOL = {np.float64: 1e-10, np.float32: 1e-5}


@pytest.mark.verify
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls,tie", [("LlamaForCausalLM", False), ("LlamaForCausalLM", True), ("LlamaModel", False)])
def test_hf_checkpoint_loads_with_the_same_logits(tmp_path, cls, tie, dtype):
    hf = hf_llama(cls, seed=8, dtype=np.dtype(dtype).name, num_key_value_heads=2, tie_word_embeddings=tie)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert ("lm_head.weight" in stn.load_file(tmp_path / "model.safetensors")) == (cls == "LlamaForCausalLM"
                                                                                    and not tie)
    model = from_pretrained(tmp_path)
    assert type(model).__name__ == cls and not model.training
    assert all(v.dtype == dtype for v in model.state_dict().values())
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = batch(8)[0]
    want = _hf_logits(exact(hf) if dtype == np.float64 else hf, ids)     # float32: HF's own float32 tables
    assert rel(_logits(model, ids), want) < TOL[dtype]


@pytest.mark.verify
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_pretrained_loads_in_transformers(tmp_path, tie, dtype):
    torch, transformers = _hf()
    config = models.LlamaConfig(**{**TINY, "num_key_value_heads": 1, "tie_word_embeddings": tie, "rope_theta": 300.0,
                                   "eos_token_id": [2, 3]})
    model = models.LlamaForCausalLM(config, generator=np.random.default_rng(9), dtype=dtype).eval()
    with nf.no_grad():
        for p in model.parameters():
            p.data[...] += p.xp.asarray((np.random.default_rng(10).standard_normal(p.shape) * 0.2).astype(dtype))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 300.0} and cfg["dtype"] == np.dtype(
        dtype).name
    assert ("lm_head.weight" in stn.load_file(tmp_path / "model.safetensors")) == (not tie)
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch_dtype,
                                                           attn_implementation="sdpa").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.eos_token_id == [2, 3]
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    ids = batch(9)[0]
    assert rel(_logits(model, ids), _hf_logits(exact(hf) if dtype == np.float64 else hf, ids)) < TOL[dtype]
    back = from_pretrained(tmp_path)                                       # and our own round trip, bit for bit
    assert back.config == model.config
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)


@pytest.mark.verify
def test_from_pretrained_does_not_import_torch(tmp_path):
    hf_llama(seed=11, dtype="float32").save_pretrained(tmp_path, safe_serialization=True)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from npformer.interop import from_pretrained\n"
            f"m = from_pretrained({str(tmp_path)!r})\n"
            "assert sys.modules['torch'] is None\n"
            "print(type(m).__name__)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "LlamaForCausalLM"


# ----------------------------------------------------------------------------- errors and quirks (no torch needed)

def _saved(path, cls="LlamaForCausalLM", **overrides):
    model = getattr(models, cls)(models.LlamaConfig(**{**TINY, "num_key_value_heads": 2, **overrides}),
                                 generator=np.random.default_rng(12), dtype=np.float64)
    save_pretrained(model, path)
    return model


def _edit_config(path, drop=(), **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    for k in drop:
        del cfg[k]
    (path / "config.json").write_text(json.dumps(cfg))


def _one_line_error(path, exc=ValueError):
    with pytest.raises(exc) as info:
        from_pretrained(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("fields,names", [
    (dict(num_key_value_heads=3), ("config.json", "num_key_value_heads (3) must divide num_attention_heads (4)")),
    (dict(head_dim=5), ("config.json", "head_dim (5) must be even")),
    (dict(hidden_act="relu"), ("config.json", "hidden_act must be one of")),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     ("config.json", "LlamaConfig.rope_scaling has rope_type 'llama3'")),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), ("config.json", "rope_parameters")),
    (dict(architectures=["LlamaForSequenceClassification"]),
     ("config.json", "architectures ['LlamaForSequenceClassification'] is not supported for model_type 'llama'")),
])
def test_bad_config_names_the_file_and_field(tmp_path, fields, names):
    _saved(tmp_path)
    _edit_config(tmp_path, **fields)
    msg = _one_line_error(tmp_path)
    for n in names:
        assert n in msg, msg


def test_mismatched_and_damaged_weights(tmp_path):
    _saved(tmp_path)
    file = tmp_path / "model.safetensors"
    state = stn.load_file(file)
    _edit_config(tmp_path, num_key_value_heads=1)                          # config and weights disagree
    msg = _one_line_error(tmp_path)
    assert "model.safetensors: weight 'model.layers.0.self_attn.k_proj.weight' has shape (8, 16), but config.json " \
           "gives (4, 16)" in msg
    _edit_config(tmp_path, num_key_value_heads=2)
    del state["model.layers.1.mlp.up_proj.weight"]
    stn.save_file(state, file)
    msg = _one_line_error(tmp_path)
    assert "model.safetensors: weight 'model.layers.1.mlp.up_proj.weight' missing" in msg
    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((24, 16))
    state["model.layers.2.mlp.up_proj.weight"] = np.zeros((24, 16))
    stn.save_file(state, file)
    msg = _one_line_error(tmp_path)
    assert "model.safetensors: 1 unexpected weights" in msg and "model.layers.2.mlp.up_proj.weight" in msg
    data = file.read_bytes()
    file.write_bytes(data[:len(data) - 64])
    assert "model.safetensors: damaged or truncated" in _one_line_error(tmp_path)
    os.remove(file)
    assert "model.safetensors: missing" in _one_line_error(tmp_path, FileNotFoundError)


def test_checkpoint_quirks(tmp_path):
    """An older config.json (top-level rope_theta, rope_scaling null, no head_dim) and file (rotary_emb.inv_freq
    buffers); a LlamaModel file as LlamaForCausalLM (lm_head drawn fresh, reported) and the reverse (unused)."""
    model = _saved(tmp_path, rope_theta=777.0)
    _edit_config(tmp_path, drop=("rope_parameters", "head_dim"), rope_theta=777.0, rope_scaling=None)
    file = tmp_path / "model.safetensors"
    state = stn.load_file(file)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    stn.save_file(state, file)
    back = from_pretrained(tmp_path)
    assert back.config.rope_theta == 777.0 and back.config.head_dim == 4
    ids = batch(12)[0]
    np.testing.assert_array_equal(_logits(back, ids), _logits(model, ids))

    with pytest.warns(UserWarning, match=r"not used when initializing LlamaModel: \['lm_head.weight'\]"):
        base = models.LlamaModel.from_pretrained(tmp_path)
    np.testing.assert_array_equal(_logits(base, ids), host(model.model(T(ids)).last_hidden_state))

    bare = _saved(tmp_path / "base", "LlamaModel")
    with pytest.warns(UserWarning, match=r"newly initialized: \['lm_head.weight'\]"):
        lm = models.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    np.testing.assert_array_equal(host(lm.model(T(ids)).last_hidden_state), _logits(bare, ids))
    w = host(lm.lm_head.weight)
    assert w.shape == (29, 16) and 0.01 < w.std() < 0.03                   # N(0, initializer_range^2)
    _edit_config(tmp_path / "base", tie_word_embeddings=True)
    tied = models.LlamaForCausalLM.from_pretrained(tmp_path / "base")      # tied: no lm_head in the file is right
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
