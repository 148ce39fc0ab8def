"""npformer pretrain --model llama: LLaMA's blocks on the GPT loop (same batches, loss, resume and sampling)."""

import numpy as np
import pytest

from npformer.models import LlamaConfig, LlamaForCausalLM
from npformer.models.sampling import generate
from npformer.training.checkpoint import CheckpointError, load_checkpoint
from npformer.training.loading import load_gpt, load_language_model
from npformer.training.objectives import llama_intermediate_size
from npformer.training.pretrain import pretrain
from tests.test_pretrain import assert_same_checkpoint, quiet, read_metrics, tiny


def llama(tmp_path, out="run", **kw):
    return tiny(tmp_path, out, **{"model": "llama", "n_head": 4, "n_kv_head": 2, **kw})


def test_a_llama_run_learns_and_saves_a_model_that_loads_and_samples(tmp_path):
    lines = []
    summary = pretrain(llama(tmp_path, max_iters=24, samples=1, sample_tokens=30), log=lines.append)
    out = str(tmp_path / "run")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.2         # it learns
    assert summary["model"] == "llama" and any(line.startswith("model: llama ") for line in lines)
    assert sum(line.startswith("--- sample") for line in lines) == 1

    ckpt = load_checkpoint(out)
    assert ckpt.meta["model"] == "llama"
    config = LlamaConfig(**ckpt.meta["model_config"])
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.max_position_embeddings) == (16, 1, 4, 2, 48, 16)
    assert not config.attention_bias and not config.mlp_bias and not config.tie_word_embeddings
    assert set(ckpt.model_state) == set(LlamaForCausalLM(config).state_dict())   # HF's names, no wrapper prefix

    model, tok = load_language_model(out)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    ids = np.asarray(tok.encode("the ")).reshape(1, -1)
    last = model(ids).logits.data[0, -1]
    assert np.isfinite(last).all() and last.dtype == np.float32
    with pytest.raises(CheckpointError, match="holds a 'llama' model, not a GPT"):
        load_gpt(out)                                   # the GPT classifier's loader takes GPTs only


@pytest.mark.parametrize("dropout,workers", [(0.0, 1), (0.2, 2)])
def test_a_stopped_llama_run_resumes_bit_exact(tmp_path, dropout, workers):
    full = pretrain(llama(tmp_path, "a", dropout=dropout, workers=workers), log=quiet)
    pretrain(llama(tmp_path, "b", dropout=dropout, workers=workers, max_iters=6, lr_decay_iters=12), log=quiet)
    resumed = pretrain(llama(tmp_path, "b", dropout=dropout, workers=workers, resume=True), log=quiet)
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))
    assert resumed["val_loss"] == full["val_loss"]


def test_the_loss_is_the_mean_next_token_cross_entropy(tmp_path):
    from npformer.training.objectives import make_objective
    from npformer.data import CharTokenizer
    cfg = llama(tmp_path).checked()
    text = open(cfg.data, encoding="utf-8").read()
    objective = make_objective(cfg, CharTokenizer(text))
    x, y = objective.batch(objective.sampler(objective.tok.encode(text), seed=1))
    assert np.array_equal(x[:, 1:], y[:, :-1])                               # y is x shifted by one
    logits, loss = objective.model(x, y)
    z = logits.data.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, y[..., None], -1).mean()
    assert abs(loss.item() - expected) < 1e-5


@pytest.mark.parametrize("flags, message", [
    (dict(model="gpt", n_kv_head=2), "--n-kv-head is a LLaMA option"),
    (dict(n_kv_head=3), "--n-kv-head must be a positive integer dividing --n-head \\(4\\); got 3"),
    (dict(n_kv_head=0), "--n-kv-head must be a positive integer dividing"),
    (dict(n_head=8, n_embd=24), "--n-embd / --n-head must be even for llama"),
])
def test_bad_llama_flags_are_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        llama(tmp_path, **flags).checked()


def test_llama_width_matches_gpt_parameter_count():
    # three C x I matrices for GPT's two C x 4C: I = 8C/3, rounded up to a multiple of 8
    assert [llama_intermediate_size(c) for c in (16, 24, 128, 768)] == [48, 64, 344, 2048]


def test_generate_window_crops_a_llama_as_block_size_crops_a_gpt():
    config = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=6,
                         initializer_range=0.5, bos_token_id=None, eos_token_id=None)    # context matters
    model = LlamaForCausalLM(config, generator=np.random.default_rng(0), dtype=np.float64)
    prompt = np.array([[1, 2, 3]])
    cached = generate(model, prompt, 10, seed=3, window=6)
    uncached = generate(model, prompt, 10, seed=3, window=6, use_cache=False)
    assert np.array_equal(cached, uncached)
    free = generate(model, prompt, 10, seed=3)             # no window: positions go on past 6
    assert np.array_equal(free[:, :6], cached[:, :6]) and not np.array_equal(free, cached)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        generate(model, prompt, 1, window=0)


def test_generate_refuses_a_window_for_a_gpt():
    from npformer.models import GPT, GPTConfig
    gpt = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="window is a LLaMA option"):
        generate(gpt, np.array([[1]]), 1, window=3)
