"""BERT fine-tuning over ranks: the Trainer with a communicator, and ``mpiexec -n 2 npformer finetune`` on a
BERT (a 1-layer BERT 16 wide, a second or two a run).

Two ranks give the single-process run with the same global batch to float64 rounding (the loss of every
step, the final weights), an epoch's short last batch, shared unevenly, included; the same two-rank run
repeats bit for bit, dropout included; rank 0 alone writes; an indivisible --batch-size, a start-up
mismatch and a rank that raises end both ranks with one line. In process: per_device_train_batch_size is
per rank (HF's meaning), so a rank's batches are its rows of global batches of per_device x ranks.
"""

import functools
import os
import re
import sys

import numpy as np
import pytest

from npformer import distributed
from npformer.data import WordPieceTokenizer
from npformer.models import BertConfig, BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification
from npformer.training.checkpoint import load_checkpoint
from npformer.training.trainer import Trainer, TrainingArguments
from tests.test_distributed_mpi import launch, skip_reason
from tests.test_trainer import TINY, VOCAB, _dataset

pytest.importorskip("safetensors.numpy")           # the fine-tuned model is saved as an HF directory
mpi = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

PER_DEVICE, EPOCHS = 4, 2                           # 2 ranks: global batches of 8; 21 examples: 8, 8, 5 (2 + 3)


# ------------------------------------------------------------------ the Trainer, on each rank or in one process
class _Recording(Trainer):
    """A Trainer that keeps the loss of every optimizer step (the global batch's, the same on every rank)."""

    def _step(self, batch, opt, lr):
        self.losses = getattr(self, "losses", []) + [super()._step(batch, opt, lr)]
        return self.losses[-1]


def _train(task, comm, per_device, out, dropout=0.0):
    """(losses per step, final weights) of a float64 Trainer run of `task` ("sentiment" or "qa")."""
    tok = WordPieceTokenizer(VOCAB)
    config = BertConfig(**TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if task == "sentiment":
        model, data = BertForSequenceClassification(config, generator=np.random.default_rng(3), dtype=np.float64), \
            _dataset(tok, 21, 0)
    else:                                           # 13 questions: batches of 8 and 5; answers at tokens 1-3
        rows = [{k: v for k, v in r.items() if k != "label"} for r in _dataset(tok, 13, 1)]
        data = [{**r, "start_positions": 1 + i % 2, "end_positions": 2 + i % 2} for i, r in enumerate(rows)]
        model = BertForQuestionAnswering(config, generator=np.random.default_rng(3), dtype=np.float64)
    args = TrainingArguments(out, num_train_epochs=EPOCHS, per_device_train_batch_size=per_device, seed=5,
                             learning_rate=1e-2, save_strategy="no", load_best_model_at_end=False, disable_tqdm=True)
    trainer = _Recording(model, args, train_dataset=data, log=lambda line: None, comm=comm)
    trainer.train()
    return trainer.losses, {k: np.asarray(v) for k, v in model.state_dict().items()}


def rank_main(out):
    """Each rank of `mpiexec -n 2`: both tasks over the ranks; its losses and weights to out/rank<r>-<task>.npz."""
    comm = distributed.communicator("mpi")
    for task in ("sentiment", "qa"):
        losses, weights = _train(task, comm, PER_DEVICE, os.path.join(out, task))
        np.savez(os.path.join(out, f"rank{comm.rank}-{task}.npz"), losses=losses, **weights)


@mpi
def test_two_ranks_give_the_single_process_run_to_rounding(tmp_path):
    r = launch([sys.executable, "-c", f"import tests.test_distributed_finetune_bert as t; t.rank_main({str(tmp_path)!r})"],
               2, timeout=60)
    assert r.returncode == 0, r.stderr
    for task in ("sentiment", "qa"):
        ranks = [np.load(tmp_path / f"rank{k}-{task}.npz") for k in (0, 1)]
        assert all(np.array_equal(ranks[0][k], ranks[1][k]) for k in ranks[0].files)     # the ranks agree, bit for bit
        losses, weights = _train(task, None, 2 * PER_DEVICE, str(tmp_path / f"one-{task}"))
        assert len(losses) == EPOCHS * (3 if task == "sentiment" else 2)
        np.testing.assert_allclose(ranks[0]["losses"], losses, rtol=1e-12, err_msg=task)
        for k, v in weights.items():
            np.testing.assert_allclose(ranks[0][k], v, rtol=1e-10, atol=1e-10, err_msg=f"{task}: {k}")
        assert not np.allclose(weights["bert.embeddings.word_embeddings.weight"],
                               _train(task, None, PER_DEVICE, str(tmp_path / "x"))[1]
                               ["bert.embeddings.word_embeddings.weight"])   # the global batch matters here


# ------------------------------------------------------------------ in one process
class _RankOneOfTwo(distributed.SingleProcess):
    """Rank 1 of 2 as the Trainer sees it, in one process: every collective leaves its input as it is."""

    rank, size = 1, 2

    def gather_json(self, obj, root=0):
        return None

    def broadcast_json(self, obj, root=0):
        return obj


def test_per_device_batch_is_per_rank_and_the_global_batch_is_per_device_times_ranks(tmp_path):
    tok = WordPieceTokenizer(VOCAB)
    data = _dataset(tok, 21, 0)
    # one rank (SingleProcess): the plain loop, bit for bit
    runs = [_train("sentiment", comm, PER_DEVICE, str(tmp_path / name), dropout=0.1)
            for name, comm in (("none", None), ("single", distributed.SingleProcess()))]
    assert len(runs[0][0]) == EPOCHS * 6 and runs[0][0] == runs[1][0]               # ceil(21 / 4) steps an epoch
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    # rank 1 of 2: batches of per_device rows, the second half of each global batch of 8 (5: rows 2-4), padded
    # as the whole global batch; ceil(21 / 8) steps an epoch; it writes nothing
    model = BertForSequenceClassification(BertConfig(**TINY), generator=np.random.default_rng(3))
    seen, forward = [], model.forward

    @functools.wraps(forward)
    def spy(**batch):
        seen.append(batch["input_ids"].copy())
        return forward(**batch)

    model.forward = spy
    out = str(tmp_path / "rank1")
    args = TrainingArguments(out, num_train_epochs=1, per_device_train_batch_size=PER_DEVICE, seed=5,
                             eval_strategy="epoch", disable_tqdm=True)
    trainer = Trainer(model, args, train_dataset=data, eval_dataset=data, comm=_RankOneOfTwo(),
                      log=lambda line: pytest.fail(f"rank 1 logged {line!r}"))
    result = trainer.train()
    assert result.global_step == trainer.state.max_steps == 3 and not os.path.exists(out)
    order = np.random.default_rng(5).permutation(len(data))
    for step, (a, b) in enumerate([(4, 8), (12, 16), (18, 21)]):
        batch = trainer.data_collator([data[i] for i in order[step * 8:step * 8 + 8]])["input_ids"]
        np.testing.assert_array_equal(seen[step], batch[a - step * 8:b - step * 8])


# ------------------------------------------------------------------ the command
NPFORMER = [sys.executable, "-c", "import sys; sys.modules['matplotlib'] = None; import npformer.cli; "
                                  "sys.exit(npformer.cli.main())"]
# rank 1's model raises at its second training step
FAILING = [sys.executable, "-c", "\n".join([
    "import functools, os, sys",
    "sys.modules['matplotlib'] = None",
    "import npformer.cli",
    "from npformer.models import bert_heads",
    "cls, calls = bert_heads.BertForSequenceClassification, []",
    "forward = cls.forward",
    "@functools.wraps(forward)",
    "def failing(self, *args, **kwargs):",
    "    calls.append(self.training)",
    "    if os.environ.get('PMI_RANK') == '1' and sum(calls) == 2:",
    "        raise ValueError('injected failure')",
    "    return forward(self, *args, **kwargs)",
    "cls.forward = failing",
    "sys.exit(npformer.cli.main())"])]


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    """An HF directory: a tiny masked-LM BERT (dropout 0.1) with a WordPiece vocabulary of the sentiment task."""
    from npformer.data import sentiment
    words = set()
    for texts, _ in sentiment.sentiment_splits().values():
        words |= {w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    d = tmp_path_factory.mktemp("bert") / "hf"
    config = BertConfig(**{**TINY, "vocab_size": len(vocab)})
    BertForMaskedLM(config, generator=np.random.default_rng(0)).save_pretrained(d, tokenizer=WordPieceTokenizer(vocab))
    return str(d)


def _finetune(hf, out, *flags):
    return ["finetune", "--ckpt", hf, "--task", "sentiment", "--out", out, "--max-iters", "3", "--batch-size", "8",
            "--lr", "3e-3", *flags]


@mpi
def test_two_rank_runs_repeat_bit_for_bit_and_rank_0_alone_writes(tmp_path, hf_bert):
    """Each rank starts in a directory of its own and writes --out relative to it: only rank 0's exists."""
    runs = []
    for run in ("a", "b"):
        dirs = [tmp_path / run / f"rank{k}" for k in (0, 1)]
        for d in dirs:
            d.mkdir(parents=True)
        cmd = NPFORMER + _finetune(hf_bert, "ft", "--dropout", "0.3")
        r = launch(["-wdir", str(dirs[0])] + cmd + [":", "-n", "1", "-wdir", str(dirs[1])] + cmd, 1, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("test accuracy:") == 1 and r.stdout.count("done in") == 1      # rank 0 alone reports
        assert "2 ranks (mpi), 4 examples each of the global batch of 8" in r.stdout
        assert sorted(os.listdir(dirs[0] / "ft")) == ["ckpt-000003", "latest.json", "model", "results.json"]
        assert not (dirs[1] / "ft").exists()
        runs.append(load_checkpoint(str(dirs[0] / "ft")))
    a, b = runs
    assert a.meta["trainer_state"]["log_history"] == b.meta["trainer_state"]["log_history"]
    assert all(np.array_equal(a.model_state[k], b.model_state[k]) for k in a.model_state)


@mpi
@pytest.mark.parametrize("rank1, message", [
    ([], "npformer: error: --batch-size (7) must be divisible by the rank count (2): it is the global batch, split "
         "evenly across the ranks"),
    (["--lr", "1e-3"], "npformer: error: the ranks disagree at start-up: rank 1 differs from rank 0 in config.lr "
                       "(rank 0: 0.003, rank 1: 0.001)"),
])
def test_an_indivisible_batch_or_a_mismatch_ends_both_ranks_in_one_line(tmp_path, hf_bert, rank1, message):
    out = str(tmp_path / "ft")
    cmd = NPFORMER + _finetune(hf_bert, out) + (["--batch-size", "7"] if not rank1 else [])
    r = launch(cmd + [":", "-n", "1"] + cmd + rank1, 1, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("npformer: error:") == 1 and message in r.stderr, r.stderr
    assert not os.path.exists(out)


@mpi
def test_a_rank_that_raises_stops_both_with_one_message(tmp_path, hf_bert):
    out = str(tmp_path / "ft")
    r = launch(FAILING + _finetune(hf_bert, out), 2, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("npformer: error: rank 1: injected failure") == 1, r.stderr
    assert "rank 0" not in r.stderr.replace("rank 0 in comm", "")
    assert r.stderr.count("npformer: error:") == 1, r.stderr          # the aborting rank leaves at once
    assert not os.path.exists(os.path.join(out, "latest.json"))
