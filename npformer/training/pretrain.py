"""Pretraining a GPT (or a LLaMA, an LSTM, a GRU, a BERT) on a text corpus: the loop behind ``npformer pretrain``.

The run is fully determined by its ``PretrainConfig``: the weights come from a
generator seeded with ``seed``, batches from a sampler seeded with ``seed + 1``,
dropout from a generator seeded with ``seed + 2``. A checkpoint stores all three
states, so a run stopped at step k and resumed reaches exactly the weights and
losses of the uninterrupted run (on the CPU, with the same number of workers: the
workers split each batch, which fixes the float rounding and the dropout streams).

``model="bert"`` trains a BERT masked language model on the same loop (objectives.py says what
differs: the batches are masked, the loss is taken over the masked tokens, evaluations report the
masked-token accuracy too, and the run ends with filled-in masks instead of samples).
``model="lstm"`` or ``"gru"`` trains an RNNLM (models/rnn_lm.py) on the GPT's batches and loss: truncated
backpropagation through time over each block, from a zero state; it has no --n-head (refused unless default).

A resumed run keeps the learning-rate schedule of the run that wrote the
checkpoint: ``lr_decay_iters=None`` means the checkpoint's ``lr_decay_iters``
(which was that run's ``max_iters`` unless given), not the new ``max_iters``.
A new run never writes into an ``out`` that already holds a checkpoint.

With a communicator (``pretrain(cfg, comm=...)``; ``mpiexec -n N npformer pretrain``) the same loop
runs on every rank (docs/distributed.md): all ranks draw the same global batch and dropout seeds,
each runs its share of the batch's shards, an allreduce sums the gradients, and every rank takes
the same optimizer step. Rank 0 alone locks ``out``, logs, evaluates and writes checkpoints; the
start-up (pretrain_setup.py) ends every rank with one error if any rank fails or disagrees.

What protects the run (docs/pretraining.md, "When things go wrong"): ``out`` is claimed and
locked (rundir.py); the memory a step needs is estimated and compared with what is available
before anything large is allocated (memory.py); the checkpoint records the training data's size
and SHA-256, and a resume on changed data is refused unless ``allow_data_change``; SIGINT/SIGTERM
finish the step, save it and raise ``Interrupted`` (stopping.py); ``resume`` falls back to the
newest intact checkpoint when the newest is damaged, and sets the damaged one aside.

Run directory ``out``: the checkpoints (see checkpoint.py), ``loss.png`` (metrics.py, when
matplotlib is installed) and ``metrics.jsonl``, one JSON object per evaluation
(every ``eval_interval`` steps and at ``max_iters``):

    step        optimizer steps taken
    train_loss  mean loss over eval_iters fixed training batches (nats/token; BERT: per masked token)
    val_loss    the same on the validation text
    train_accuracy, val_accuracy   BERT only: the fraction of masked tokens predicted exactly
    lr          learning rate of the last step
    elapsed_s   seconds since this process started the run (or resumed it)
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass

from .. import __version__, backend, cpu, distributed, random
from ..optim import AdamW, clip_grad_norm, set_lr, warmup_cosine, weight_decay_groups
from . import parallel
from . import workers as shard_workers
from .checkpoint import save_checkpoint
from .floors import Floors
from .memory import format_bytes, shard_plan
from .objectives import MODELS, RECURRENT, make_objective
from .metrics import append_metrics, plot_losses, truncate_metrics
from .progress import ProgressBar, format_seconds
from .pretrain_setup import setup
from .rundir import RunDir
from .stopping import GracefulStop

class OutOfMemory(RuntimeError):
    """A MemoryError inside the training loop, told in one line with the flags that lower memory."""


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of a pretraining run (the CLI flags, by the same names)."""
    model: str = "gpt"                  # "gpt", "llama", "lstm" or "gru" (causal LMs), or "bert" (masked LM)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = None               # llama: key/value heads (grouped-query attention); None: n_head
    n_embd: int = 128
    block_size: int = 128
    max_positions: int = None           # bert: the position table (None: block_size); --resume may lengthen blocks
    batch_size: int = 16
    max_iters: int = 1000
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = None            # None: min(100, max_iters // 10)
    lr_decay_iters: int = None          # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    dropout: float = 0.0
    bias: bool = True
    eval_interval: int = 200
    eval_iters: int = 20
    seed: int = 1337
    device: str = None                  # None: NPFORMER_DEVICE, else cpu
    workers: int = None                 # CPU workers of the data-parallel step; None: all usable cores
    shards: int = None                  # pieces each batch is cut into (None: about 512 tokens each)
    data: str = None                    # None: the built-in toy language
    tokenizer: str = None               # "char", "bpe" or "wordpiece"; None: wordpiece for bert, else char
    vocab_size: int = 512               # for --tokenizer bpe and wordpiece
    out: str = "out-pretrain"
    resume: bool = False
    keep: int = 2                       # checkpoints kept (the newest); 0: all
    allow_data_change: bool = False     # resume on data whose SHA-256 differs from the checkpoint's
    samples: int = 3
    sample_tokens: int = 200

    def checked(self) -> "PretrainConfig":
        """Validate every field; return a copy with defaults filled in. Raises ValueError naming the flag."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "eval_interval",
                     "eval_iters"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"--{name.replace('_', '-')} must be a positive integer; got {v}")
        need(self.model in MODELS, f"--model must be one of {', '.join(MODELS)}; got {self.model!r}")
        if self.model in RECURRENT:         # an RNNLM has no heads: a --n-head other than the default is a mistake
            need(self.n_head == PretrainConfig.n_head, f"--n-head is a Transformer option: --model {self.model} "
                                                       f"has no attention heads; leave it out")
        else:
            need(self.n_embd % self.n_head == 0,
                 f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number; got {self.lr}")
        need(0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, --lr={self.lr}]; got {self.min_lr}")
        warmup = min(100, self.max_iters // 10) if self.warmup_iters is None else self.warmup_iters
        need(isinstance(warmup, int) and warmup >= 0, f"--warmup-iters must be >= 0; got {warmup}")
        decay = self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters
        if not decay > warmup:
            what_decay = ("--lr-decay-iters" if self.lr_decay_iters is not None
                          else "--max-iters" if not self.resume else "the checkpoint's --lr-decay-iters")
            what_warmup = ("--warmup-iters" if self.warmup_iters is not None
                           else "the default --warmup-iters, min(100, --max-iters // 10)")
            raise ValueError(f"the learning rate must warm up before it decays: {what_decay} ({decay}) must "
                             f"exceed {what_warmup} ({warmup})")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
             f"--seed must be an integer >= 0; got {self.seed}")
        need(isinstance(self.keep, int) and self.keep >= 0, f"--keep must be >= 0 (0 keeps all); got {self.keep}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0; got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must be in [0, 1); got {self.beta1}, {self.beta2}")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables); got {self.grad_clip}")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}")
        tokenizer = self.tokenizer or ("wordpiece" if self.model == "bert" else "char")
        need(tokenizer in ("char", "bpe", "wordpiece"),
             f"--tokenizer must be 'char', 'bpe' or 'wordpiece'; got {tokenizer!r}")
        need(tokenizer != "bpe" or self.vocab_size > 256, f"--vocab-size must exceed 256 for bpe; got {self.vocab_size}")
        need(tokenizer != "wordpiece" or self.vocab_size > 5,
             f"--vocab-size must exceed the 5 special tokens for wordpiece; got {self.vocab_size}")
        if self.model == "bert":
            need(tokenizer == "wordpiece", f"--model bert needs --tokenizer wordpiece (its [CLS], [SEP] and [MASK] "
                                           f"tokens); got --tokenizer {tokenizer}")
            need(self.bias, "--no-bias is a GPT option: BERT's layers always have biases")
            need(self.block_size >= 3, f"--block-size must be >= 3 for bert ([CLS], a token, [SEP]); got {self.block_size}")
        kv = self.n_kv_head
        need(kv is None or self.model == "llama", "--n-kv-head is a LLaMA option (grouped-query attention)")
        need(kv is None or (isinstance(kv, int) and not isinstance(kv, bool) and kv >= 1 and self.n_head % kv == 0),
             f"--n-kv-head must be a positive integer dividing --n-head ({self.n_head}); got {kv}")
        need(self.model != "llama" or (self.n_embd // self.n_head) % 2 == 0,
             f"--n-embd / --n-head must be even for llama (RoPE rotates pairs of features); got "
             f"{self.n_embd} / {self.n_head}")
        need(self.max_positions is None or self.model == "bert",
             "--max-positions is a BERT option (a GPT's position table is --block-size)")
        need(self.max_positions is None or (isinstance(self.max_positions, int) and self.max_positions >= self.block_size),
             f"--max-positions must be an integer >= --block-size ({self.block_size}); got {self.max_positions}")
        need(self.samples >= 0 and self.sample_tokens >= 0, "--samples and --sample-tokens must be >= 0")
        device = self.device or backend.default_device()
        for name in ("workers", "shards"):      # None: npformer's choice
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                 f"--{name} must be a positive integer; got {v}")
        t = self.workers
        need(t in (None, 1) or device == "cpu", f"--workers {t} splits the batch over CPU workers; on the "
                                                f"{device} use --workers 1 (or leave it out)")
        backend.check_device(device)
        workers = parallel.default_threads(device) if t is None else t
        data = None if self.data is None else os.path.abspath(self.data)      # resumable from any directory
        return dataclasses.replace(self, warmup_iters=warmup, lr_decay_iters=decay, device=device, workers=workers,
                                   data=data, tokenizer=tokenizer,
                                   max_positions=self.max_positions or (self.block_size if self.model == "bert" else None))


def _run_state(cfg, step, sampler, dropout_rng, best_val, objective):
    return {"step": step, "sampler": sampler.state_dict(), "best_val": best_val,
            "dropout_rng": backend.generator_state(dropout_rng), "objective": objective.state_dict()}


def _out_of_memory(cfg, step: int, where: str, last_saved) -> OutOfMemory:
    saved = (f"the last checkpoint (step {last_saved}) in {cfg.out} is intact" if last_saved is not None
             else "no checkpoint was written yet")
    return OutOfMemory(f"out of memory in the {where} of step {step}; {saved}; lower --batch-size "
                       f"({cfg.batch_size}) or --block-size ({cfg.block_size}), or raise --shards "
                       f"({shard_plan(cfg)[0]})")


def pretrain(cfg: PretrainConfig, log=print, comm=None) -> dict:
    """Run (or resume) pretraining; return a summary dict of the final figures.

    comm: a communicator (npformer.distributed) to train over its ranks, each on its share of
    every --batch-size batch (docs/distributed.md); rank 0 alone locks --out, logs and writes.
    None: this process alone. Every rank gets the summary."""
    if comm is None:
        if not cfg.resume:
            cfg = cfg.checked()             # every flag checked before --out is touched
        with RunDir.claim(cfg.out, "pretrain", resume=cfg.resume):
            return _pretrain(cfg, log, None)
    if comm.rank != 0:
        log = distributed.quiet
    if cfg.workers is None:                 # one worker per rank unless --workers says otherwise
        cfg = dataclasses.replace(cfg, workers=1)
    with distributed.together(comm):
        cfg = cfg if cfg.resume else cfg.checked()
    with distributed.claim_on_rank_0(comm, cfg.out, "pretrain", cfg.resume):
        return _pretrain(cfg, log, comm)


def _pretrain(cfg: PretrainConfig, log, comm) -> dict:
    t_start = time.perf_counter()
    cpu.tune_allocator()                    # glibc: reuse freed arrays (NPFORMER_TUNE_MALLOC=0: leave it)
    ckpt = distributed.resume_point(cfg.out, comm) if cfg.resume else None
    with distributed.stage(comm):
        cfg, started = setup(cfg, ckpt, log, comm)
    return _train(cfg, ckpt, started, log, comm, t_start)


def _train(cfg, ckpt, started, log, comm, t_start) -> dict:
    train_text, val_text, fingerprint, tok, estimate, train_ids, val_ids, chars_per_token = started
    root = comm is None or comm.rank == 0
    objective = make_objective(cfg, tok)        # the model, its batches and its evaluation
    model = objective.model
    opt = AdamW(weight_decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2))
    sampler = objective.sampler(train_ids, seed=cfg.seed + 1)
    dropout_rng = backend.default_rng(cfg.seed + 2, cfg.device)
    step, best_val, last_saved = 0, None, None
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if ckpt:
        objective.saved.load_state_dict(ckpt.model_state)
        opt.load_state_dict(ckpt.optimizer_state)
        run = ckpt.meta["run"]
        objective.load_state_dict(run.get("objective") or {})
        step, best_val = int(run["step"]), run["best_val"]
        last_saved = step
        sampler.load_state_dict(run["sampler"])
        backend.set_generator_state(dropout_rng, run.get("dropout_rng"))
        if root:
            truncate_metrics(metrics_path, step)
        log(f"resuming from {ckpt.path} at step {step}")
        saved_workers = ckpt.meta.get("pretrain_config", {}).get("workers")
        ranks, saved_ranks = (1 if comm is None else comm.size), ckpt.meta.get("ranks", 1)
        if ranks > 1 or saved_ranks != 1:
            if saved_ranks != ranks:
                log(f"note: the run so far used {saved_ranks} rank(s) and this one uses {ranks}: the shards and "
                    f"dropout masks are the same (--shards {cfg.shards}), only the order of the float sums differs")
        elif isinstance(saved_workers, int) and saved_workers != cfg.workers:
            log(f"note: the run so far used {saved_workers} workers and this one uses {cfg.workers}: the batch is "
                f"split differently, so the float rounding (and, with dropout, the masks) differ from a run "
                f"that kept {saved_workers} (pass --workers {saved_workers} to continue it exactly)")
        if step >= cfg.max_iters:
            log(f"the run in {cfg.out} is already at step {step} (--max-iters {cfg.max_iters}); nothing to do")
    elif root and os.path.exists(metrics_path):
        os.remove(metrics_path)                 # left by an earlier run that saved no checkpoint
    if comm is not None:                        # every rank the same run, from the same weights
        distributed.check_same(comm, {"npformer": __version__, "data": fingerprint, "step": step,
                                      "vocab": tok.vocab_size, "config": {k: v for k, v in dataclasses.asdict(
                                          cfg).items() if k != "data"}})
        distributed.broadcast_parameters(model, comm)
        distributed.broadcast_optimizer_state(opt, comm)

    floors = Floors.of_run(cfg.model, cfg.tokenizer, cfg.block_size, builtin=cfg.data is None)
    log(f"model: {cfg.model} {model.num_parameters() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, "
        f"device {cfg.device}" + (f" ({cfg.workers} worker{'s' * (cfg.workers != 1)})" if cfg.device == "cpu" else "")
        + f"; data: {len(train_ids):,} train / {len(val_ids):,} val tokens"
        + floors.describe(cfg.block_size)
        + f"; memory: about {format_bytes(estimate.peak_bytes)} at peak"
        + ("" if comm is None else f"; {comm.size} ranks ({comm.name}), {cfg.shards} shards of the "
                                   f"global batch of {cfg.batch_size}"))

    def save(at_step):
        meta = {"model": objective.kind, "model_config": objective.config.to_dict(),
                "pretrain_config": dataclasses.asdict(cfg), "data_fingerprint": fingerprint,
                "ranks": 1 if comm is None else comm.size,
                "run": _run_state(cfg, at_step, sampler, dropout_rng, best_val, objective)}
        host = {k: backend.to_numpy(v) for k, v in objective.saved.state_dict().items()}
        opt_state = {k: (backend.to_numpy(v) if backend.is_array(v) else v) for k, v in opt.state_dict().items()}
        save_checkpoint(cfg.out, at_step, host, opt_state, tok, meta, keep=cfg.keep)

    bar = ProgressBar(cfg.max_iters, start=step, stream=None if root else io.StringIO())   # rank 0 alone
    tokens_per_step = cfg.batch_size * cfg.block_size
    train_loss = float("nan")
    val_loss = val_accuracy = None
    model.train()
    train_seconds, steps_run = 0.0, 0
    # The dropout generator is this thread's default for the loop only (restored afterwards).
    # Worker processes (or threads where there is no fork) each run the model on a share of
    # every batch; see docs/performance.md#cpu-threads.
    quiet = None if root else io.StringIO()     # what ranks other than 0 would print goes nowhere
    with random.thread_default_generator(dropout_rng, cfg.device), GracefulStop(quiet) as stop:
        workers = (shard_workers.ShardWorkers(model, cfg.workers)
                   if cfg.workers > 1 and shard_workers.available() else None)

        def step_fb(x, y):
            if comm is not None:
                return distributed.forward_backward(model, x, y, comm, cfg.workers, objective.ignore_index,
                                                    cfg.shards, pool=workers)
            if workers is not None:
                return workers.forward_backward(x, y, objective.ignore_index, shards=cfg.shards)
            return parallel.forward_backward(model, x, y, cfg.workers, objective.ignore_index, shards=cfg.shards)

        where = "training step"
        try:
            while step < cfg.max_iters:
                t_step = time.perf_counter()
                lr = warmup_cosine(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)
                set_lr(opt, lr)
                x, y = objective.batch(sampler)
                where = "training step"
                blas = parallel.blas_context(cfg.workers) if comm is None else cpu.blas_threads(1)
                with blas:                                  # one-thread BLAS under data-parallel workers
                    train_loss = step_fb(backend.to_device(x, cfg.device), backend.to_device(y, cfg.device))
                    if cfg.grad_clip > 0:
                        clip_grad_norm(model.parameters(), cfg.grad_clip)
                    parallel.step_in_threads(opt, cfg.workers)
                opt.zero_grad()
                step += 1
                train_seconds += time.perf_counter() - t_step
                steps_run += 1
                if not math.isfinite(train_loss):
                    kept = (f"the last checkpoint (step {last_saved}) in {cfg.out} is untouched"
                            if last_saved is not None else "no checkpoint was written")
                    error = FloatingPointError(f"training loss became {train_loss} at step {step}; {kept} "
                                               f"(try a lower --lr)")
                    raise error if comm is None else distributed.on_all_ranks(error)   # the same loss on all
                bar.update(step, train_loss, lr, tokens_per_step)
                if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not root:
                    last_saved = step                   # rank 0 evaluates and saves; the others go on
                elif step % cfg.eval_interval == 0 or step == cfg.max_iters:
                    where = "evaluation"
                    tr = objective.evaluate(train_ids, seed=cfg.seed + 3)
                    va = objective.evaluate(val_ids, seed=cfg.seed + 4)
                    val_loss, val_accuracy = va["loss"], va.get("accuracy")
                    best_val = val_loss if best_val is None else min(best_val, val_loss)
                    record = {"step": step, "train_loss": tr["loss"], "val_loss": val_loss, "lr": lr,
                              "elapsed_s": round(time.perf_counter() - t_start, 3)}
                    if val_accuracy is not None:
                        record.update(train_accuracy=tr["accuracy"], val_accuracy=val_accuracy)
                    append_metrics(metrics_path, record)
                    gap = floors.eval_suffix(val_loss, chars_per_token)
                    acc = "" if val_accuracy is None else f"; masked tokens right: train {tr['accuracy']:.1%}, val {val_accuracy:.1%}"
                    bar.message(f"step {step}: train {tr['loss']:.4f}, val {val_loss:.4f}{gap}{acc}")
                    save(step)
                    last_saved = step
                if stop.requested if comm is None else distributed.any_rank(comm, stop.requested):
                    if last_saved != step and root:
                        save(step)
                    raise stop.interrupted(step, cfg.out)
        except MemoryError:
            raise _out_of_memory(cfg, step + (where == "training step"), where, last_saved) from None
        finally:
            if workers is not None:
                workers.close()

    summary = {"model": cfg.model, "step": step, "val_loss": val_loss, "val_accuracy": val_accuracy,
               "best_val": best_val, "entropy_floor": floors.per_char, "token_floor": floors.per_token,
               "context_floor": floors.context,
               "ms_per_iter": 1000 * train_seconds / steps_run if steps_run else None,
               "val_loss_per_char": None if val_loss is None else val_loss / chars_per_token, "out": cfg.out}
    if floors.value is not None and val_loss is not None:       # per character, or per token
        summary["gap_percent"] = floors.gap_percent(val_loss, chars_per_token)
    if root:
        plot_losses(metrics_path, os.path.join(cfg.out, "loss.png"), floors.value, log)
        objective.show(val_text, log)
    summary["seconds"] = time.perf_counter() - t_start
    log(f"done in {format_seconds(summary['seconds'])}: "
        + ("no steps taken" if val_loss is None else f"val loss {val_loss:.4f}")
        + ("" if val_loss is None else floors.done_suffix(val_loss, chars_per_token))
        + ("" if val_accuracy is None else f", masked tokens right {val_accuracy:.1%}")
        + f"; checkpoint in {cfg.out}")
    return summary
