"""``npformer seq2seq --arch bart|t5|rnn``: BART and T5 behind Seq2SeqTransformer's interface
(models/seq2seq_arch.py) and the recurrent encoder-decoder (models/seq2seq_rnn.py): the joint
vocabulary, the logits against the inner model's, cached and uncached decoding, padding, gradients,
training, checkpoints, resume, translate, and the errors."""

import dataclasses
import os

import numpy as np
import pytest

from npformer.cli import main
from npformer.data.tasks import BOS, EOS, PAD, TaskTokenizer, get_task, make_batch
from npformer.models.decoding import beam_search
from npformer.models.seq2seq_arch import TaskEncoderDecoder, hf_config, joint_vocabulary
from npformer.models.seq2seq_rnn import RNNSeq2Seq, RNNSeq2SeqConfig
from npformer.training.checkpoint import CheckpointError, load_checkpoint
from npformer.training.seq2seq import Seq2SeqTrainConfig, evaluate, load_seq2seq, train, translate

from tests.helpers import signal_at_steps
from tests.test_seq2seq_training import TINY, TINY_FLAGS

ARCHS = ("bart", "t5")


def build(arch, task="numbers", dtype=np.float64, seed=0, dropout=0.0):
    t = get_task(task)
    max_len = max(t.max_src_len, t.max_tgt_len + 2)
    if arch == "rnn":
        config = RNNSeq2SeqConfig(len(t.src_chars) + 3, len(t.tgt_chars) + 3, 16, 2, dropout, max_len, PAD)
        return RNNSeq2Seq(config, generator=np.random.default_rng(seed), dtype=dtype), t, TaskTokenizer.for_task(t)
    vocab = 3 + len(set(t.src_chars) | set(t.tgt_chars))
    hf = hf_config(arch, vocab, 16, 2, 2, 32, dropout, max_len, PAD, BOS, EOS)
    model = TaskEncoderDecoder(arch, hf, t.src_chars, t.tgt_chars, max_len, generator=np.random.default_rng(seed),
                               dtype=dtype)
    return model, t, TaskTokenizer.for_task(t)


def batch(task, tok, n=6, seed=1):
    return make_batch(tok, task.batch(np.random.default_rng(seed), n))


def test_joint_vocabulary_puts_each_character_once_after_the_special_tokens():
    src, tgt = joint_vocabulary("abd", "bcd")                 # joint: PAD BOS EOS a b c d
    assert src.tolist() == [0, 1, 2, 3, 4, 6] and tgt.tolist() == [0, 1, 2, 4, 5, 6]
    t = get_task("numbers")                                  # digits in, letters and spaces out: disjoint
    src, tgt = joint_vocabulary(t.src_chars, t.tgt_chars)
    assert sorted(set(src[3:]) | set(tgt[3:])) == list(range(3, 3 + len(t.src_chars) + len(t.tgt_chars)))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_are_the_inner_models_on_the_joint_ids_at_the_target_columns(arch):
    model, task, tok = build(arch)
    src, tgt_in, _ = batch(task, tok)
    src_ids, tgt_ids = joint_vocabulary(task.src_chars, task.tgt_chars)
    inner = model.model(input_ids=src_ids[src], attention_mask=src != PAD, decoder_input_ids=tgt_ids[tgt_in]).logits
    got = model(src, tgt_in).data
    assert got.shape == (*tgt_in.shape, tok.tgt_vocab_size)
    np.testing.assert_array_equal(got, inner.data[..., tgt_ids])
    # a padded source position changes nothing: its key is masked
    wider = np.concatenate([src, np.full((src.shape[0], 2), PAD)], axis=1)[:, :model.config.max_len]
    np.testing.assert_allclose(model(wider, tgt_in).data, got, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS + ("rnn",))
def test_cached_decoding_equals_the_full_pass_and_beam_search_runs_on_it(arch):
    model, task, tok = build(arch)
    model.eval()
    src, tgt_in, _ = batch(task, tok)
    memory, pad = model.encode(src), model.pad_mask(src)
    full = model.decode(tgt_in, memory, pad).data
    cache = model.new_cache()
    steps = [model.decode(tgt_in[:, i:i + 1], memory, pad, cache).data for i in range(tgt_in.shape[1])]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-12)
    n = 12
    greedy = model.greedy_decode(src, BOS, n, eos_id=EOS)
    np.testing.assert_array_equal(greedy, model.greedy_decode(src, BOS, n, eos_id=EOS, use_cache=False))
    beams, _ = beam_search(model, src, BOS, EOS, beam_size=3, max_new_tokens=n)
    np.testing.assert_array_equal(beams, beam_search(model, src, BOS, EOS, beam_size=3, max_new_tokens=n,
                                                     use_cache=False)[0])
    one, _ = beam_search(model, src, BOS, EOS, beam_size=1, max_new_tokens=n)
    np.testing.assert_array_equal(one[:, :greedy.shape[1]], greedy[:, :one.shape[1]])


def test_the_recurrent_model_ignores_source_padding_and_its_gradients_match_central_differences():
    """Extra PAD columns change nothing (the encoder runs each source to its own length, attention leaves
    the padded positions out), and the gradients of the loss match central differences in every part."""
    from npformer.training.seq2seq import loss_fn
    model, task, tok = build("rnn", seed=4)
    src, tgt_in, tgt_out = batch(task, tok, n=4)
    assert (src == PAD).any()                                 # rows of several lengths
    wider = np.concatenate([src, np.full((src.shape[0], 3), PAD)], axis=1)
    np.testing.assert_allclose(model(wider, tgt_in).data, model(src, tgt_in).data, rtol=0, atol=1e-13)
    loss = loss_fn(model, src, tgt_in, tgt_out, 0.1)
    loss.backward()
    rng = np.random.default_rng(0)
    params = dict(model.named_parameters())
    for name in ("src_embed.weight", "encoder.weight_hh_l1_reverse", "init_proj.weight", "decoder.weight_ih_l0",
                 "attn_proj.weight", "combine.weight", "output_proj.bias"):
        p = params[name]
        for _ in range(2):
            i = tuple(int(rng.integers(n)) for n in p.shape)
            if name == "src_embed.weight":
                i = (int(src[0, 0]), i[1])                    # a row the batch reads
            old, h = float(p.data[i]), 1e-6
            p.data[i] = old + h
            up = loss_fn(model, src, tgt_in, tgt_out, 0.1).item()
            p.data[i] = old - h
            down = loss_fn(model, src, tgt_in, tgt_out, 0.1).item()
            p.data[i] = old
            assert abs(p.grad[i] - (up - down) / (2 * h)) < 1e-8, (name, i)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_through_the_target_columns_match_central_differences(arch):
    """The loss reads logits[..., tgt_ids]: the shared embedding's gradient must come back through that
    gather (rows of source-only characters get it from the encoder alone)."""
    from npformer.training.seq2seq import loss_fn
    model, task, tok = build(arch, seed=3)
    src, tgt_in, tgt_out = batch(task, tok, n=3)
    loss = loss_fn(model, src, tgt_in, tgt_out, 0.1)
    loss.backward()
    shared = model.model.lm_head.weight                      # tied: the encoder's and decoder's embedding too
    src_ids, tgt_ids = joint_vocabulary(task.src_chars, task.tgt_chars)
    rows = [int(tgt_ids[5]), int(src_ids[int(src[0, 0])]), 0]   # a target letter, a source digit, PAD
    rng = np.random.default_rng(0)
    for r in rows:
        c = int(rng.integers(shared.shape[1]))
        old, h = float(shared.data[r, c]), 1e-6
        shared.data[r, c] = old + h
        up = loss_fn(model, src, tgt_in, tgt_out, 0.1).item()
        shared.data[r, c] = old - h
        down = loss_fn(model, src, tgt_in, tgt_out, 0.1).item()
        shared.data[r, c] = old
        assert abs(shared.grad[r, c] - (up - down) / (2 * h)) < 1e-8, (r, c)


@pytest.fixture(scope="module", params=ARCHS + ("rnn",))
def arch_run(request, tmp_path_factory):
    cfg = Seq2SeqTrainConfig(task="copy", arch=request.param, out=str(tmp_path_factory.mktemp("arch") / "run"),
                             **TINY)
    return cfg, train(cfg, log=lambda *a: None)


def test_a_run_checkpoints_reloads_and_translates(arch_run):
    cfg, summary = arch_run
    model, tok, meta = load_seq2seq(cfg.out)
    assert isinstance(model, RNNSeq2Seq if cfg.arch == "rnn" else TaskEncoderDecoder) and not model.training
    assert meta["arch"] == cfg.arch and meta["model_config"]["max_len"] == model.config.max_len
    assert meta["train_config"] == dataclasses.asdict(cfg.checked())
    task = get_task("copy")
    assert evaluate(model, tok, task.test_set(cfg.n_test, seed=cfg.seed + 3)) == summary["greedy"]
    out = translate(model, tok, meta, "abcab")
    assert set(out) <= set(task.tgt_chars)
    if cfg.arch != "rnn":
        assert model.arch == cfg.arch and all(k.startswith("model.") for k in load_checkpoint(cfg.out).model_state)


def test_the_arch_is_part_of_the_run_and_resume_keeps_it(arch_run, tmp_path, capsys):
    cfg, _ = arch_run
    other = "t5" if cfg.arch != "t5" else "bart"
    with pytest.raises(CheckpointError, match=f"arch \\(checkpoint '{cfg.arch}', now '{other}'\\)"):
        train(dataclasses.replace(cfg, arch=other, resume=True, max_iters=44), log=lambda *a: None)
    import shutil
    shutil.copytree(cfg.out, tmp_path / "copy")
    assert main(["seq2seq", "--out", str(tmp_path / "copy"), "--resume", "--max-iters", "42"]) == 0
    assert load_checkpoint(str(tmp_path / "copy")).meta["arch"] == cfg.arch


@pytest.mark.parametrize("arch", ("t5", "rnn"))
def test_sigint_and_resume_equal_the_uninterrupted_run(arch, tmp_path, monkeypatch):
    from npformer.training.stopping import Interrupted
    kw = {**TINY, "dropout": 0.1, "max_iters": 12, "eval_interval": 6, "arch": arch}
    train(Seq2SeqTrainConfig(task="copy", out=str(tmp_path / "a"), **kw), log=lambda *a: None)
    signal_at_steps(monkeypatch, {5})
    with pytest.raises(Interrupted):
        train(Seq2SeqTrainConfig(task="copy", out=str(tmp_path / "b"), **kw), log=lambda *a: None)
    monkeypatch.undo()
    train(Seq2SeqTrainConfig(task="copy", out=str(tmp_path / "b"), resume=True, **kw), log=lambda *a: None)
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    for k in a.model_state:
        np.testing.assert_array_equal(a.model_state[k], b.model_state[k], err_msg=k)


def test_the_command_line_trains_each_arch_and_refuses_what_it_cannot_do(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["seq2seq", "--task", "dates", "--arch", "bart", *TINY_FLAGS, "--max-iters", "3", "--out", out]) == 0
    assert "task dates: bart " in capsys.readouterr().out
    assert main(["translate", "--ckpt", out, "2026-12-04", "--beam-size", "2"]) == 0
    assert capsys.readouterr().out.strip()
    for flags, message in ((["--arch", "gru"], "--arch must be one of transformer, bart, t5, rnn; got 'gru'"),
                           (["--arch", "t5", "--attention-maps"], "--attention-maps draws the attention of --arch "
                                                                  "transformer")):
        assert main(["seq2seq", *TINY_FLAGS, *flags, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "x")


def test_a_checkpoint_whose_config_does_not_fit_its_tokenizer_is_refused(arch_run, tmp_path):
    import json
    import shutil
    from npformer.training.checkpoint import meta_digest
    cfg, _ = arch_run
    shutil.copytree(cfg.out, tmp_path / "bad")
    ckpt = load_checkpoint(str(tmp_path / "bad"))
    meta_path = os.path.join(ckpt.path, "meta.json")
    meta = json.load(open(meta_path, encoding="utf-8"))
    meta["model_config"]["vocab_size" if cfg.arch != "rnn" else "src_vocab_size"] += 1
    meta["meta_sha256"] = meta_digest(meta)                 # a consistent checkpoint, with a wrong config
    json.dump(meta, open(meta_path, "w", encoding="utf-8"))
    message = "do not match its tokenizer's" if cfg.arch == "rnn" else f"the {cfg.arch} model cannot be built.*vocab_size"
    with pytest.raises(CheckpointError, match=message):
        load_seq2seq(str(tmp_path / "bad"))
