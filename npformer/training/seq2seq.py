"""Training the encoder-decoder Transformer on a toy task: the loop behind ``npformer seq2seq``.

The paper's recipe (Vaswani et al., 2017, section 5): Adam with beta1 = 0.9, beta2 = 0.98,
eps = 1e-9; the learning rate

    lr(step) = lr_factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)

(linear warm-up, then inverse square root decay); label smoothing 0.1; dropout on every sub-layer
output and on the embeddings. The loss is the cross-entropy of tgt_out = y EOS given tgt_in = BOS y
(teacher forcing), padding ignored. Each step draws a fresh batch from the task's train split.

Evaluation decodes the task's held-out test split (sources the training never sees) and reports
exact match (the whole output, EOS included, right) and token accuracy (the share of target tokens
y_1 .. y_n EOS predicted right at their position), greedily and with beam search when beam_size > 1.
Weights come from a generator seeded with ``seed``, batches from ``seed + 1``, dropout from ``seed + 2``.

``arch`` picks the model: "transformer" (Seq2SeqTransformer, the paper's), "bart" / "t5" (the HF
models of models/bart.py and models/t5.py behind the same interface, models/seq2seq_arch.py), or
"rnn" (the recurrent encoder-decoder with attention of models/seq2seq_rnn.py); the loop, the
schedule, the loss, decoding and checkpoints are the same for all four.

With a communicator (``train(cfg, comm=...)``; ``mpiexec -n N npformer seq2seq``) every rank runs the
loop on its rows of each global batch and rank 0 alone locks ``out``, logs, evaluates and writes
(seq2seq_ranks.py, docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass

import numpy as np

from .. import backend, distributed, random
from ..data.tasks import BOS, EOS, PAD, TASKS, TaskTokenizer, get_task, make_batch
from ..models.decoding import beam_search
from ..models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from ..models.seq2seq_arch import ARCHS, TaskEncoderDecoder, hf_config
from ..models.seq2seq_rnn import RNNSeq2Seq, RNNSeq2SeqConfig
from ..nn import functional as F
from ..optim import Adam, noam, set_lr
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .progress import ProgressBar, format_seconds
from .rundir import RunDir, resume_check
from .attention_maps import save_attention_maps
from .seq2seq_ranks import rank_step, ranks_note, start_together, stop_signal, train_ranks
from .stopping import GracefulStop, Interrupted

# settings a resumed run must share with its checkpoint (the others, e.g. --max-iters, may change)
RESUME_FIELDS = ("task", "arch", "d_model", "nhead", "num_layers", "dim_feedforward", "dropout", "batch_size", "warmup",
                 "lr_factor", "label_smoothing", "seed")
# optimizer steps per task when --max-iters is not given (see docs/seq2seq.md for what they reach)
DEFAULT_ITERS = {"copy": 1200, "reverse": 1500, "numbers": 1500, "dates": 800, "summarize": 6000}
# --dropout when not given: the paper's 0.1, except where a task learns better without (summarize: 85.2%
# exact match after 6,000 steps with 0.1, 96.0% with 0; docs/summarization.md)
DEFAULT_DROPOUT = 0.1
TASK_DROPOUT = {"summarize": 0.0}


@dataclass(frozen=True)
class Seq2SeqTrainConfig:
    """Every setting of a training run (the ``npformer seq2seq`` flags, by the same names)."""
    task: str = "copy"
    arch: str = "transformer"           # or "bart", "t5" (models/seq2seq_arch.py), "rnn" (models/seq2seq_rnn.py)
    d_model: int = 64
    nhead: int = 4
    num_layers: int = 2                 # encoder layers and decoder layers, each
    dim_feedforward: int = 256
    dropout: float = None               # None: TASK_DROPOUT[task], else DEFAULT_DROPOUT
    batch_size: int = 64
    max_iters: int = None               # None: DEFAULT_ITERS[task]
    warmup: int = 200
    lr_factor: float = 0.5
    label_smoothing: float = 0.1
    beam_size: int = 1                  # > 1: also evaluate with beam search at the end
    length_penalty: float = 0.6
    n_test: int = 1000
    eval_interval: int = None           # None: only at the end
    seed: int = 1337
    device: str = None                  # None: NPFORMER_DEVICE, else cpu
    out: str = None                     # None: out-seq2seq-{task}
    attention_maps: bool = False
    resume: bool = False                # continue the run in out from its newest intact checkpoint
    keep: int = 2                       # checkpoints kept (the newest); 0: all

    def checked(self) -> "Seq2SeqTrainConfig":
        """Validate every field (ValueError naming the flag); fill in the defaults."""
        get_task(self.task)
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        if self.attention_maps and self.arch != "transformer":
            raise ValueError(f"--attention-maps draws the attention of --arch transformer; the {self.arch} "
                             f"layers do not return their attention weights")
        max_iters = DEFAULT_ITERS[self.task] if self.max_iters is None else self.max_iters
        dropout = TASK_DROPOUT.get(self.task, DEFAULT_DROPOUT) if self.dropout is None else self.dropout
        for name, v in (("d_model", self.d_model), ("nhead", self.nhead), ("num_layers", self.num_layers),
                        ("dim_feedforward", self.dim_feedforward), ("batch_size", self.batch_size),
                        ("max_iters", max_iters), ("warmup", self.warmup), ("beam_size", self.beam_size),
                        ("n_test", self.n_test)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer; got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0; got {self.seed!r}")
        if self.d_model % self.nhead:
            raise ValueError(f"--d-model ({self.d_model}) must be divisible by --nhead ({self.nhead})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1); got {dropout!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1); got {self.label_smoothing}")
        if not (self.lr_factor > 0 and math.isfinite(self.lr_factor)):
            raise ValueError(f"--lr-factor must be a positive number; got {self.lr_factor}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise ValueError(f"--keep must be >= 0 (0 keeps all); got {self.keep!r}")
        check_length_penalty(self.length_penalty)
        interval = max_iters if self.eval_interval is None else self.eval_interval
        if interval < 1:
            raise ValueError(f"--eval-interval must be a positive integer; got {interval}")
        device = self.device or backend.default_device()
        backend.check_device(device)
        return dataclasses.replace(self, max_iters=max_iters, dropout=float(dropout),
                                   eval_interval=interval, device=device,
                                   out=self.out or f"out-seq2seq-{self.task}")


def model_config(cfg: Seq2SeqTrainConfig, task) -> Seq2SeqConfig:
    """The model for a task: max_len fits the longest source and BOS + longest target + EOS."""
    return Seq2SeqConfig(src_vocab_size=len(task.src_chars) + 3, tgt_vocab_size=len(task.tgt_chars) + 3,
                         d_model=cfg.d_model, nhead=cfg.nhead, num_encoder_layers=cfg.num_layers,
                         num_decoder_layers=cfg.num_layers, dim_feedforward=cfg.dim_feedforward,
                         dropout=cfg.dropout, max_len=max(task.max_src_len, task.max_tgt_len + 2), pad_id=PAD)


def build_model(cfg: Seq2SeqTrainConfig, task, generator=None, device: str = None):
    """(model, meta): the model of cfg.arch for a task, and what a checkpoint stores to rebuild it
    ({"arch", "model_config"}: Seq2SeqConfig's fields, or the BartConfig / T5Config fields and max_len)."""
    mcfg = model_config(cfg, task)
    if cfg.arch == "transformer":
        return Seq2SeqTransformer(mcfg, generator=generator, device=device), {"arch": "transformer",
                                                                              "model_config": mcfg.to_dict()}
    if cfg.arch == "rnn":           # --nhead and --dim-feedforward do not apply
        rcfg = RNNSeq2SeqConfig(mcfg.src_vocab_size, mcfg.tgt_vocab_size, cfg.d_model, cfg.num_layers, cfg.dropout,
                                mcfg.max_len, PAD)
        return RNNSeq2Seq(rcfg, generator=generator, device=device), {"arch": "rnn", "model_config": rcfg.to_dict()}
    hf = hf_config(cfg.arch, 3 + len(set(task.src_chars) | set(task.tgt_chars)), cfg.d_model, cfg.nhead,
                   cfg.num_layers, cfg.dim_feedforward, cfg.dropout, mcfg.max_len, PAD, BOS, EOS)
    model = TaskEncoderDecoder(cfg.arch, hf, task.src_chars, task.tgt_chars, mcfg.max_len, generator=generator,
                               device=device)
    return model, {"arch": cfg.arch, "model_config": {**hf, "max_len": mcfg.max_len}}


def model_device(model) -> str:
    """The device of a model's weights."""
    return model.parameters()[0].device


def loss_fn(model, src, tgt_in, tgt_out, label_smoothing: float):
    """Mean label-smoothed cross-entropy over the non-pad target tokens; arrays on the model's device."""
    logits = model(src, tgt_in)                                              # (B, T, V)
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V), tgt_out.reshape(B * T), ignore_index=PAD,
                           label_smoothing=label_smoothing)


def decode(model, tok: TaskTokenizer, src, beam_size: int = 1, length_penalty: float = 0.6) -> np.ndarray:
    """(B, 1 + n) host token ids for (B, S) host source ids: greedy (beam_size 1) or beam search."""
    src = backend.to_device(src, model_device(model))
    n = model.config.max_len - 1
    if beam_size == 1:
        return model.greedy_decode(src, BOS, n, eos_id=EOS)
    return beam_search(model, src, BOS, EOS, beam_size=beam_size, length_penalty=length_penalty,
                       max_new_tokens=n)[0]


def match_counts(pred, tgt_out) -> tuple:
    """(exact rows, right tokens, target tokens) of predictions pred (B, n) against tgt_out (B, T).

    Both are y EOS then PAD; pred is cut or PAD-extended to T. A token is right when it equals the
    target at its position; a row is exact when all its target tokens (EOS included) are right.
    """
    T = tgt_out.shape[1]
    pred = np.pad(pred, ((0, 0), (0, max(0, T - pred.shape[1]))), constant_values=PAD)[:, :T]
    real = tgt_out != PAD
    hit = (pred == tgt_out) & real
    return int((hit.sum(axis=1) == real.sum(axis=1)).sum()), int(hit.sum()), int(real.sum())


def evaluate(model, tok, pairs, beam_size: int = 1, length_penalty: float = 0.6, batch_size: int = 250) -> dict:
    """{"exact_match", "token_accuracy", "n"} over (source, target) pairs; fractions in [0, 1].

    For the summarize task also "rouge1", "rouge2", "rougeL": the mean F-measure of the decoded texts
    against the targets (data.summarize.rouge_scores, by rouge-score); when rouge-score is not
    installed, "rouge_skipped" says how to install it instead.
    """
    exact, correct, total, outputs = 0, 0, 0, []
    for i in range(0, len(pairs), batch_size):
        src, _, tgt_out = make_batch(tok, pairs[i:i + batch_size])
        pred = decode(model, tok, src, beam_size, length_penalty)[:, 1:]                       # drop BOS
        counts = match_counts(pred, tgt_out)
        exact, correct, total = exact + counts[0], correct + counts[1], total + counts[2]
        if tok.task == "summarize":
            outputs += [tok.decode(row) for row in pred]
    results = {"exact_match": exact / len(pairs), "token_accuracy": correct / total, "n": len(pairs)}
    if tok.task == "summarize":
        from ..data.summarize import rouge_scores
        try:
            results.update(rouge_scores([t for _, t in pairs], outputs))
        except ImportError as exc:
            results["rouge_skipped"] = str(exc)
    return results


def train(cfg: Seq2SeqTrainConfig, log=print, comm=None) -> dict:
    """Train (or, with cfg.resume, continue), evaluate and checkpoint one run; return a summary dict.

    comm: a communicator (npformer.distributed) to train over its ranks, each on its rows of every
    --batch-size batch (seq2seq_ranks.py); rank 0 alone locks cfg.out, logs and writes. None: this
    process alone."""
    if comm is not None:
        return train_ranks(cfg, log, comm)
    cfg = cfg.checked()
    with RunDir.claim(cfg.out, "seq2seq", resume=cfg.resume):
        return _train(cfg, log)


def _train(cfg: Seq2SeqTrainConfig, log, comm=None) -> dict:
    root = comm is None or comm.rank == 0
    ckpt = distributed.resume_point(cfg.out, comm, resume_check(cfg, "train_config", RESUME_FIELDS, log)) \
        if cfg.resume else None
    task = get_task(cfg.task)
    tok = TaskTokenizer.for_task(task)
    with distributed.stage(comm):
        test_pairs = task.test_set(cfg.n_test, seed=cfg.seed + 3) if root else []  # rank 0 evaluates
    model, model_meta = build_model(cfg, task, generator=np.random.default_rng(cfg.seed), device=cfg.device)
    opt = Adam(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)
    batch_rng = np.random.default_rng(cfg.seed + 1)
    dropout_rng = backend.default_rng(cfg.seed + 2, cfg.device)
    start, train_seconds, results = 0, 0.0, {}
    ranks = 1 if comm is None else comm.size
    if ckpt:
        with distributed.stage(comm):
            model.load_state_dict(ckpt.model_state)
            opt.load_state_dict(ckpt.optimizer_state)
            run = ckpt.meta["run"]
            start, train_seconds, results = int(run["step"]), float(run["train_seconds"]), ckpt.meta["results"]
            backend.set_generator_state(batch_rng, run["batch_rng"])
            backend.set_generator_state(dropout_rng, run["dropout_rng"])
        log(f"resuming from {ckpt.path} at step {start}" + ranks_note(ckpt.meta.get("ranks", 1), ranks))
    if comm is not None:                    # every rank the same run, from the same weights
        start_together(comm, model, opt, {"step": start, "config": dataclasses.asdict(cfg), "task": [
            cfg.task, tok.src_vocab_size, tok.tgt_vocab_size, task.max_src_len]})
    arch = "" if cfg.arch == "transformer" else f"{cfg.arch} "
    log(f"task {cfg.task}: {arch}{model.num_parameters() / 1e6:.2f}M parameters, vocab {tok.src_vocab_size} -> "
        f"{tok.tgt_vocab_size}, max_len {model.config.max_len}, {len(test_pairs)} held-out test examples, device {cfg.device}"
        + ("" if comm is None else f"; {ranks} ranks ({comm.name}), {cfg.batch_size // ranks} rows each of the "
                                   f"global batch of {cfg.batch_size}"))

    def save(step, results):
        meta = {"model": "seq2seq", **model_meta, "train_config": dataclasses.asdict(cfg), "ranks": ranks,
                "task": cfg.task, "max_src_len": task.max_src_len, "results": results,
                "run": {"step": step, "train_seconds": train_seconds, "batch_rng": backend.generator_state(batch_rng),
                        "dropout_rng": backend.generator_state(dropout_rng)}}
        host = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
        opt_state = {k: (backend.to_numpy(v) if backend.is_array(v) else v) for k, v in opt.state_dict().items()}
        save_checkpoint(cfg.out, step, host, opt_state, tok, meta, keep=cfg.keep)

    quiet = None if root else io.StringIO()     # what ranks other than 0 would print goes nowhere
    bar = ProgressBar(cfg.max_iters, start=start, stream=quiet)
    last_saved = start if ckpt else None
    model.train()
    # dropout draws from dropout_rng on this thread for the loop only; a signal saves the last step
    with random.thread_default_generator(dropout_rng, cfg.device), GracefulStop(quiet) as stop:
        for step in range(start + 1, cfg.max_iters + 1):
            t0 = time.perf_counter()
            lr = noam(step, cfg.d_model, cfg.warmup, cfg.lr_factor)
            set_lr(opt, lr)
            batch = make_batch(tok, task.batch(batch_rng, cfg.batch_size))       # (B, S), (B, T), (B, T)
            if comm is None:
                src, tgt_in, tgt_out = (backend.to_device(a, cfg.device) for a in batch)
                loss = loss_fn(model, src, tgt_in, tgt_out, cfg.label_smoothing)
                loss.backward()
                value = loss.item()
            else:                               # this rank's rows; every rank gets the whole batch's gradient
                value = rank_step(model, batch, cfg.label_smoothing, comm, cfg.device)
            opt.step()
            opt.zero_grad()
            train_seconds += time.perf_counter() - t0
            if not math.isfinite(value):
                error = FloatingPointError(f"training loss became {value} at step {step} (try a lower --lr-factor)")
                raise error if comm is None else distributed.on_all_ranks(error)   # the same loss on all
            bar.update(step, value, lr, int((batch[2] != PAD).sum()))
            if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not root:
                last_saved = step                   # rank 0 evaluates and saves; the others go on
            elif step % cfg.eval_interval == 0 or step == cfg.max_iters:
                results = {"step": step, "loss": value, "train_seconds": round(train_seconds, 3),
                           "greedy": evaluate(model, tok, test_pairs)}
                if cfg.beam_size > 1 and step == cfg.max_iters:
                    results["beam"] = {"beam_size": cfg.beam_size, **evaluate(model, tok, test_pairs, cfg.beam_size,
                                                                             cfg.length_penalty)}
                bar.message(f"step {step}: " + "; ".join(
                    f"{k} exact match {100 * r['exact_match']:.1f}%, token accuracy {100 * r['token_accuracy']:.2f}%"
                    + "".join(f", {m} {100 * r[m]:.2f}" for m in ("rouge1", "rouge2", "rougeL") if m in r)
                    + (f" ({r['rouge_skipped']})" if "rouge_skipped" in r else "")
                    for k, r in results.items() if isinstance(r, dict)))
                save(step, results)
                last_saved = step
            signum = stop_signal(stop, comm)    # with ranks: agreed, so all stop at this step
            if signum is not None:
                if last_saved != step and root:
                    save(step, results)
                raise Interrupted(signum, step, cfg.out)
    if not root:                                # rank 0 shows examples and writes the maps
        return {"task": cfg.task, "steps": cfg.max_iters, **results, "out": cfg.out}
    model.eval()
    for src_text, tgt_text in test_pairs[:3]:
        got = tok.decode(decode(model, tok, make_batch(tok, [(src_text, tgt_text)])[0])[0, 1:])
        log(f"  {src_text!r} -> {got!r} ({'right' if got == tgt_text else 'expected ' + repr(tgt_text)})")
    if cfg.attention_maps:
        example = max(test_pairs[:50], key=lambda p: len(p[0]))[0]           # a long source shows more
        paths = save_attention_maps(model, tok, example, cfg.out)
        for path in paths:
            log(f"attention map: {path}")
        if not paths:
            log("no attention maps: matplotlib is not installed (pip install matplotlib)")
    log(f"done: {cfg.max_iters} steps in {format_seconds(train_seconds)} of training; checkpoint in {cfg.out}")
    return {"task": cfg.task, "steps": cfg.max_iters, **results, "out": cfg.out}


def check_length_penalty(alpha: float) -> None:
    """ValueError unless alpha is finite: nan scores every hypothesis nan (none ever finishes, the output
    is empty) and inf scores every one longer than a token 0, so the search ends on an arbitrary one.
    Any finite alpha is meaningful (negative favours short outputs) and keeps the search exact."""
    if not math.isfinite(alpha):
        raise ValueError(f"--length-penalty must be a finite number; got {alpha}")


def translate(model, tok, meta: dict, text: str, beam_size: int = 1, length_penalty: float = 0.6) -> str:
    """The model's output text for one source text; ValueError for an input it cannot take."""
    check_length_penalty(length_penalty)
    if not text:
        raise ValueError("the input text is empty")
    if tok.task in TASKS:
        text = get_task(tok.task).parse_source(text)
    limit = min(int(meta.get("max_src_len", model.config.max_len)), model.config.max_len)
    if len(text) > limit:
        raise ValueError(f"the input has {len(text)} characters; this {meta.get('task', 'seq2seq')} model takes "
                         f"at most {limit}")
    try:
        src = tok.encode(text)
    except ValueError as exc:
        raise ValueError(f"the input has {exc} (task {tok.task})") from None
    return tok.decode(decode(model, tok, src[None], beam_size, length_penalty)[0, 1:])


def load_seq2seq(path: str, device: str = None):
    """(model in eval mode, TaskTokenizer, meta) from a ``npformer seq2seq`` run or checkpoint directory
    (any --arch: meta["arch"], "transformer" for runs that predate the flag)."""
    ckpt = load_checkpoint(path)
    if ckpt.meta.get("model") != "seq2seq" or not isinstance(ckpt.tokenizer, TaskTokenizer):
        raise CheckpointError(f"{ckpt.path} holds a {ckpt.meta.get('model')!r} model, not a seq2seq task model")
    arch, tok = ckpt.meta.get("arch", "transformer"), ckpt.tokenizer
    device = device or backend.default_device()
    try:
        if arch in ("transformer", "rnn"):
            config = (Seq2SeqConfig if arch == "transformer" else RNNSeq2SeqConfig)(**ckpt.meta["model_config"])
            sizes = (config.src_vocab_size, config.tgt_vocab_size)
        elif arch in ARCHS:
            hf = dict(ckpt.meta["model_config"])
            max_len = hf.pop("max_len")
        else:
            raise ValueError(f"unknown arch {arch!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: model_config is invalid ({exc})") from None
    if arch in ("bart", "t5"):
        try:
            model = TaskEncoderDecoder(arch, hf, tok.src.chars, tok.tgt.chars, max_len, device=device)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{ckpt.path}: the {arch} model cannot be built from its model_config and "
                                  f"tokenizer ({exc})") from None
        sizes = (model.config.src_vocab_size, model.config.tgt_vocab_size)
    if sizes != (tok.src_vocab_size, tok.tgt_vocab_size):
        raise CheckpointError(f"{ckpt.path}: the model's vocabularies {sizes} do not match its tokenizer's "
                              f"({tok.src_vocab_size}, {tok.tgt_vocab_size})")
    if arch in ("transformer", "rnn"):
        model = (Seq2SeqTransformer if arch == "transformer" else RNNSeq2Seq)(config, device=device)
    try:
        model.load_state_dict(ckpt.model_state)
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path}: weights do not fit the config ({exc})") from None
    return model.eval(), tok, ckpt.meta
