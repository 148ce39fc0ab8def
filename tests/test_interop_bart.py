"""BART interop (npformer/interop/bart.py) against transformers' BartModel and BartForConditionalGeneration:
float64 parity through npformer.interop.compare (outputs, the loss, every parameter's gradient and one
AdamW step at rtol 1e-10) with padding on both sides; the gradient w.r.t. encoder_outputs; cached
greedy generation token for token (and its logits) against HF's generate; round trips bit for bit;
HF checkpoint directories both ways (float64 1e-10, float32 1e-5), without torch on the reading side;
damaged or mismatched directories as one-line errors. HF's eager attention computes in float64.

The directory error cases need only safetensors; everything else is marked verify and skips
without torch / transformers.
"""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer.interop import compare
from npformer.interop.bart import bart_from_pretrained, bart_from_torch, bart_save_pretrained, bart_to_torch
from npformer.models import bart as bart_models
from npformer.models.bart import BartConfig, BartForConditionalGeneration, BartModel
from tests.helpers import DEVICE, T, host
from tests.test_models_bart import TINY, batch

stn = pytest.importorskip("safetensors.numpy")
ADAMW = ("AdamW", {"lr": 1e-2, "weight_decay": 0.1})
CG = "BartForConditionalGeneration"
TOL = {np.float64: 1e-10, np.float32: 1e-5}


def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


@pytest.fixture(scope="module")
def one_thread():
    torch, _ = _hf()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_bart(cls=CG, seed=0, dtype="float64", **overrides):
    """A small HF BART (eager attention, eval mode): HF's init plus N(0, 0.25^2) on every parameter and
    a final_logits_bias from N(0, 0.1^2), drawn from a torch generator seeded with `seed`."""
    torch, transformers = _hf()
    config = transformers.BartConfig(**{**TINY, **overrides}, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls)(config).to(getattr(torch, dtype)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.25)
        if cls == CG:
            model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=g) * 0.1)
    return model


def assert_same_state(a: dict, b: dict):
    """Two torch state dicts: the same names in the same order, dtypes and bits."""
    assert list(a) == list(b)
    for k in a:
        x, y = a[k].detach().numpy(), b[k].detach().numpy()
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------- parity

CASES = [
    (CG, {}),
    (CG, dict(tie_word_embeddings=False, activation_function="relu", scale_embedding=True)),
    (CG, dict(activation_function="gelu_new", decoder_start_token_id=0, pad_token_id=3)),
    ("BartModel", dict(activation_function="silu")),
]


@pytest.mark.verify
@pytest.mark.parametrize("cls,options", CASES, ids=[f"{c}-{'-'.join(o) or 'defaults'}" for c, o in CASES])
def test_twin_matches_hf_with_padding_on_both_sides(one_thread, cls, options):
    hf = hf_bart(cls, 1, **options)
    twin = bart_from_torch(hf)
    assert type(twin).__name__ == cls and twin.parameters()[0].dtype == np.float64 and not twin.training
    ids, mask, labels, dmask = batch(1)
    if cls == CG:
        kwargs, fields = dict(labels=labels), ["loss", "logits", "encoder_last_hidden_state"]
    else:
        kwargs, fields = dict(decoder_input_ids=np.where(labels == -100, 1, labels)), \
            ["last_hidden_state", "encoder_last_hidden_state"]
    report = compare(hf, twin, ids, kwargs=dict(attention_mask=mask, decoder_attention_mask=dmask, use_cache=False,
                                                **kwargs), steps=1, optimizer=ADAMW)
    report.assert_close(rtol=1e-10)
    assert [e.name for e in report.select("output")] == ["output." + f for f in fields]
    grads = report.select("grad")
    assert len(grads) == len(dict(hf.named_parameters())) and all(e.scale > 0 for e in grads if not e.note)
    if options.get("tie_word_embeddings") is False:      # the unused `shared`: no gradient on either side
        assert report.select("grad", "model.shared.weight")[0].note == "no gradient on either side"
    assert_same_state(bart_to_torch(twin).state_dict(), hf.state_dict())


@pytest.mark.verify
@settings(max_examples=8)
@given(st.lists(st.tuples(st.integers(1, 7), st.booleans(), st.integers(1, 6)), min_size=3, max_size=3))
def test_any_padding_matches_hf(one_thread, rows):
    """Each row: source length (left- or right-padded to 7) and target length (right-padded to 6)."""
    hf = hf_bart(CG, 2)
    twin = bart_from_torch(hf)
    ids = batch(2)[0]
    mask = np.zeros((3, 7), np.int64)
    dmask = np.zeros((3, 6), np.int64)
    for r, (n, left, m) in enumerate(rows):
        mask[r, (7 - n if left else 0):(7 if left else n)] = 1
        dmask[r, :m] = 1
    labels = np.where(dmask == 1, np.random.default_rng(2).integers(3, 19, (3, 6)), -100)
    compare(hf, twin, ids, kwargs=dict(attention_mask=mask, decoder_attention_mask=dmask, labels=labels,
                                       use_cache=False)).assert_close(rtol=1e-10)


@pytest.mark.verify
def test_gradient_wrt_encoder_outputs_matches_hf(one_thread):
    torch, _ = _hf()
    hf = hf_bart(CG, 3)
    twin = bart_from_torch(hf)
    ids, mask, labels, dmask = batch(3)
    memory = np.random.default_rng(3).standard_normal((3, 7, 8))
    r = np.random.default_rng(4).standard_normal((3, 6, 19))
    theirs = torch.tensor(memory, requires_grad=True)
    out = hf(attention_mask=torch.tensor(mask), encoder_outputs=(theirs,), labels=torch.tensor(labels),
             decoder_attention_mask=torch.tensor(dmask))
    ((out.logits * torch.tensor(r)).sum() + out.loss).backward()
    ours = T(memory, requires_grad=True)
    got = twin(attention_mask=T(mask), encoder_outputs=(ours,), labels=T(labels), decoder_attention_mask=T(dmask))
    ((got.logits * T(r)).sum() + got.loss).backward()
    assert rel(host(got.logits), out.logits.detach().numpy()) < 1e-10
    assert rel(host(ours.grad), theirs.grad.numpy()) < 1e-10 and np.abs(host(ours.grad)).max() > 1e-3
    assert not host(ours.grad)[mask == 0].any()                     # padded source positions are never read


GENERATION = [   # (seed, eos_token_id, forced_eos_token_id, what the rows do)
    (8, 17, 17, "all stop early"),       # at steps 2, 7 and 2: decoding ends after step 7 of 8
    (3, 14, 14, "some stop"),            # two rows stop, the third gets eos forced at the last step
    (3, 2, None, "none stop"),           # every step an argmax
    (4, 2, 2, "defaults"),               # BART's token ids
]


@pytest.mark.verify
@pytest.mark.parametrize("seed,eos,forced,what", GENERATION, ids=[g[3] for g in GENERATION])
def test_cached_greedy_generation_matches_hf_token_for_token(one_thread, seed, eos, forced, what):
    torch, _ = _hf()
    hf = hf_bart(CG, seed, eos_token_id=eos, forced_eos_token_id=forced)
    twin = bart_from_torch(hf)
    ids, mask, _, _ = batch(7)
    with torch.no_grad():
        want = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=1,
                           max_new_tokens=8, output_logits=True, return_dict_in_generate=True)
    seqs = want.sequences.numpy()
    for use_cache in (True, False):
        assert np.array_equal(twin.generate(T(ids), T(mask), max_new_tokens=8, use_cache=use_cache), seqs)
    early = [(row[1:-1] == eos).any() for row in seqs]                # stopped before the last column
    assert len({tuple(row) for row in seqs}) > 1                      # the source matters
    if what == "all stop early":
        assert seqs.shape[1] < 9 and all((row[1:] == eos).any() for row in seqs)
    elif what == "some stop":
        assert seqs.shape[1] == 9 and 0 < sum(early) < 3 and (seqs[:, -1] != eos).sum() == sum(early)
    elif what == "none stop":
        assert seqs.shape[1] == 9 and not (seqs[:, 1:] == eos).any()
    # generate's logits are cast to float32 (HF's argmax runs on those); the cached decoders, fed the
    # same tokens step by step, agree in float64
    memory = twin.model(T(ids), T(mask), decoder_input_ids=T(seqs[:, :1])).encoder_last_hidden_state
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"   # HF 5 / 4
    with torch.no_grad():
        theirs_memory = hf.model.encoder(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    assert rel(host(memory), theirs_memory.numpy()) < 1e-10
    ours, theirs = None, None
    for t in range(len(want.logits)):
        out = twin(attention_mask=T(mask), decoder_input_ids=T(seqs[:, t:t + 1]), encoder_outputs=memory,
                   past_key_values=ours, use_cache=True)
        with torch.no_grad():
            ref = hf(attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(seqs[:, t:t + 1]),
                     encoder_outputs=(theirs_memory,), use_cache=True, **{cache_kw: theirs})
        ours, theirs = out.past_key_values, getattr(ref, cache_kw)
        assert ours.length == t + 1
        assert rel(host(out.logits), ref.logits.numpy()) < 1e-10, t
        assert rel(host(out.logits)[:, -1], want.logits[t].double().numpy()) < 1e-6, t


@pytest.mark.verify
def test_float32_twin_and_an_npformer_model_exported():
    torch, transformers = _hf()
    hf32 = hf_bart(CG, 5, dtype="float32")
    twin32 = bart_from_torch(hf32)
    assert twin32.parameters()[0].dtype == np.float32 and twin32.final_logits_bias.dtype == np.float32
    ids, mask, labels, dmask = batch(5)
    with torch.no_grad():
        want = hf32(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).logits.numpy()
    assert rel(host(twin32(T(ids), T(mask), labels=T(labels)).logits), want) < 1e-5
    assert bart_to_torch(twin32).lm_head.weight.dtype == torch.float32
    assert bart_from_torch(hf32, dtype=np.float64).parameters()[0].dtype == np.float64
    ours = BartForConditionalGeneration(BartConfig(**{**TINY, "activation_function": "tanh"}),
                                        generator=np.random.default_rng(5), dtype=np.float64)
    back = bart_to_torch(ours)
    assert type(back) is transformers.BartForConditionalGeneration and back.config._attn_implementation == "eager"
    assert back.config.activation_function == "tanh" and back.training
    compare(back.eval(), ours.eval(), ids, kwargs=dict(attention_mask=mask, labels=labels, use_cache=False),
            steps=1, optimizer=ADAMW).assert_close(rtol=1e-10)
    with pytest.raises(TypeError, match="bart_from_torch: expected transformers' BartForConditionalGeneration"):
        bart_from_torch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="bart_to_torch: expected an npformer"):
        bart_to_torch(object())
    with pytest.raises(ValueError, match=r"BartConfig.encoder_layerdrop=0.1 is not supported"):
        bart_from_torch(hf_bart(CG, 5, encoder_layerdrop=0.1))


# ----------------------------------------------------------------------------- checkpoint directories

def _outputs(model, ids, mask):
    """The twin's logits (last_hidden_state for a BartModel) as a float64 host array."""
    out = model(T(ids), T(mask))
    return host(out.logits if hasattr(out, "logits") else out.last_hidden_state).astype(np.float64)


def _hf_outputs(hf, ids, mask):
    torch, _ = _hf()
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).double().numpy()


DIRS = [(CG, True), (CG, False), ("BartModel", True)]


@pytest.mark.verify
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls,tied", DIRS, ids=[f"{c}-{'tied' if t else 'untied'}" for c, t in DIRS])
def test_hf_directory_loads_with_the_same_outputs(one_thread, tmp_path, cls, tied, dtype):
    hf = hf_bart(cls, 6, dtype=np.dtype(dtype).name, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    model = bart_from_pretrained(tmp_path)
    assert type(model).__name__ == cls and model.parameters()[0].dtype == dtype and not model.training
    assert (model.config.tie_word_embeddings, model.config.d_model) == (tied, 8)
    ids, mask, _, _ = batch(6)
    assert rel(_outputs(model, ids, mask), _hf_outputs(hf, ids, mask)) < TOL[dtype]
    assert type(getattr(bart_models, cls).from_pretrained(tmp_path)) is type(model)


@pytest.mark.verify
@pytest.mark.parametrize("cls,tied", DIRS, ids=[f"{c}-{'tied' if t else 'untied'}" for c, t in DIRS])
def test_hf_loads_what_bart_save_pretrained_writes(one_thread, tmp_path, cls, tied):
    torch, transformers = _hf()
    hf = hf_bart(cls, 7, tie_word_embeddings=tied)
    twin = bart_from_torch(hf)
    twin.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "theirs")
    ours = stn.load_file(str(tmp_path / "ours" / "model.safetensors"))
    theirs = stn.load_file(str(tmp_path / "theirs" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)                           # the tied weights written as HF writes them
    assert all(np.array_equal(ours[k], theirs[k]) and ours[k].dtype == np.float64 for k in ours)
    back, info = getattr(transformers, cls).from_pretrained(tmp_path / "ours", output_loading_info=True,
                                                             attn_implementation="eager")
    assert back.dtype == torch.float64 and not any(info[k] for k in ("missing_keys", "unexpected_keys",
                                                                        "mismatched_keys"))
    assert back.config.tie_word_embeddings == tied and back.config.forced_eos_token_id == 2
    ids, mask, _, _ = batch(7)
    assert rel(_hf_outputs(back.double(), ids, mask), _hf_outputs(hf, ids, mask)) < 1e-10


@pytest.mark.verify
def test_reading_a_directory_does_not_import_torch(tmp_path):
    hf_bart(CG, 8, dtype="float32").save_pretrained(tmp_path)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from npformer.interop.bart import bart_from_pretrained\n"
            f"m = bart_from_pretrained({str(tmp_path)!r})\n"
            "assert sys.modules['torch'] is None\n"
            "print(type(m).__name__, m.parameters()[0].dtype)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [CG, "float32"]


@pytest.mark.verify
def test_a_bart_model_directory_as_the_lm_and_the_reverse(one_thread, tmp_path):
    _, transformers = _hf()
    hf_bart("BartModel", 9).save_pretrained(tmp_path / "base")
    lm = bart_from_pretrained(tmp_path / "base", architecture=CG)      # lm_head = shared, final_logits_bias 0
    want = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "base", attn_implementation="eager")
    ids, mask, _, _ = batch(9)
    assert rel(_outputs(lm, ids, mask), _hf_outputs(want.double(), ids, mask)) < 1e-10
    assert not host(lm.final_logits_bias).any()
    hf_bart(CG, 9).save_pretrained(tmp_path / "lm")
    with pytest.warns(UserWarning, match=r"were not used when initializing BartModel: \['final_logits_bias'\]"):
        base = BartModel.from_pretrained(tmp_path / "lm")
    want = transformers.BartModel.from_pretrained(tmp_path / "lm", attn_implementation="eager")
    assert rel(_outputs(base, ids, mask), _hf_outputs(want.double(), ids, mask)) < 1e-10


@pytest.mark.verify
def test_an_untied_directory_without_lm_head_draws_it_and_warns(tmp_path):
    hf_bart(CG, 10, tie_word_embeddings=False).save_pretrained(tmp_path)
    state = stn.load_file(str(tmp_path / "model.safetensors"))
    del state["lm_head.weight"]
    stn.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"newly initialized: \['lm_head.weight'\]"):
        model = bart_from_pretrained(tmp_path, seed=1)
    assert abs(host(model.lm_head.weight).std() - 0.02) < 0.01


# ----------------------------------------------------------------------------- damaged directories (no torch)

def _saved(tmp_path, **overrides):
    """A directory written by bart_save_pretrained from a seeded npformer model; its config dict."""
    model = BartForConditionalGeneration(BartConfig(**{**TINY, **overrides}), generator=np.random.default_rng(0))
    bart_save_pretrained(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        return model, json.load(f)


def _write_config(tmp_path, cfg):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)


def _state(tmp_path):
    return stn.load_file(str(tmp_path / "model.safetensors"))


def _write_state(tmp_path, state):
    stn.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})


def test_our_directory_round_trips_bit_for_bit_and_keeps_the_tied_weight_once(tmp_path):
    model, cfg = _saved(tmp_path)
    assert cfg["model_type"] == "bart" and cfg["architectures"] == [CG] and cfg["dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is True and cfg["forced_eos_token_id"] == 2
    names = set(_state(tmp_path))
    assert "model.shared.weight" in names and not names & {"lm_head.weight", "model.encoder.embed_tokens.weight",
                                                            "model.decoder.embed_tokens.weight"}
    back = BartForConditionalGeneration.from_pretrained(tmp_path)
    assert back.config == model.config and back.lm_head.weight is back.model.shared.weight
    assert all(np.array_equal(host(a), host(b)) for a, b in zip(model.state_dict().values(),
                                                                back.state_dict().values()))
    assert bart_from_pretrained(tmp_path, dtype=np.float64).parameters()[0].dtype == np.float64
    if DEVICE == "cpu":
        ids, mask, _, _ = batch(0)
        assert np.array_equal(host(model(ids, mask).logits), host(back(ids, mask).logits))


def test_an_old_file_with_every_tied_copy_loads_and_differing_copies_do_not(tmp_path):
    model, _ = _saved(tmp_path)
    full = {k: np.ascontiguousarray(host(v)) for k, v in model.state_dict().items()}
    full["model.encoder.version"] = np.array([2.0], np.float32)      # fairseq leftovers HF ignores
    _write_state(tmp_path, full)
    assert np.array_equal(host(bart_from_pretrained(tmp_path).lm_head.weight), full["lm_head.weight"])
    full["lm_head.weight"] = full["lm_head.weight"] + 1
    _write_state(tmp_path, full)
    with pytest.raises(ValueError) as info:
        bart_from_pretrained(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "model.safetensors"))
    assert "weight 'lm_head.weight' differs from 'model.shared.weight'" in msg and "tie_word_embeddings=true" in msg


def _damage(tmp_path, how):
    cfg = _saved(tmp_path)[1]
    if how == "no config":
        os.remove(tmp_path / "config.json")
    elif how == "bad json":
        (tmp_path / "config.json").write_text("{not json")
    elif how == "no weights":
        os.remove(tmp_path / "model.safetensors")
    elif how == "truncated":
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif how == "missing weight":
        state = _state(tmp_path)
        del state["model.decoder.layers.1.fc2.bias"]
        _write_state(tmp_path, state)
    elif how == "extra weight":
        _write_state(tmp_path, {**_state(tmp_path), "model.decoder.layers.2.fc2.bias": np.zeros(8, np.float32)})
    elif how == "no shared":
        _write_state(tmp_path, {k: v for k, v in _state(tmp_path).items() if k != "model.shared.weight"})
    else:                                                            # a config.json field
        field, value = how
        _write_config(tmp_path, {**cfg, field: value})


@pytest.mark.parametrize("how,error,where,match", [
    ("no config", FileNotFoundError, "config.json", r"missing"),
    ("bad json", ValueError, "config.json", r"not valid JSON"),
    ("no weights", FileNotFoundError, "model.safetensors", r"missing"),
    ("truncated", ValueError, "model.safetensors", r"damaged or truncated safetensors file"),
    ("missing weight", ValueError, "model.safetensors", r"weight 'model.decoder.layers.1.fc2.bias' missing"),
    ("extra weight", ValueError, "model.safetensors", r"1 unexpected weights .* 'model.decoder.layers.2.fc2.bias'"),
    ("no shared", ValueError, "model.safetensors", r"weight 'model.shared.weight' missing"),
    (("encoder_ffn_dim", 13), ValueError, "model.safetensors",
     r"weight 'model.encoder.layers.0.fc1.weight' has shape \(12, 8\), but config.json gives \(13, 8\)"),
    (("model_type", "bert"), ValueError, "config.json", r"model_type 'bert' is not 'bart'"),
    (("architectures", ["BartForSequenceClassification"]), ValueError, "config.json",
     r"architectures \['BartForSequenceClassification'\] is not supported; supported: BartForConditionalGeneration"),
    (("activation_function", "swiglu"), ValueError, "config.json", r"BartConfig.activation_function must be one of"),
    (("encoder_layerdrop", 0.1), ValueError, "config.json", r"BartConfig.encoder_layerdrop=0.1 is not supported"),
    (("eos_token_id", [2, 5]), ValueError, "config.json", r"BartConfig.eos_token_id must be None or an int"),
    (("d_model", 0), ValueError, "config.json", r"BartConfig.d_model must be a positive integer"),
    (("dropout", 2), ValueError, "config.json", r"BartConfig.dropout must be in \[0, 1\); got 2.0"),
])
def test_a_damaged_directory_raises_one_line_naming_the_file_and_field(tmp_path, how, error, where, match):
    _damage(tmp_path, how)
    with pytest.raises(error, match=match) as info:
        bart_from_pretrained(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / where) + ":")


def test_other_directory_and_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        bart_from_pretrained(tmp_path / "absent")
    _saved(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: architecture='BertModel' is not supported"):
        bart_from_pretrained(tmp_path, architecture="BertModel")
    with pytest.raises(TypeError, match="bart_save_pretrained: expected an npformer BartForConditionalGeneration"):
        bart_save_pretrained(object(), tmp_path / "x")


@pytest.mark.verify
def test_the_general_entry_points_dispatch_bart(one_thread, tmp_path):
    # npformer.interop.from_torch / to_torch / from_pretrained / save_pretrained reach bart.py's functions
    from npformer.interop import from_pretrained, from_torch, save_pretrained, to_torch

    def same(a, b):
        assert list(a) == list(b)
        for k in a:
            assert np.array_equal(host(a[k]), host(b[k])), k

    hf = hf_bart(CG, 7)
    ours = from_torch(hf)
    assert type(ours) is BartForConditionalGeneration
    same(ours.state_dict(), bart_from_torch(hf).state_dict())
    back = to_torch(ours)
    assert type(back).__name__ == CG
    assert_same_state(back.state_dict(), hf.state_dict())
    save_pretrained(ours, tmp_path / "ours")
    loaded = from_pretrained(tmp_path / "ours")
    assert type(loaded) is BartForConditionalGeneration
    same(loaded.state_dict(), ours.state_dict())
