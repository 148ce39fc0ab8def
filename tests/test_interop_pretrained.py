"""npformer.interop.from_pretrained / save_pretrained: HF checkpoint directories (config.json +
model.safetensors) read and written without torch. The comparisons with transformers are marked
verify and skip without torch / transformers; the error cases need only safetensors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import npformer
from npformer import models
from npformer.interop import from_pretrained, save_pretrained

stn = pytest.importorskip("safetensors.numpy")

BERT = dict(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=10, type_vocab_size=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GPT2 = dict(vocab_size=17, n_positions=12, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
TOL = {np.float64: 1e-10, np.float32: 1e-5}


def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def _ids(vocab, shape=(2, 6), seed=0):
    return np.random.default_rng(seed).integers(1, vocab, size=shape)


def _hf_model(kind, torch_dtype, **extra):
    torch, transformers = _hf()
    torch.manual_seed(0)
    if kind.startswith("Bert"):
        config = transformers.BertConfig(**BERT, attn_implementation="eager", **extra)
    else:
        config = transformers.GPT2Config(**GPT2, attn_implementation="eager", **extra)
    model = getattr(transformers, kind)(config).to(torch_dtype).eval()
    with torch.no_grad():                       # non-trivial LayerNorms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _hf_logits(model, ids):
    torch, _ = _hf()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids))
    if hasattr(out, "start_logits"):
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()])
    return out.logits.numpy()


def _np_logits(model, ids):
    out = model(ids)
    if isinstance(out, tuple) and type(out).__name__ == "tuple":       # GPT: (logits, loss)
        out = out[0]
    if hasattr(out, "start_logits"):
        return np.stack([np.asarray(out.start_logits.data), np.asarray(out.end_logits.data)])
    logits = getattr(out, "logits", out)
    return np.asarray(getattr(logits, "data", logits))


def _close(a, b, dtype):
    assert a.shape == b.shape
    scale = max(1.0, float(np.abs(b).max()))
    assert float(np.abs(a - b).max()) / scale < TOL[dtype]


# ----------------------------------------------------------------------------- HF -> npformer

HF_KINDS = [("BertForMaskedLM", {}), ("BertForSequenceClassification", {"num_labels": 3}),
            ("BertForQuestionAnswering", {}), ("BertModel", {}), ("GPT2LMHeadModel", {}),
            ("GPT2ForSequenceClassification", {"num_labels": 3, "pad_token_id": 0})]


@pytest.mark.verify
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind,extra", HF_KINDS, ids=[k for k, _ in HF_KINDS])
def test_hf_checkpoint_loads_with_same_logits(tmp_path, kind, extra, dtype):
    torch, _ = _hf()
    hf = _hf_model(kind, torch.float64 if dtype == np.float64 else torch.float32, **extra)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = from_pretrained(tmp_path)
    assert model.state_dict()[next(iter(model.state_dict()))].dtype == dtype
    vocab = BERT["vocab_size"] if kind.startswith("Bert") else GPT2["vocab_size"]
    ids = _ids(vocab)
    if kind == "BertModel":
        with torch.no_grad():
            want = hf(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
        got = np.asarray(model(ids).last_hidden_state.data)
    else:
        want, got = _hf_logits(hf, ids), _np_logits(model, ids)
    _close(got, want, dtype)


@pytest.mark.verify
@pytest.mark.parametrize("kind", ["BertForMaskedLM", "GPT2LMHeadModel", "BertForSequenceClassification"])
def test_from_pretrained_does_not_import_torch(tmp_path, kind):
    hf = _hf_model(kind, _hf()[0].float32)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from npformer.interop import from_pretrained\n"
            f"m = from_pretrained({str(tmp_path)!r})\n"
            "assert sys.modules['torch'] is None\n"
            "print(type(m).__name__)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == {"GPT2LMHeadModel": "GPT"}.get(kind, kind)


# ----------------------------------------------------------------------------- npformer -> HF

def _np_model(kind, dtype):
    gen = np.random.default_rng(1)
    if kind == "GPT":
        cfg = models.GPTConfig(vocab_size=17, block_size=12, n_layer=2, n_head=2, n_embd=8, dropout=0.0)
        return models.GPT(cfg, generator=gen, dtype=dtype)
    cfg = models.BertConfig(**BERT, num_labels=3 if kind == "BertForSequenceClassification" else 2)
    return getattr(models, kind)(cfg, generator=gen, dtype=dtype)


@pytest.mark.verify
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["BertForMaskedLM", "BertForSequenceClassification", "BertForQuestionAnswering",
                                  "GPT"])
def test_save_pretrained_loads_in_transformers(tmp_path, kind, dtype):
    torch, transformers = _hf()
    model = _np_model(kind, dtype).train(False)
    with npformer.no_grad():
        for p in model.parameters():                  # non-trivial LayerNorms and biases
            p.data[...] += np.random.default_rng(2).standard_normal(p.shape) * 0.05
    save_pretrained(model, tmp_path)
    auto = {"GPT": transformers.AutoModelForCausalLM, "BertForMaskedLM": transformers.AutoModelForMaskedLM,
            "BertForSequenceClassification": transformers.AutoModelForSequenceClassification,
            "BertForQuestionAnswering": transformers.AutoModelForQuestionAnswering}[kind]
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    hf = auto.from_pretrained(tmp_path, dtype=torch_dtype, attn_implementation="eager").eval()
    ids = _ids(17 if kind == "GPT" else BERT["vocab_size"])
    _close(_hf_logits(hf, ids), _np_logits(model, ids), dtype)
    back = from_pretrained(tmp_path)                           # and our own round trip, bit for bit
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)


# ----------------------------------------------------------------------------- errors (no torch needed)

def _saved(tmp_path, kind="BertForMaskedLM"):
    save_pretrained(_np_model(kind, np.float32), tmp_path)
    return tmp_path


def test_round_trip_without_torch(tmp_path):
    model = _np_model("BertForSequenceClassification", np.float32)
    save_pretrained(model, tmp_path)
    back = from_pretrained(tmp_path, dtype=np.float64)
    assert type(back).__name__ == "BertForSequenceClassification" and back.config.num_labels == 3
    ids = _ids(13)
    np.testing.assert_allclose(_np_logits(back, ids), _np_logits(model, ids), rtol=1e-5, atol=1e-6)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    _saved(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value,match", [("model_type", "t5", "model_type 't5'"),
                                               ("architectures", ["BertForNextSentencePrediction"], "architectures"),
                                               ("hidden_act", "swish", "hidden_act")])
def test_unsupported_config(tmp_path, field, value, match):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as info:
        from_pretrained(tmp_path)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_damaged_files(tmp_path):
    file = _saved(tmp_path) / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="model.safetensors: damaged or truncated") as info:
        from_pretrained(tmp_path)
    assert "\n" not in str(info.value)
    file.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(ValueError, match="model.safetensors: damaged or truncated"):
        from_pretrained(tmp_path)


def test_missing_and_misshapen_weights(tmp_path):
    file = _saved(tmp_path) / "model.safetensors"
    state = stn.load_file(file)
    del state["bert.encoder.layer.1.output.dense.bias"]
    stn.save_file(state, file)
    with pytest.raises(ValueError, match=r"model.safetensors: weight 'bert.encoder.layer.1.output.dense.bias' "
                                         r"missing"):
        from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 16                              # config and weights disagree
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_pretrained(_np_model("BertForMaskedLM", np.float32), tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"intermediate.dense.weight' has shape \(12, 8\), but config.json gives "
                                         r"\(16, 8\)"):
        from_pretrained(tmp_path / "ok")


def test_checkpoint_quirks(tmp_path):
    """BertForPreTraining-style keys (seq_relationship, position_ids, gamma/beta) load as BertForMaskedLM
    and, with the bert. prefix stripped, as BertModel; a GPT-2 file without transformer. or lm_head."""
    model = _np_model("BertForMaskedLM", np.float64)
    save_pretrained(model, tmp_path)
    file = tmp_path / "model.safetensors"
    state = stn.load_file(file)
    state["bert.embeddings.position_ids"] = np.arange(10)[None]
    state["cls.seq_relationship.weight"] = np.zeros((2, 8))
    state["bert.embeddings.LayerNorm.gamma"] = state.pop("bert.embeddings.LayerNorm.weight")
    state["bert.embeddings.LayerNorm.beta"] = state.pop("bert.embeddings.LayerNorm.bias")
    del state["cls.predictions.decoder.weight"]
    stn.save_file(state, file)
    ids = _ids(13)
    np.testing.assert_array_equal(_np_logits(from_pretrained(tmp_path), ids), _np_logits(model, ids))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"not used when initializing BertModel: \['cls.predictions.bias'"):
        bare = from_pretrained(tmp_path)
    assert type(bare).__name__ == "BertModel" and bare.pooler is None
    np.testing.assert_array_equal(bare(ids).last_hidden_state.data, model.bert(ids).last_hidden_state.data)

    gpt = _np_model("GPT", np.float64)
    save_pretrained(gpt, tmp_path / "g")
    file = tmp_path / "g" / "model.safetensors"
    state = {k[len("transformer."):]: v for k, v in stn.load_file(file).items()}
    state["h.0.attn.bias"] = np.ones((1, 1, 12, 12))
    state["h.1.attn.masked_bias"] = np.ones(())
    stn.save_file(state, file)
    ids = _ids(17)
    np.testing.assert_array_equal(_np_logits(from_pretrained(tmp_path / "g"), ids), _np_logits(gpt, ids))


def test_tokenizer_returned(tmp_path):
    from npformer.data import WordPieceTokenizer
    tok = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "e", "f", "g",
                              "h"])
    save_pretrained(_np_model("BertForMaskedLM", np.float32), tmp_path, tokenizer=tok)
    model, back = from_pretrained(tmp_path, with_tokenizer=True)
    assert back == tok
    save_pretrained(_np_model("GPT", np.float32), tmp_path / "g")
    assert from_pretrained(tmp_path / "g", with_tokenizer=True)[1] is None


# ----------------------------------------------------------------------------- heads: architecture, num_labels

def _warned(record, text):
    return [str(w.message) for w in record if text in str(w.message)]


def test_masked_lm_directory_as_classifier(tmp_path):
    """A new head is drawn as HF draws it, and both the new and the unused weights are reported."""
    mlm = _np_model("BertForMaskedLM", np.float64)
    save_pretrained(mlm, tmp_path)
    with pytest.warns(UserWarning) as record:
        clf = from_pretrained(tmp_path, architecture="BertForSequenceClassification", num_labels=3)
    (new,) = _warned(record, "newly initialized")
    (unused,) = _warned(record, "were not used")
    for key in ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"):
        assert repr(key) in new
    assert "'cls.predictions.transform.dense.weight'" in unused and "bert.embeddings" not in unused + new
    assert type(clf).__name__ == "BertForSequenceClassification" and clf.config.num_labels == 3 and not clf.training
    ours = clf.state_dict()
    for k, v in mlm.bert.state_dict().items():                        # the encoder: the MLM's, bit for bit
        np.testing.assert_array_equal(ours["bert." + k], v)
    w, b = np.asarray(ours["classifier.weight"]), np.asarray(ours["classifier.bias"])
    assert w.shape == (3, 8) and w.dtype == np.float64 and not b.any() and 0.005 < w.std() < 0.05
    with pytest.warns(UserWarning):
        again = models.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)     # seed 0 again
        other = from_pretrained(tmp_path, architecture="BertForSequenceClassification", num_labels=3,
                                seed=np.random.default_rng(1))
    np.testing.assert_array_equal(again.state_dict()["classifier.weight"], w)
    assert not np.array_equal(other.state_dict()["classifier.weight"], w)


def test_question_answering_head_is_fresh(tmp_path):
    save_pretrained(_np_model("BertForSequenceClassification", np.float32), tmp_path)     # 3 labels, pooler
    with pytest.warns(UserWarning) as record:
        qa = models.BertForQuestionAnswering.from_pretrained(tmp_path, num_labels=2)
    assert "'qa_outputs.weight'" in _warned(record, "newly initialized")[0]
    unused = _warned(record, "were not used")[0]
    assert "'classifier.weight'" in unused and "'bert.pooler.dense.weight'" in unused
    assert np.asarray(qa.state_dict()["qa_outputs.weight"]).shape == (2, 8)
    with pytest.raises(ValueError, match="num_labels must be 2"):
        models.BertForQuestionAnswering.from_pretrained(tmp_path)                         # the file's 3 labels


def test_num_labels_mismatch(tmp_path):
    model = _np_model("BertForSequenceClassification", np.float32)                      # 3 labels
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError) as info:
        from_pretrained(tmp_path, num_labels=2)
    msg = str(info.value)
    assert "\n" not in msg and "model.safetensors" in msg and "'classifier.weight'" in msg
    assert "(3, 8)" in msg and "(2, 8)" in msg and "ignore_mismatched_sizes=True" in msg
    with pytest.warns(UserWarning, match=r"shapes did not match: \['classifier.weight: \(3, 8\) -> \(2, 8\)'"):
        two = from_pretrained(tmp_path, num_labels=2, ignore_mismatched_sizes=True)
    assert two.config.num_labels == 2 and not np.asarray(two.state_dict()["classifier.bias"]).any()
    np.testing.assert_array_equal(two.state_dict()["bert.pooler.dense.weight"],
                                  model.state_dict()["bert.pooler.dense.weight"])
    with pytest.raises(ValueError, match="must give one positive number of labels"):
        from_pretrained(tmp_path, num_labels=2, id2label={0: "a", 1: "b", 2: "c"})
    assert from_pretrained(tmp_path, label2id={"a": 0, "b": 1, "c": 2}).config.num_labels == 3


def test_bad_architecture_and_gpt2_heads(tmp_path):
    _saved(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: architecture='GPT2Model' is not supported for model_type "
                                         r"'bert'; supported: BertModel"):
        from_pretrained(tmp_path, architecture="GPT2Model")
    gpt = _np_model("GPT", np.float64)
    save_pretrained(gpt, tmp_path / "g")
    with pytest.warns(UserWarning, match=r"newly initialized: \['head.weight'\]"):
        clf = from_pretrained(tmp_path / "g", architecture="GPT2ForSequenceClassification", num_labels=4)
    assert clf.num_classes == 4
    np.testing.assert_array_equal(clf.backbone.state_dict()["transformer.wte.weight"],
                                  gpt.state_dict()["transformer.wte.weight"])


@pytest.mark.verify
def test_new_head_matches_transformers(tmp_path):
    """HF's AutoModelForSequenceClassification on the same masked-LM directory: the encoder equal to
    ~1e-10 in float64, and the logits too once HF's freshly drawn head is replaced by ours."""
    torch, transformers = _hf()
    hf_mlm = _hf_model("BertForMaskedLM", torch.float64)
    hf_mlm.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.warns(UserWarning):
        ours = models.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, num_labels=3, dtype=torch.float64, attn_implementation="eager").eval()
    ids = _ids(BERT["vocab_size"])
    with torch.no_grad():
        want = hf.bert(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    _close(np.asarray(ours.bert(ids).last_hidden_state.data), want, np.float64)
    with torch.no_grad():                                   # the head both drew fresh: ours, in HF's model
        for key in ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"):
            hf.get_parameter(key).copy_(torch.from_numpy(np.asarray(ours.state_dict()[key])))
    _close(_np_logits(ours, ids), _hf_logits(hf, ids), np.float64)
