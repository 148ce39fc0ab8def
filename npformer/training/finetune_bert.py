"""Fine-tuning BERT: ``npformer finetune`` when --ckpt is a BERT (an npformer run or an HF directory).

    model = BertForSequenceClassification  (--task sentiment: tanh pooler on [CLS], dropout, Linear)
          | BertForQuestionAnswering       (--task qa: start and end logits per token)
    encoder weights from --ckpt; the head (and the pooler, which masked-LM pretraining does not train)
    drawn fresh from --seed and named in the log; --from-scratch draws every weight fresh
    Trainer(model, TrainingArguments(out, ...), train, val).train()   evaluates each epoch, keeps the best
    then the val and test scores, and the best model saved as an HF directory in out/model

The budget is the GPT path's: --max-iters steps of --batch-size examples (num_train_epochs =
max_iters * batch_size / training examples, so the last epoch may be a fraction), the learning rate
warmed up over --warmup-iters steps, then (HF's default schedule) decayed linearly to 0; --freeze
trains the pooler and the head only (a probe of the encoder's features).

Scores: --task sentiment: accuracy; --task qa: SQuAD's exact match and F1 (data/qa.py) of the best
span (data/qa_features.best_spans) against the answer, on the held-out splits. The best epoch is
chosen on the validation split (accuracy, or exact match), the test split is scored once at the end.

Over ranks (``mpiexec -n N npformer finetune``; ``finetune_bert(cfg, log, comm)``) --batch-size stays the
global batch: every rank loads the same model and data and agrees on the settings (an error or a mismatch
at start-up ends every rank with one message); the Trainer then runs --batch-size / N examples of each
batch on each rank (its per_device_train_batch_size, as HF's) from rank 0's weights, and rank 0 alone
writes --out (the checkpoints, the HF directory, results.json) and scores the splits. docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from .. import __version__, backend, distributed
from ..data import WordPieceStream, qa, qa_features, sentiment
from ..data.wordpiece import WordPieceTokenizer
from ..models import bert_heads
from ..models.bert import BertConfig
from .checkpoint import CheckpointError, load_checkpoint, load_meta
from .progress import format_seconds
from .trainer import Trainer, TrainingArguments

HEADS = {"sentiment": "BertForSequenceClassification", "qa": "BertForQuestionAnswering"}
BEST = {"sentiment": "accuracy", "qa": "exact_match"}


def is_bert(path: str) -> bool:
    """True when path is an HF directory of model_type "bert" or an npformer BERT checkpoint / run."""
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                return json.load(f).get("model_type") == "bert"
        except (OSError, ValueError, AttributeError):
            return False
    try:
        return load_meta(path)[1].get("model") == "bert"
    except (CheckpointError, OSError, ValueError):
        return False


def load_bert(path: str, head: str, num_labels: int, seed: int, device: str, log):
    """(model of class `head` (float32, train mode), WordPieceTokenizer) with the encoder weights of `path`.

    path: an HF directory (interop.from_pretrained) or an npformer BERT pretraining checkpoint / run
    (its BertForMaskedLM's "bert." weights). Weights the head has and the source lacks are drawn from
    `seed` and logged; so are the source's weights the head leaves out."""
    cls = getattr(bert_heads, head)
    if os.path.isfile(os.path.join(path, "config.json")):
        from ..interop.pretrained import from_pretrained
        model, tok = from_pretrained(path, np.float32, with_tokenizer=True, device=device, architecture=head,
                                     num_labels=num_labels if head == HEADS["sentiment"] else None, seed=seed)
        if tok is None:
            raise FileNotFoundError(f"{os.path.join(path, 'vocab.txt')}: missing; fine-tuning needs the "
                                    f"checkpoint's WordPiece vocabulary")
        return model.train(), tok
    ckpt = load_checkpoint(path)
    try:
        config = BertConfig(**{**ckpt.meta["model_config"], "num_labels": num_labels})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: model_config is invalid ({exc})") from None
    if not isinstance(ckpt.tokenizer, WordPieceStream):
        raise CheckpointError(f"{ckpt.path}: a BERT checkpoint needs a WordPiece tokenizer, it holds "
                              f"{type(ckpt.tokenizer).__name__}")
    model = cls(config, generator=np.random.default_rng(seed), dtype=np.float32, device=device)
    own = model.state_dict()
    state = {k: v for k, v in ckpt.model_state.items() if k in own}
    fresh = sorted(set(own) - set(state))
    if any(not k.startswith(("bert.pooler.", "classifier.", "qa_outputs.")) for k in fresh):
        raise CheckpointError(f"{ckpt.path}: the encoder weights are incomplete (missing {fresh[0]!r})")
    model.load_state_dict({**{k: backend.to_numpy(v) for k, v in own.items()}, **state})
    unused = sorted(set(ckpt.model_state) - set(state))
    log(f"loaded {len(state)} weights from {ckpt.path}; new (drawn with seed {seed}): {_groups(fresh)}; "
        f"not used: {_groups(unused)}")
    return model.train(), ckpt.tokenizer.wordpiece


def _reinit_top_layers(model, n: int, seed: int, device: str, log) -> None:
    """Replace the top n encoder layers of model with freshly initialised ones (drawn from seed).

    Re-initialising the layers nearest the output before fine-tuning keeps the lower layers' pretrained
    features and drops what the top layers learned for the pretraining objective alone."""
    total = model.config.num_hidden_layers
    if n > total:
        raise ValueError(f"--reinit-layers {n}: the encoder has only {total} layers")
    fresh = type(model)(model.config, generator=np.random.default_rng(seed), dtype=np.float32, device=device)
    prefixes = tuple(f"bert.encoder.layer.{i}." for i in range(total - n, total))
    state = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    state.update({k: backend.to_numpy(v) for k, v in fresh.state_dict().items() if k.startswith(prefixes)})
    model.load_state_dict(state)
    log(f"re-initialised encoder layers {total - n} to {total - 1} of {total} (drawn with seed {seed})")


def _groups(names) -> str:
    """'bert.pooler.*, classifier.*' for a list of weight names (at most two parts of the module path)."""
    return ", ".join(sorted({".".join(n.split(".")[:-1][:2]) + ".*" for n in names})) or "none"


def _sentiment_data(tok: WordPieceTokenizer, max_length: int) -> dict:
    """{"train", "val", "test"} -> list of example dicts (input_ids, token_type_ids, attention_mask, labels)."""
    out = {}
    for split, (texts, labels) in sentiment.sentiment_splits().items():
        rows = []
        for text, label in zip(texts, labels):
            row = tok.encode(text, max_length=max_length, truncation=True)
            rows.append({**row, "labels": int(label)})
        out[split] = rows
    return out


def _accuracy(pred) -> dict:
    return {"accuracy": float(np.mean(np.argmax(pred.predictions, -1) == pred.label_ids))}


def _qa_scorer(features: dict, examples: list):
    """compute_metrics for one QA split: the best spans' SQuAD exact match and F1 (percent)."""
    def score(pred) -> dict:
        start, end = pred.predictions
        spans = qa_features.best_spans(start, end, features)
        answers = [ex["context"][a:b] for ex, (a, b) in zip(examples, spans)]
        return qa.squad_metrics(answers, [ex["answer_text"] for ex in examples])
    return score


def finetune_bert(cfg, log=print, comm=None) -> dict:
    """Fine-tune the BERT of cfg.ckpt on cfg.task (a checked FinetuneConfig); return a summary dict.

    comm: a communicator to train over its ranks (every rank calls this; the module docstring), or None:
    this process alone. Ranks other than 0 return {"init", "freeze", "steps", "out"} only."""
    t_start = time.perf_counter()
    size = 1 if comm is None else comm.size
    if comm is None:
        model, tok, data, scorers = _setup(cfg, log)
    else:
        with distributed.together(comm):
            distributed.share(cfg.batch_size, comm.rank, size)           # --batch-size is the global batch
            model, tok, data, scorers = _setup(cfg, log)
        distributed.check_same(comm, {"npformer": __version__, "config": dataclasses.asdict(cfg)})
    root = comm is None or comm.rank == 0
    n_train, n_test = (len(rows) if isinstance(rows, list) else len(rows["input_ids"])
                       for rows in (data["train"], data["test"]))
    trainable = sum(int(p.size) for p in model.parameters() if p.requires_grad)
    init = "scratch" if cfg.from_scratch else "pretrained"
    reinit = f" (top {cfg.reinit_layers} layers re-initialised)" if cfg.reinit_layers else ""
    ranks = (f"; {size} ranks ({comm.name}), {cfg.batch_size // size} examples each of the global batch of "
             f"{cfg.batch_size}" if size > 1 else "")
    log(f"{cfg.task}: BERT {init}{reinit} {'frozen encoder (probe)' if cfg.freeze else 'full fine-tuning'}, {trainable:,} "
        f"trainable parameters, {n_train:,} train examples, device {cfg.device}{ranks}")
    args = TrainingArguments(cfg.out, num_train_epochs=cfg.max_iters * cfg.batch_size / n_train,
                             per_device_train_batch_size=cfg.batch_size // size,
                             per_device_eval_batch_size=cfg.eval_batch_size, eval_strategy="epoch",
                             learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_iters,
                             max_grad_norm=cfg.grad_clip, seed=cfg.seed, metric_for_best_model=BEST[cfg.task])
    trainer = Trainer(model, args, train_dataset=data["train"], eval_dataset=data["val"], processing_class=tok,
                      compute_metrics=scorers["val"], log=log, comm=comm)
    result = trainer.train()
    if not root:                            # rank 0 scores the splits and writes
        return {"init": init, "freeze": cfg.freeze, "steps": result.global_step, "out": cfg.out}
    val = trainer.evaluate()
    trainer.compute_metrics = scorers["test"]
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    from ..interop.pretrained import save_pretrained
    model_dir = os.path.join(cfg.out, "model")
    save_pretrained(model.eval(), model_dir, tokenizer=tok)
    key = BEST[cfg.task]
    summary = {"init": init, "freeze": cfg.freeze, "reinit_layers": cfg.reinit_layers,
               "steps": result.global_step, "train_loss": result.training_loss,
               f"val_{key}": val[f"eval_{key}"], f"test_{key}": test[f"test_{key}"], "n_test": n_test,
               "trainable": trainable,
               "best_checkpoint": trainer.state.best_model_checkpoint, "model_dir": model_dir, "out": cfg.out}
    if cfg.task == "qa":
        summary.update(val_f1=val["eval_f1"], test_f1=test["test_f1"])
    summary["seconds"] = time.perf_counter() - t_start
    with open(os.path.join(cfg.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    scores = (f"test accuracy {summary['test_accuracy']:.4f}" if cfg.task == "sentiment" else
              f"test exact match {summary['test_exact_match']:.1f}%, F1 {summary['test_f1']:.1f}%")
    log(f"done in {format_seconds(summary['seconds'])}: {scores} ({summary['n_test']} examples); "
        f"the best model (HF directory) in {model_dir}")
    return summary


def _setup(cfg, log):
    """(model (float32, train mode), tokenizer, {"train", "val", "test"} -> dataset, {"val", "test"} ->
    compute_metrics) for cfg; raises ValueError for --resume, which BERT fine-tuning does not have."""
    if cfg.resume:
        raise ValueError("--resume: BERT fine-tuning runs through the Trainer, which keeps one checkpoint per "
                         "epoch but does not resume; start again with another --out")
    head = HEADS[cfg.task]
    labels = sentiment.LABELS if cfg.task == "sentiment" else None
    model, tok = load_bert(cfg.ckpt, head, len(labels or (0, 1)), cfg.seed, cfg.device, log)
    config = model.config
    if cfg.from_scratch:
        model = type(model)(config, generator=np.random.default_rng(cfg.seed), dtype=np.float32, device=cfg.device)
    if cfg.reinit_layers:
        _reinit_top_layers(model, cfg.reinit_layers, cfg.seed, cfg.device, log)
    if cfg.task == "sentiment" and cfg.dropout:
        model.dropout.p = cfg.dropout
    if cfg.freeze:                          # a probe: the encoder stays as loaded
        for name, p in model.named_parameters():
            if name.startswith(("bert.embeddings.", "bert.encoder.")):
                p.requires_grad = False
    max_length = config.max_position_embeddings
    if cfg.task == "sentiment":
        data = _sentiment_data(tok, max_length)
        scorers = {"val": _accuracy, "test": _accuracy}
    else:
        splits = qa.qa_splits(**({"n_train": cfg.train_examples} if cfg.train_examples else {}))
        feats = {k: qa_features.qa_features(tok, v, max_length) for k, v in splits.items()}
        data = {k: {name: f[name] for name in f if name != "offsets"} for k, f in feats.items()}
        scorers = {k: _qa_scorer(feats[k], splits[k]) for k in ("val", "test")}
    return model, tok, data, scorers
