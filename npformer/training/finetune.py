"""Fine-tuning a pretrained GPT as a sequence classifier: the loop behind ``npformer finetune``.

    backbone = load_gpt(ckpt)                      pretrained weights (or, with from_scratch, the
                                                   same GPTConfig with fresh random weights)
    model = SequenceClassifier(backbone, 2)        logits = head(h[last non-pad token])
    AdamW, warmup + cosine, max_iters steps of batch_size examples; then val/test accuracy

Three ways to train, with the same data, steps, batches (same seed), learning-rate schedule and
classifier head initialisation, so that their accuracies compare the initial weights only:

    full fine-tuning   every weight trains, starting from the pretrained ones
    freeze             a linear probe: the backbone is frozen, only the head (C*2 + 2 weights) trains
    from_scratch       the pretrained checkpoint's architecture with random weights, all training

Batches are padded on the right to their longest example (a GPT is causal, so the padding never
changes the hidden state at the last real token, which is what the head reads).

The result is a checkpoint in ``out`` (checkpoint.py's format) with meta["model"] =
"sequence_classifier", the backbone's model_config, the head's settings, the task's label names,
the settings of the run and its accuracies; ``load_classifier`` rebuilds the model from it.
A run never writes into an ``out`` that already holds a checkpoint.

A BERT checkpoint (an npformer ``pretrain --model bert`` run or an HF directory) is fine-tuned by
finetune_bert.py instead, through the Trainer; it also takes ``task="qa"``.

With a communicator (``finetune(cfg, comm=...)``; ``mpiexec -n N npformer finetune``) a GPT checkpoint:
every rank runs the loop on its batch_size / N rows of each batch (the same shuffle on every rank),
the gradients are averaged over the ranks (the mean of equal shares: the full batch's mean), and
rank 0 alone locks ``out``, logs, evaluates and writes (docs/distributed.md). Each rank's dropout
draws from a seed that all ranks draw, each step, from the run's one dropout generator. A BERT
checkpoint goes to finetune_bert.py over the same ranks (its Trainer takes the communicator).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from .. import __version__, backend, distributed, random
from ..autograd import no_grad
from ..data import sentiment
from ..models.classifier import SequenceClassifier
from ..models.gpt import GPT, GPTConfig
from ..optim import AdamW, clip_grad_norm, set_lr, warmup_cosine, weight_decay_groups
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .rundir import RunDir, resume_check
from .stopping import GracefulStop
from .finetune_bert import HEADS as BERT_TASKS, finetune_bert, is_bert
from .loading import load_gpt
from .progress import ProgressBar, format_seconds

MODEL_KIND = "sequence_classifier"

# task name -> (function returning {"train", "val", "test"} -> (texts, labels), label names)
TASKS = {"sentiment": (sentiment.sentiment_splits, sentiment.LABELS)}


# settings a resumed run must share with its checkpoint (the others, e.g. --max-iters, may change)
RESUME_FIELDS = ("ckpt", "task", "freeze", "from_scratch", "batch_size", "seed", "dropout")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of a fine-tuning run (the CLI flags, by the same names)."""
    ckpt: str = "out-pretrain"
    task: str = "sentiment"
    freeze: bool = False                # linear probe: only the classifier head trains
    from_scratch: bool = False          # the checkpoint's architecture, randomly initialised
    reinit_layers: int = 0              # BERT: draw the top N encoder layers fresh, keep the rest pretrained
    max_iters: int = 150
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = None                # None: lr / 10
    warmup_iters: int = None            # None: max_iters // 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dropout: float = 0.0                # on the pooled vector, before the head
    seed: int = 0
    device: str = None                  # None: NPFORMER_DEVICE, else cpu
    eval_batch_size: int = 250
    train_examples: int = None          # --task qa: training questions (None: 4,000); val and test stay the same
    out: str = "out-finetune"
    resume: bool = False                # continue the run in out from its newest intact checkpoint
    keep: int = 2                       # checkpoints kept (the newest); 0: all

    def checked(self) -> "FinetuneConfig":
        """Validate every field; return a copy with defaults filled in. Raises ValueError naming the flag."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        def positive_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1

        need(self.task in TASKS or self.task in BERT_TASKS,
             f"--task must be one of {sorted(set(TASKS) | set(BERT_TASKS))}; got {self.task!r}")
        for name in ("max_iters", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            need(positive_int(v), f"--{name.replace('_', '-')} must be a positive integer; got {v!r}")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             f"--lr must be a positive number; got {self.lr}")
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        need(0 <= min_lr <= self.lr, f"--min-lr must be in [0, --lr={self.lr}]; got {min_lr}")
        warmup = self.max_iters // 10 if self.warmup_iters is None else self.warmup_iters
        need(isinstance(warmup, int) and 0 <= warmup < self.max_iters,
             f"--warmup-iters must be in [0, --max-iters={self.max_iters}); got {warmup}")
        need(self.train_examples is None or (positive_int(self.train_examples) and self.task == "qa"),
             f"--train-examples is a positive integer for --task qa; got {self.train_examples!r} for --task {self.task}")
        need(isinstance(self.reinit_layers, int) and not isinstance(self.reinit_layers, bool)
             and self.reinit_layers >= 0, f"--reinit-layers must be an integer >= 0; got {self.reinit_layers!r}")
        need(not (self.reinit_layers and (self.from_scratch or self.freeze)),
             "--reinit-layers keeps the lower layers pretrained and trains all of them; it does not go with "
             "--from-scratch or --freeze")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0; got {self.weight_decay}")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables); got {self.grad_clip}")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}")
        need(isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool) and self.seed >= 0,
             f"--seed must be an integer >= 0; got {self.seed!r}")
        need(isinstance(self.keep, int) and not isinstance(self.keep, bool) and self.keep >= 0,
             f"--keep must be >= 0 (0 keeps all); got {self.keep!r}")
        device = self.device or backend.default_device()
        backend.check_device(device)
        return dataclasses.replace(self, min_lr=min_lr, warmup_iters=warmup, device=device,
                                   ckpt=os.path.abspath(self.ckpt))      # resumable from any directory


# ----------------------------------------------------------------------------- data

def encode_split(tok, texts, block_size: int, where: str):
    """(ids (N, L) int64 right-padded with 0, lengths (N,)) for texts; L = the longest example.

    Raises ValueError naming the characters the tokenizer lacks, or the example that does not
    fit block_size tokens."""
    try:
        tok.encode("".join(sorted(set("".join(texts)))))      # every character once: all unknown ones named
        encoded = [tok.encode(t) for t in texts]
    except ValueError as exc:
        raise ValueError(f"the tokenizer of {where} cannot encode the task's text: {exc}") from None
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    longest = int(lengths.argmax())
    if lengths[longest] > block_size:
        raise ValueError(f"the model in {where} reads at most {block_size} tokens (block_size) but the task's "
                         f"example {texts[longest]!r} is {lengths[longest]} tokens long")
    ids = np.zeros((len(texts), int(lengths.max())), dtype=np.int64)
    for i, e in enumerate(encoded):
        ids[i, :len(e)] = e
    return ids, lengths


def make_batch(ids, lengths, rows, device: str):
    """(idx (B, T), pad_mask (B, T) bool, True = padding) for the given rows, T = their longest."""
    T = int(lengths[rows].max())
    idx = ids[rows, :T]                                                       # (B, T)
    pad = np.arange(T)[None, :] >= lengths[rows][:, None]                     # (B, T)
    return backend.to_device(idx, device), backend.to_device(pad, device)


def accuracy(model: SequenceClassifier, ids, lengths, labels, device: str, batch_size: int = 250) -> float:
    """Fraction of examples whose argmax logit is the label (model in eval mode, no graph)."""
    was_training = model.training
    model.eval()
    correct = 0
    with no_grad():
        for start in range(0, len(labels), batch_size):
            rows = np.arange(start, min(start + batch_size, len(labels)))
            idx, pad = make_batch(ids, lengths, rows, device)
            logits, _ = model(idx, pad_mask=pad)                               # (B, num_classes)
            pred = backend.to_numpy(logits.data.argmax(axis=-1))
            correct += int((pred == labels[rows]).sum())
    model.train(was_training)
    return correct / len(labels)


# ----------------------------------------------------------------------------- checkpoints

def _step(model, ids, lengths, labels, rows, cfg) -> float:
    """Forward and backward of the examples `rows`; their mean loss."""
    idx, pad = make_batch(ids, lengths, rows, cfg.device)
    _, loss = model(idx, backend.to_device(labels[rows], cfg.device), pad_mask=pad)
    loss.backward()
    return loss.item()


def _rank_step(model, ids, lengths, labels, rows, cfg, comm) -> float:
    """_step on this rank's share of `rows`, the gradients averaged over the ranks; the batch's mean loss.

    Every rank draws comm.size dropout seeds from the run's generator (so all stay in step) and
    uses its own."""
    seeds = random.default_generator(cfg.device).integers(0, 2**63 - 1, size=comm.size)
    with random.thread_default_generator(random.Generator(int(seeds[comm.rank]), cfg.device), cfg.device):
        value = _step(model, ids, lengths, labels, rows[distributed.share(len(rows), comm.rank, comm.size)], cfg)
    distributed.allreduce_gradients(model, comm, "mean")
    return float(comm.allreduce(np.array([value / comm.size]), "sum")[0])


def load_classifier(path: str, device: str = None):
    """(SequenceClassifier in eval mode, tokenizer, meta) from a fine-tuning checkpoint."""
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    if meta.get("model") != MODEL_KIND:
        raise CheckpointError(f"{ckpt.path} holds a {meta.get('model')!r} model, not a {MODEL_KIND}")
    try:
        config = GPTConfig(**meta["model_config"])
        head = meta["classifier"]
        backbone = GPT(config, device=device or backend.default_device(), dtype=np.float32)
        model = SequenceClassifier(backbone, int(head["num_classes"]), pooling=head["pooling"],
                                   dropout=float(head["dropout"]))
        model.load_state_dict(ckpt.model_state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: the classifier cannot be rebuilt ({type(exc).__name__}: {exc})") from None
    return model.eval(), ckpt.tokenizer, meta


# ----------------------------------------------------------------------------- the loop

def finetune(cfg: FinetuneConfig, log=print, comm=None) -> dict:
    """Fine-tune (or probe, or train from scratch) on cfg.task; save to cfg.out; return a summary.

    Summary: init ("pretrained" or "scratch"), freeze, steps, train_loss (mean of the last 20
    steps), val_accuracy, test_accuracy, n_test, trainable (parameter count), seconds, out.
    A run stopped by SIGINT/SIGTERM saves its last step (stopping.py); cfg.resume continues it.
    comm: a communicator to train over its ranks (the module docstring), or None: this process alone.
    """
    t_start = time.perf_counter()
    if comm is not None:
        return _finetune_ranks(cfg, log, comm, t_start)
    cfg = cfg.checked()
    if is_bert(cfg.ckpt):
        return finetune_bert(cfg, log)
    if cfg.reinit_layers:
        raise ValueError(f"--reinit-layers re-draws BERT encoder layers; {cfg.ckpt} is not a BERT checkpoint")
    if cfg.task not in TASKS:
        raise ValueError(f"--task {cfg.task} needs a BERT checkpoint (an npformer `pretrain --model bert` run or an HF "
                         f"directory); {cfg.ckpt} is not one")
    with RunDir.claim(cfg.out, "finetune", resume=cfg.resume):
        return _finetune(cfg, log, t_start)


def _finetune_ranks(cfg: FinetuneConfig, log, comm, t_start) -> dict:
    """finetune over the ranks of `comm`: checks agreed by every rank, then rank 0 claims ``out``."""
    if comm.rank != 0:
        log = distributed.quiet
    with distributed.together(comm):
        cfg = cfg.checked()
        bert = is_bert(cfg.ckpt)            # finetune_bert.py trains it over the ranks (below)
        if (cfg.reinit_layers or cfg.task not in TASKS) and not bert:
            raise ValueError(f"--task {cfg.task} and --reinit-layers need a BERT checkpoint; {cfg.ckpt} is not one")
        distributed.share(cfg.batch_size, comm.rank, comm.size)
    if bert:
        return finetune_bert(cfg, log, comm)
    with distributed.claim_on_rank_0(comm, cfg.out, "finetune", cfg.resume):
        return _finetune(cfg, log, t_start, comm)


def _finetune(cfg: FinetuneConfig, log, t_start, comm=None) -> dict:
    root = comm is None or comm.rank == 0
    with distributed.stage(comm):
        pretrained, tok = load_gpt(cfg.ckpt, device=cfg.device)
    ckpt = distributed.resume_point(cfg.out, comm, resume_check(cfg, "finetune_config", RESUME_FIELDS, log)) \
        if cfg.resume else None
    config = pretrained.config
    make_splits, label_names = TASKS[cfg.task]
    with distributed.stage(comm):
        splits = make_splits()
        data = {name: (*encode_split(tok, texts, config.block_size, cfg.ckpt), labels)
                for name, (texts, labels) in splits.items()}

    if cfg.from_scratch:     # same architecture, fresh weights: only the initialisation differs
        backbone = GPT(config, generator=np.random.default_rng(cfg.seed), device=cfg.device)
    else:
        backbone = pretrained
    model = SequenceClassifier(backbone, len(label_names), dropout=cfg.dropout,
                               generator=np.random.default_rng(cfg.seed))
    model.train()
    if cfg.freeze:
        model.freeze_backbone()
        backbone.eval()                 # fixed features: no dropout inside the backbone
    trainable = sum(p.size for p in model.trainable_parameters())
    opt = AdamW(weight_decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99))
    order_rng = np.random.default_rng(cfg.seed + 1)
    dropout_rng = backend.default_rng(cfg.seed + 2, cfg.device)
    init = "scratch" if cfg.from_scratch else "pretrained"
    ids, lengths, labels = data["train"]
    perm, pos, start, recent = order_rng.permutation(len(labels)), 0, 0, []
    if ckpt:
        model.load_state_dict(ckpt.model_state)
        opt.load_state_dict(ckpt.optimizer_state)
        run = ckpt.meta["run"]
        start, pos, recent = int(run["step"]), int(run["pos"]), list(run["recent"])
        perm = np.asarray(run["perm"], dtype=np.int64)
        backend.set_generator_state(order_rng, run["order_rng"])
        backend.set_generator_state(dropout_rng, run["dropout_rng"])
        log(f"resuming from {ckpt.path} at step {start}")
    if comm is not None:                    # every rank the same run, from the same weights
        distributed.check_same(comm, {"npformer": __version__, "step": start, "config": dataclasses.asdict(cfg)})
        distributed.broadcast_parameters(model, comm)
        distributed.broadcast_optimizer_state(opt, comm)
    log(f"{cfg.task}: {init} {'frozen backbone (linear probe)' if cfg.freeze else 'full fine-tuning'}, "
        f"{trainable:,} trainable parameters, {len(splits['train'][0]):,} train / {len(splits['val'][0]):,} val / "
        f"{len(splits['test'][0]):,} test examples, device {cfg.device}")

    def save(step, metrics=None):
        meta = {"model": MODEL_KIND, "backbone": "gpt", "model_config": config.to_dict(),
                "classifier": {"num_classes": len(label_names), "pooling": model.pooling, "dropout": cfg.dropout},
                "task": cfg.task, "labels": list(label_names), "source_checkpoint": os.path.abspath(cfg.ckpt),
                "finetune_config": dataclasses.asdict(cfg),
                "run": {"step": step, "pos": pos, "perm": perm.tolist(), "recent": recent,
                        "order_rng": backend.generator_state(order_rng),
                        "dropout_rng": backend.generator_state(dropout_rng)}}
        if metrics is not None:
            meta["metrics"] = metrics
        host = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
        opt_state = {k: (backend.to_numpy(v) if backend.is_array(v) else v) for k, v in opt.state_dict().items()}
        save_checkpoint(cfg.out, step, host, opt_state, tok, meta, keep=cfg.keep)

    quiet = None if root else io.StringIO()     # what ranks other than 0 would print goes nowhere
    bar = ProgressBar(cfg.max_iters, start=start, stream=quiet)
    # dropout draws from dropout_rng on this thread for the loop only; a signal saves the last step
    with random.thread_default_generator(dropout_rng, cfg.device), GracefulStop(quiet) as stop:
        for step in range(start, cfg.max_iters):
            lr = warmup_cosine(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
            set_lr(opt, lr)
            if pos + cfg.batch_size > len(perm):                 # next epoch: a fresh shuffle
                perm, pos = order_rng.permutation(len(labels)), 0
            rows = perm[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            value = (_step(model, ids, lengths, labels, rows, cfg) if comm is None
                     else _rank_step(model, ids, lengths, labels, rows, cfg, comm))
            if cfg.grad_clip > 0:
                clip_grad_norm(model.trainable_parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad()
            if not math.isfinite(value):
                error = FloatingPointError(f"training loss became {value} at step {step + 1}; nothing was written "
                                           f"(try a lower --lr)")
                raise error if comm is None else distributed.on_all_ranks(error)   # the same loss on all
            recent = (recent + [value])[-20:]
            bar.update(step + 1, value, lr, int(lengths[rows].max()) * len(rows))
            stopping = stop.requested if comm is None else distributed.any_rank(comm, stop.requested)
            if stopping and step + 1 < cfg.max_iters:           # at the last step: evaluate and save as usual
                if root:
                    save(step + 1)
                raise stop.interrupted(step + 1, cfg.out)

        if not root:                                            # rank 0 evaluates and writes
            return {"init": init, "freeze": cfg.freeze, "steps": cfg.max_iters, "out": cfg.out}
        val_acc = accuracy(model, *data["val"], cfg.device, cfg.eval_batch_size)
        test_acc = accuracy(model, *data["test"], cfg.device, cfg.eval_batch_size)
        summary = {"init": init, "freeze": cfg.freeze, "steps": cfg.max_iters, "train_loss": float(np.mean(recent)),
                   "val_accuracy": val_acc, "test_accuracy": test_acc, "n_test": len(data["test"][2]),
                   "trainable": int(trainable), "seconds": time.perf_counter() - t_start, "out": cfg.out}
        save(cfg.max_iters, {k: summary[k] for k in ("init", "train_loss", "val_accuracy", "test_accuracy", "n_test")})

    log(f"done in {format_seconds(summary['seconds'])}: val accuracy {val_acc:.4f}, "
        f"test accuracy {test_acc:.4f} ({round(test_acc * summary['n_test'])}/{summary['n_test']}); "
        f"checkpoint in {cfg.out}")
    return summary
