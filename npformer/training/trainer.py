"""HF transformers' Trainer, small: fine-tune a model on example dicts with HF's names and defaults.

    args = TrainingArguments("out", num_train_epochs=3, per_device_train_batch_size=16, eval_strategy="epoch")
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val, compute_metrics=accuracy)
    trainer.train()          # TrainOutput(global_step, training_loss, metrics)
    trainer.evaluate()       # {"eval_loss": ..., "eval_accuracy": ...}

The loop, as HF's: for each epoch, shuffle the training examples (a numpy Generator seeded from
args.seed), cut them into batches of per_device_train_batch_size (the last one smaller), collate each
(DataCollatorWithPadding: stacked, padded on the right when lengths differ), call ``model(**batch)``
and take its ``.loss``; backward, clip the gradient norm to max_grad_norm, one AdamW step (betas
(adam_beta1, adam_beta2), eps adam_epsilon; weight decay on the 2-D weights only, as
npformer.optim.weight_decay_groups) at the learning rate of linear_schedule (HF's default: linear
warm-up over warmup_steps, then linear decay to 0 at the last step). Dropout draws from a generator
seeded from args.seed too: two runs with the same seed end with the same weights, bit for bit.

After each epoch, with eval_strategy="epoch", evaluate (model in eval mode, no graph) and log one
line; with save_strategy="epoch" (npformer's default; HF's is "steps") write a checkpoint in
checkpoint.py's format, ``output_dir/ckpt-NNNNNN`` (NNNNNN = the global step; HF names it
checkpoint-N) with meta["trainer_state"] (global_step, epoch, the metrics, log_history) and
meta["training_args"]. The best checkpoint by metric_for_best_model ("loss": eval_loss, lower is
better; greater_is_better as HF's) is state.best_model_checkpoint / state.best_metric; with
load_best_model_at_end (npformer's default True, HF's False) train() ends by loading its weights
back into the model (not here: gradient accumulation, mixed precision, resuming).
tokenizer.json: the WordPiece vocabulary (or a tokenizer load_tokenizer reads), else an empty CharTokenizer.

Over ranks (``Trainer(..., comm=distributed.communicator())`` under ``mpiexec -n N``, docs/distributed.md),
per_device_train_batch_size is each rank's batch, as in HF: one optimizer step takes a global batch of
per_device_train_batch_size x N examples, and an epoch ceil(examples / global batch) steps. Every rank
shuffles with the same seed, collates each global batch whole (one padding) and runs its rows of it
(trainer_data.rank_rows); its gradient, weighted by its share n_r / n of the batch's n examples (1 / N
but in an epoch's short last batch), is summed over the ranks: one process's step on the global batch,
to rounding. Dropout: each step every rank draws N seeds from the dropout generator and uses its own.
Rank 0 alone claims output_dir, evaluates, logs and saves; train() ends with its best weights on every
rank. A comm of one rank (distributed.SingleProcess) runs the single-process loop unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np

from .. import __version__, backend, distributed, random
from ..autograd import no_grad
from ..data import CharTokenizer, WordPieceStream, WordPieceTokenizer
from ..data.tokenizers import TOKENIZERS
from ..optim import AdamW, clip_grad_norm, set_lr, weight_decay_groups
from ..tensor import Tensor
from .checkpoint import load_checkpoint, save_checkpoint
from .progress import ProgressBar
from .trainer_data import DataCollatorWithPadding, examples as _examples, join as _join, rank_rows

STRATEGIES = ("no", "epoch")
LABEL_NAMES = ("labels", "start_positions", "end_positions")     # HF's label_names


@dataclass
class TrainingArguments:
    """HF's TrainingArguments fields (names, meanings, defaults) for the ones npformer supports.

    eval_strategy / save_strategy: "no" or "epoch"; evaluation_strategy is HF's older name of
    eval_strategy (either may be given; both, differently, is an error). metric_for_best_model:
    a key of evaluate()'s result with or without "eval_" (None: "loss"); greater_is_better None:
    False for a loss, else True. disable_tqdm: no progress bar. remove_unused_columns: leave out the
    example fields model.forward does not take (a "text" column), unless it takes **kwargs."""
    output_dir: str = "trainer_output"
    overwrite_output_dir: bool = False
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    eval_strategy: Optional[str] = None
    save_strategy: str = "epoch"
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    seed: int = 42
    load_best_model_at_end: bool = True
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    disable_tqdm: bool = False
    remove_unused_columns: bool = True
    evaluation_strategy: Optional[str] = field(default=None, repr=False)

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"TrainingArguments.{name} must be {what}; got {getattr(self, name)!r}")

        given = {self.eval_strategy, self.evaluation_strategy} - {None}
        if len(given) > 1:
            raise ValueError(f"TrainingArguments: eval_strategy={self.eval_strategy!r} and evaluation_strategy="
                             f"{self.evaluation_strategy!r} disagree (evaluation_strategy is the older name; give one)")
        self.eval_strategy = self.evaluation_strategy = given.pop() if given else "no"
        need(isinstance(self.output_dir, (str, os.PathLike)), "output_dir", "a directory path")
        self.output_dir = os.fspath(self.output_dir)
        for name in ("eval_strategy", "save_strategy"):
            need(getattr(self, name) in STRATEGIES, name, f"one of {', '.join(map(repr, STRATEGIES))}")
        for name in ("num_train_epochs", "learning_rate", "weight_decay", "max_grad_norm", "adam_epsilon"):
            v, low = getattr(self, name), "> 0" if name == "num_train_epochs" else ">= 0"
            need(isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if low == "> 0" else v >= 0), name,
                 f"a number {low}")
        for name, low in (("per_device_train_batch_size", 1), ("per_device_eval_batch_size", 1), ("warmup_steps", 0),
                          ("seed", 0)):
            v = getattr(self, name)
            need(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low, name,
                 "a positive integer" if low else "an integer >= 0")
        metric = self.metric_for_best_model or "loss"
        self.metric_for_best_model = metric[len("eval_"):] if metric.startswith("eval_") else metric
        if self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        need(not (self.load_best_model_at_end and self.eval_strategy == "epoch" and self.save_strategy == "no"),
             "save_strategy", "'epoch' when load_best_model_at_end evaluates each epoch")


class EvalPrediction(NamedTuple):
    """What compute_metrics gets: predictions (N, ...) (a tuple for QA: start, end) and label_ids."""
    predictions: object
    label_ids: object


# what train() and predict() return, HF's fields
TrainOutput = NamedTuple("TrainOutput", [("global_step", int), ("training_loss", float), ("metrics", dict)])
PredictionOutput = NamedTuple("PredictionOutput", [("predictions", object), ("label_ids", object), ("metrics", dict)])


@dataclass
class TrainerState:
    """HF's TrainerState fields: steps done, epochs done, the best checkpoint, and every log dict."""
    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0
    num_train_epochs: int = 0
    best_metric: Optional[float] = None
    best_model_checkpoint: Optional[str] = None
    log_history: list = field(default_factory=list)


def linear_schedule(step: int, learning_rate: float, warmup_steps: int, total_steps: int) -> float:
    """HF's get_linear_schedule_with_warmup: the lr of optimizer step `step` (0-based) of total_steps.

        step < warmup_steps:  learning_rate * step / warmup_steps          (0 at the first step)
        otherwise:            learning_rate * (total_steps - step) / (total_steps - warmup_steps), >= 0
    """
    if step < warmup_steps:
        return learning_rate * step / max(1, warmup_steps)
    return learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


class Trainer:
    """Train and evaluate `model` on example dicts (see the module docstring).

    Positional order as HF's: model, args, data_collator, train_dataset, eval_dataset, processing_class.
    model(**batch) must return an object with .loss (or the loss first) and .logits (or start_logits,
    end_logits). Datasets: a sequence of dicts (input_ids, attention_mask, token_type_ids, labels / label
    or start_positions and end_positions) or a dict of equal-length columns. processing_class (or its
    older name tokenizer): gives the default collator its pad_token_id. compute_metrics:
    EvalPrediction -> {name: value}, reported as "eval_" + name. log: prints the per-epoch lines.

    comm: a communicator (npformer.distributed) to train over its ranks, every rank with the same model,
    args and datasets; None: this process alone. As in HF, args.per_device_train_batch_size is then the
    batch of one rank, and a step's global batch is per_device_train_batch_size x comm.size (npformer
    finetune's --batch-size, by contrast, is the global batch: it passes --batch-size / N here)."""

    def __init__(self, model=None, args: TrainingArguments = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *, compute_metrics=None, tokenizer=None, log=print,
                 comm=None):
        if model is None:
            raise ValueError("Trainer: model is required")
        if processing_class is not None and tokenizer is not None and processing_class is not tokenizer:
            raise ValueError("Trainer: processing_class and tokenizer (its older name) are different objects")
        self.model, self.args = model, args if args is not None else TrainingArguments()
        self.processing_class = processing_class if processing_class is not None else tokenizer
        self.data_collator = data_collator or DataCollatorWithPadding(self.processing_class)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_metrics, self.log = compute_metrics, log
        self.comm = comm if comm is not None and comm.size > 1 else None     # one rank: the plain loop
        self.world_size = 1 if self.comm is None else self.comm.size
        self.state = TrainerState()
        self.device = next(iter(model.parameters())).device

    def is_world_process_zero(self) -> bool:
        """Whether this process is rank 0 (or alone), the one that logs, evaluates and writes (HF's name)."""
        return self.comm is None or self.comm.rank == 0

    def _batches(self, rows: list, order, size: int):
        """Collated batches of rows[order] on the model's device: {name: (B, ...) array}."""
        params = inspect.signature(self.model.forward).parameters
        if self.args.remove_unused_columns and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            rows = [{k: v for k, v in r.items() if k in params} for r in rows]
        for start in range(0, len(order), size):
            batch = self.data_collator([rows[i] for i in order[start:start + size]])
            yield {k: backend.to_device(np.asarray(v), self.device) for k, v in batch.items()}

    def _loss(self, out, batch: dict, where: str):
        loss = getattr(out, "loss", None) if hasattr(out, "loss") or not isinstance(out, tuple) else out[0]
        if not isinstance(loss, Tensor):
            raise ValueError(f"Trainer.{where}: the model's output has no loss (.loss or the first element) although "
                             f"the batch has {[k for k in LABEL_NAMES if k in batch]}; got {type(loss).__name__}")
        return loss

    def _step(self, batch: dict, opt, lr: float) -> float:
        """One optimizer step at learning rate lr on `batch` (over ranks: the global batch); the loss, a float."""
        set_lr(opt, lr)
        if self.comm is None:
            loss = self._loss(self.model(**batch), batch, "train")
            loss.backward()
        else:
            value = self._rank_backward(batch)
        if self.args.max_grad_norm > 0:
            clip_grad_norm(self.model.parameters(), self.args.max_grad_norm)
        opt.step()
        opt.zero_grad()
        if self.comm is None:
            value = loss.item()
        if not math.isfinite(value):
            error = FloatingPointError(f"Trainer.train: the loss became {value} at step {self.state.global_step + 1} "
                                       f"(try a lower learning_rate)")
            raise error if self.comm is None else distributed.on_all_ranks(error)    # the same loss on every rank
        return value

    def _rank_backward(self, batch: dict) -> float:
        """This rank's rows of the global `batch` ((n, ...) arrays) forward and backward, then the gradients
        summed over the ranks, each weighted by its share n_r / n: every rank holds the gradient of the
        batch's mean loss (exactly so when the loss is a mean over examples and none is left out: no label
        -100, no answer position outside the input). Returns that loss (the same float on every rank)."""
        comm, n = self.comm, len(batch["input_ids"])
        rows = rank_rows(n, comm.rank, comm.size)
        weight = (rows.stop - rows.start) / n
        seeds = random.default_generator(self.device).integers(0, 2**63 - 1, size=comm.size)  # all ranks draw
        value = 0.0
        if weight > 0:                                  # a short last batch may leave a rank no rows
            mine = {k: v[rows] for k, v in batch.items()}                          # (n_r, ...)
            with random.thread_default_generator(random.Generator(int(seeds[comm.rank]), self.device), self.device):
                loss = self._loss(self.model(**mine), mine, "train")
                loss.backward()
            value = loss.item() * weight
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad = p.grad * weight
        distributed.allreduce_gradients(self.model, comm, "sum")
        return float(comm.allreduce(np.array([value], dtype=np.float64), "sum")[0])

    def train(self) -> TrainOutput:
        """Train for args.num_train_epochs (see the module docstring); return TrainOutput(global_step,
        training_loss (the mean over every step), metrics). Over ranks, every rank calls it."""
        args, model, comm, root = self.args, self.model, self.comm, self.is_world_process_zero()
        with contextlib.nullcontext() if comm is None else distributed.together(comm):   # one error for all ranks
            if self.train_dataset is None:
                raise ValueError("Trainer.train: train_dataset is required")
            if args.eval_strategy == "epoch" and self.eval_dataset is None:
                raise ValueError("Trainer.train: eval_strategy='epoch' needs an eval_dataset")
            if root:
                self._claim_output_dir()
            rows = _examples(self.train_dataset, "train_dataset")
        if comm is not None:                    # every rank the same run, from rank 0's weights
            ids = np.concatenate([np.asarray(r["input_ids"], dtype=np.int64).reshape(-1) for r in rows])
            distributed.check_same(comm, {"npformer": __version__, "training_args": dataclasses.asdict(args),
                                          "model": type(model).__name__, "train_examples": len(rows),
                                          "train_input_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()})
            distributed.broadcast_parameters(model, comm)
        bs = args.per_device_train_batch_size * self.world_size                   # the global batch
        steps_per_epoch = math.ceil(len(rows) / bs)
        max_steps = math.ceil(args.num_train_epochs * steps_per_epoch)
        self.state = state = TrainerState(max_steps=max_steps, num_train_epochs=math.ceil(args.num_train_epochs))
        opt = AdamW(weight_decay_groups(model.named_parameters(), args.weight_decay), lr=args.learning_rate,
                    betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        order_rng = np.random.default_rng(args.seed)
        dropout_rng = backend.default_rng(args.seed + 1, self.device)
        bar = None if args.disable_tqdm or not root else ProgressBar(max_steps)
        losses, t0 = [], time.perf_counter()
        model.train()
        with random.thread_default_generator(dropout_rng, self.device):
            for epoch in range(state.num_train_epochs):
                epoch_losses = []
                order = order_rng.permutation(len(rows))[:(max_steps - state.global_step) * bs]  # a fractional epoch
                for batch in self._batches(rows, order, bs):
                    lr = linear_schedule(state.global_step, args.learning_rate, args.warmup_steps, max_steps)
                    epoch_losses.append(self._step(batch, opt, lr))
                    state.global_step += 1
                    if bar is not None:
                        bar.update(state.global_step, epoch_losses[-1], lr, int(batch["input_ids"].size))
                state.epoch = min(epoch + 1.0, state.global_step / steps_per_epoch)
                losses += epoch_losses
                epoch_loss = float(np.mean(epoch_losses))
                state.log_history.append({"loss": epoch_loss, "learning_rate": lr, "epoch": state.epoch,
                                          "step": state.global_step})
                if not root:                    # the others go on and wait for rank 0 in the next allreduce
                    continue
                metrics = self.evaluate() if args.eval_strategy == "epoch" else {}
                if metrics:
                    self.log(f"epoch {state.epoch:g}/{args.num_train_epochs:g} (step {state.global_step}): train loss "
                             f"{epoch_loss:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if args.save_strategy == "epoch":
                    self._save(opt, order_rng, dropout_rng, metrics)
        runtime = time.perf_counter() - t0
        if comm is not None:                    # rank 0's choice, known to every rank
            state.best_metric, state.best_model_checkpoint = comm.broadcast_json(
                [state.best_metric, state.best_model_checkpoint])
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            if root:
                model.load_state_dict(load_checkpoint(state.best_model_checkpoint).model_state)
                self.log(f"loaded the best model, {state.best_model_checkpoint} (eval_{args.metric_for_best_model} "
                         f"{state.best_metric:.4f})")
            if comm is not None:
                distributed.broadcast_parameters(model, comm)
        metrics = {"train_runtime": runtime, "train_loss": float(np.mean(losses)), "epoch": state.epoch}
        state.log_history.append({**metrics, "step": state.global_step})
        return TrainOutput(state.global_step, metrics["train_loss"], metrics)

    def _claim_output_dir(self) -> None:
        """Refuse an output_dir that holds checkpoints (overwrite_output_dir=True removes them)."""
        d = self.args.output_dir
        old = [e for e in (os.listdir(d) if os.path.isdir(d) else []) if e.startswith("ckpt-") or e == "latest.json"]
        if old and self.args.save_strategy == "epoch" and not self.args.overwrite_output_dir:
            raise ValueError(f"TrainingArguments.output_dir {d} already holds checkpoints ({sorted(old)[0]}, ...); "
                             f"choose another or pass overwrite_output_dir=True")
        for path in [os.path.join(d, e) for e in old] if self.args.overwrite_output_dir else []:
            os.remove(path) if os.path.isfile(path) else shutil.rmtree(path)

    def _save(self, opt, order_rng, dropout_rng, metrics: dict) -> None:
        """Checkpoint the model and optimizer (checkpoint.py's format); track the best by the metric."""
        args, state = self.args, self.state
        key = "eval_" + args.metric_for_best_model
        if metrics and key not in metrics:
            raise ValueError(f"TrainingArguments.metric_for_best_model {args.metric_for_best_model!r}: evaluate() "
                             f"gave no {key!r} (it gave {sorted(metrics)})")
        tok = self.processing_class
        tok = (WordPieceStream(tok) if isinstance(tok, WordPieceTokenizer)
               else tok if getattr(type(tok), "type_name", None) in TOKENIZERS else CharTokenizer(""))
        config = getattr(getattr(self.model, "config", None), "to_dict", lambda: None)()
        meta = {"model": "trainer", "model_class": type(self.model).__name__, "model_config": config,
                "training_args": dataclasses.asdict(args),
                "trainer_state": {"global_step": state.global_step, "epoch": state.epoch, "metrics": metrics,
                                  "log_history": state.log_history},
                "run": {name: backend.generator_state(g) for name, g in (("order_rng", order_rng),
                                                                          ("dropout_rng", dropout_rng))}}
        model_state = {k: backend.to_numpy(v) for k, v in self.model.state_dict().items()}
        opt_state = {k: (backend.to_numpy(v) if backend.is_array(v) else v) for k, v in opt.state_dict().items()}
        path = save_checkpoint(args.output_dir, state.global_step, model_state, opt_state, tok, meta, keep=0)
        if metrics:
            value, best = float(metrics[key]), state.best_metric
            if best is None or (value > best if args.greater_is_better else value < best):
                state.best_metric, state.best_model_checkpoint = value, path

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        """{prefix_loss (the mean over examples), prefix_<compute_metrics' names>, epoch}: the model in
        eval mode, no graph, batches of per_device_eval_batch_size in order. Appended to log_history."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer.evaluate: no eval_dataset (pass one here or to Trainer)")
        metrics = self.predict(dataset, metric_key_prefix).metrics
        self.state.log_history.append({**metrics, "epoch": self.state.epoch, "step": self.state.global_step})
        return metrics

    def predict(self, test_dataset, metric_key_prefix: str = "test") -> PredictionOutput:
        """PredictionOutput(predictions (N, ...) or (start, end), label_ids (None without labels), metrics
        named metric_key_prefix + "_loss", ...): the model in eval mode (its mode restored), no graph."""
        prefix = metric_key_prefix
        rows = _examples(test_dataset, f"{prefix}_dataset")
        model, was_training = self.model, self.model.training
        model.eval()
        preds, labels, total = [], [], 0.0
        try:
            with no_grad():
                for batch in self._batches(rows, np.arange(len(rows)), self.args.per_device_eval_batch_size):
                    out = model(**batch)
                    names = [k for k in LABEL_NAMES if k in batch]
                    if names:
                        total += self._loss(out, batch, "evaluate").item() * len(batch["input_ids"])
                        labels.append(tuple(backend.to_numpy(batch[k]) for k in names))
                    fields = (["start_logits", "end_logits"] if hasattr(out, "start_logits") else ["logits"])
                    preds.append(tuple(backend.to_numpy(getattr(out, f).data) for f in fields))
        finally:
            model.train(was_training)
        predictions, label_ids = (_join(preds), _join(labels) if labels else None)
        metrics = {f"{prefix}_loss": total / len(rows)} if labels else {}
        if self.compute_metrics is not None and label_ids is not None:
            for k, v in self.compute_metrics(EvalPrediction(predictions, label_ids)).items():
                metrics[k if k.startswith(prefix + "_") else f"{prefix}_{k}"] = float(v)
        return PredictionOutput(predictions, label_ids, metrics)
