"""Recurrent against Transformer language models, on the same data and budget: the survey's two claims measured.

    python benchmarks/rnn_vs_transformer.py --plot-prefix docs/rnn_vs_transformer   # docs/rnn-vs-transformer.md
    python benchmarks/rnn_vs_transformer.py --quick                                # a tiny run, for the tests

The claims (issue 16): the RNN "has memory and captures long-range dependencies"; the Transformer
"abandons the recurrent structure and processes the sequence in parallel". Four measurements:

    lm         an LSTM, a GRU (npformer.models.rnn_lm.RNNLM, as `npformer pretrain --model lstm|gru` builds it)
               and a GPT (npformer.models.GPT) of equal parameter counts (SIZES), char-level, trained
               interleaved (one step of each in turn, on the same batch) on the built-in toy language
               and on tiny Shakespeare: validation loss against steps and against training seconds
    positions  (run with lm) the loss at each position t of 128-character validation windows, each run from a zero
               state / a fresh context, against the toy language's best loss with t + 1 characters
               of context (ToyLanguage.windowed_loss, estimated on --floor-windows random windows; its mean,
               floor(128), is context_floor(128) on more windows)
    speed      training tokens per second (forward, backward, clip, AdamW) against the sequence length
               at a fixed number of tokens per batch, the three models interleaved
    seq2seq    seconds per training step of `npformer seq2seq --arch rnn` against the default Transformer
               on every task, at the command's default settings, the two interleaved on the same batches

Training follows `npformer pretrain`'s defaults: block 128, batch 16, AdamW lr 2e-3 with warm-up
min(100, steps // 10) and a cosine decay to 2e-4, betas (0.9, 0.99), weight decay 0.1 on matrices,
clip 1.0, no dropout. Step times are each model's own forward + backward + optimizer step, measured
within the same round as the others', so a change in the machine's load reaches all of them; ratios
are medians of the per-step ratios. Prints markdown tables (stdout) and progress (stderr); with
--plot-prefix P writes P_lm.png, P_positions.png and P_speed.png when matplotlib is installed.
BLAS runs on --threads threads (1 by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import numpy as np

from npformer import backend, cpu, nn, no_grad, random
from npformer.autograd import Node
from npformer.data import BatchSampler, CharTokenizer, ToyLanguage, default_corpus, load_text
from npformer.data.tasks import TaskTokenizer, get_task, make_batch
from npformer.models import GPT, GPTConfig
from npformer.models.rnn_lm import RNNLM, RNNLMConfig
from npformer.nn import functional as F
from npformer.optim import Adam, AdamW, clip_grad_norm, noam, set_lr, warmup_cosine, weight_decay_groups
from npformer.training.seq2seq import DEFAULT_ITERS, Seq2SeqTrainConfig, build_model, loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"))
MODELS = ("lstm", "gru", "gpt")
# Equal parameter counts: every parameter counted once (tied embeddings once, GPT's position table
# included); within PARAM_TOLERANCE of each other for vocabularies of 32 (toy) and 65 (Shakespeare) characters.
SIZES = {"lstm": dict(n_layer=2, n_embd=128),               # 16 C^2 + 16 C + V C + V      = 268,320 at V = 32
         "gru": dict(n_layer=2, n_embd=148),                # 12 C^2 + 12 C + V C + V      = 269,392
         "gpt": dict(n_layer=3, n_embd=84, n_head=4)}       # L (12 C^2 + 13 C) + V C + 128 C + 2 C = 270,900
PARAM_TOLERANCE = 0.02                                      # max / min - 1
TABLE_POSITIONS = (0, 1, 2, 4, 8, 16, 32, 64, 127)
BANDS = ((16, 32), (32, 64), (64, 128))                     # [a, b) position ranges, averaged
LR = 2e-3


def build_lm(kind: str, vocab_size: int, block_size: int, seed: int):
    """The model `npformer pretrain --model kind` builds, at SIZES[kind], weights from default_rng(seed)."""
    rng = np.random.default_rng(seed)
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, **SIZES["gpt"]), generator=rng)
    return RNNLM(RNNLMConfig(vocab_size=vocab_size, block_size=block_size, cell=kind, **SIZES[kind]), generator=rng)


def n_params(model) -> int:
    """Every parameter once (nn.Module's count: GPT's own leaves out the position table)."""
    return nn.Module.num_parameters(model)


def param_spread(counts) -> float:
    """max / min - 1 of parameter counts."""
    return max(counts) / min(counts) - 1


def ops_recorded(loss) -> Counter:
    """How many times each op was recorded in the graph behind `loss` (one forward pass)."""
    seen, stack, count = set(), [loss._node], Counter()
    while stack:
        node = stack.pop()
        if isinstance(node, Node) and id(node) not in seen:
            seen.add(id(node))
            count[node.op] += 1
            stack.extend(node.parents)
    return count


def train_step(model, opt, x, y, lr: float, count_ops: bool = False) -> tuple:
    """One AdamW step on (x, y). Returns (loss, seconds, ops recorded in the forward or None); counting
    the ops happens inside the timed span, so only untimed (warm-up) steps should ask for it."""
    t0 = time.perf_counter()
    set_lr(opt, lr)
    _, loss = model(x, y)
    n_ops = sum(ops_recorded(loss).values()) if count_ops else None
    loss.backward()
    clip_grad_norm(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    value = loss.item()
    return value, time.perf_counter() - t0, n_ops


def adamw(model):
    """`npformer pretrain`'s optimizer: AdamW, weight decay 0.1 on matrices only, betas (0.9, 0.99)."""
    return AdamW(weight_decay_groups(model.named_parameters(), 0.1), lr=LR, betas=(0.9, 0.99))


def rotated(names, step: int) -> list:
    """names in turn, starting one further each step, so that no model always runs first."""
    k = step % len(names)
    return list(names[k:]) + list(names[:k])


def windows(ids, T: int, n: int, stride: int) -> tuple:
    """(x, y), each (n', T): validation windows starting every `stride` tokens, n' = as many of n as fit."""
    n = min(n, (len(ids) - T - 1) // stride + 1)
    idx = np.arange(n)[:, None] * stride + np.arange(T)[None, :]              # (n, T)
    return ids[idx], ids[idx + 1]


def window_losses(model, x, y, rows: int = 64) -> np.ndarray:
    """(n, T) per-token losses; every window is run on its own from a zero state / a fresh context."""
    out = []
    model.eval()
    with no_grad():
        for a in range(0, len(x), rows):
            logits, _ = model(x[a:a + rows])                                  # (b, T, V)
            b, T, V = logits.shape
            loss = F.cross_entropy(logits.reshape(b * T, V), y[a:a + rows].reshape(b * T), reduction="none")
            out.append(loss.data.reshape(b, T))
    model.train()
    return np.concatenate(out)


def train_lm(corpus: str, train_ids, val_ids, vocab_size: int, args) -> dict:
    """Train the three models interleaved; {name: {params, step_s, curve [(step, seconds, val)], losses}}."""
    T = args.block_size
    models = {k: build_lm(k, vocab_size, T, args.seed) for k in MODELS}
    opts = {k: adamw(m) for k, m in models.items()}
    out = {k: {"params": n_params(m), "step_s": [], "seconds": 0.0, "curve": []} for k, m in models.items()}
    sampler = BatchSampler(train_ids, T, args.batch_size, seed=args.seed + 1)
    curve_x, curve_y = windows(val_ids, T, args.curve_windows, T)
    warmup = min(100, args.steps // 10)

    def evaluate(step):
        for k, m in models.items():
            out[k]["curve"].append((step, out[k]["seconds"], float(window_losses(m, curve_x, curve_y).mean())))
        print(f"  {corpus} step {step}/{args.steps}: " + ", ".join(
            f"{k} val {out[k]['curve'][-1][2]:.4f} ({out[k]['seconds']:.0f} s)" for k in MODELS),
            file=sys.stderr, flush=True)

    evaluate(0)
    for step in range(args.steps):
        lr = warmup_cosine(step, LR, LR / 10, warmup, args.steps)
        x, y = sampler.sample()                                               # (B, T) each, shared
        for k in rotated(MODELS, step):
            _, seconds, _ = train_step(models[k], opts[k], x, y, lr)
            out[k]["step_s"].append(seconds)
            out[k]["seconds"] += seconds
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            evaluate(step + 1)
    px, py = windows(val_ids, T, args.position_windows, args.position_stride)
    for k, m in models.items():
        out[k]["losses"] = window_losses(m, px, py)                           # (n, T)
    return out


def ratio_to(results: dict, k: str, ref: str) -> float:
    """Median over steps of k's step time / ref's step time in the same round."""
    return float(np.median(np.array(results[k]["step_s"]) / np.array(results[ref]["step_s"])))


def lm_tables(corpus: str, results: dict, steps: int, floor=None, rate=None) -> str:
    """The summary table and the curve table of one corpus."""
    cols = ["model", "params", "median s/step", "step time / GPT's", "train (s)", "val loss"]
    if floor is not None:
        T = results["lstm"]["losses"].shape[1]
        cols += [f"gap to floor({T}) = {floor:.4f}", f"gap to entropy rate {rate:.4f}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for k in MODELS:
        r = results[k]
        loss = r["losses"].mean()
        cells = [k, f"{r['params']:,}", f"{np.median(r['step_s']):.3f}", f"{ratio_to(results, k, 'gpt'):.2f}",
                 f"{r['seconds']:.1f}", f"{loss:.4f}"]
        if floor is not None:
            cells += [f"{100 * (loss / floor - 1):+.1f}%", f"{100 * (loss / rate - 1):+.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    head = "| step | " + " | ".join(f"{k} val | {k} train s" for k in MODELS) + " |"
    curve = [head, "|" + " --- |" * (1 + 2 * len(MODELS))]
    for i, (step, _, _) in enumerate(results["lstm"]["curve"]):
        curve.append(f"| {step} | " + " | ".join(
            f"{results[k]['curve'][i][2]:.4f} | {results[k]['curve'][i][1]:.1f}" for k in MODELS) + " |")
    spread = param_spread([results[k]["params"] for k in MODELS])
    return (f"### {corpus}: after {steps} steps\n\n" + "\n".join(lines)
            + f"\n\nparameter spread (max / min - 1): {100 * spread:.2f}%\n\n"
            + f"### {corpus}: validation loss during training (seconds: the model's own training steps)\n\n"
            + "\n".join(curve))


def position_table(corpus: str, results: dict, floor_curve=None) -> str:
    """Loss at single positions and averaged over bands of positions, per model (and the floor)."""
    T = results["lstm"]["losses"].shape[1]
    means = {k: results[k]["losses"].mean(0) for k in MODELS}                 # (T,)
    cols = ["position t (t + 1 characters seen)"] + (["floor"] if floor_curve is not None else [])
    cols += [c for k in MODELS for c in ((k, "gap") if floor_curve is not None else (k,))]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    rows = [(str(t), slice(t, t + 1)) for t in TABLE_POSITIONS if t < T]
    rows += [(f"mean of {a}..{b - 1}", slice(a, b)) for a, b in BANDS if b <= T]
    rows += [(f"mean of all {T}", slice(0, T))]
    for label, s in rows:
        cells = [label]
        if floor_curve is not None:
            f = floor_curve[s].mean()
            cells.append(f"{f:.4f}")
        for k in MODELS:
            v = means[k][s].mean()
            cells += [f"{v:.4f}"] + ([f"{100 * (v / f - 1):+.1f}%"] if floor_curve is not None else [])
        lines.append("| " + " | ".join(cells) + " |")
    n = len(results["lstm"]["losses"])
    se = [results[k]["losses"][:, t].std() / np.sqrt(n) for k in MODELS for t in range(T)]
    return (f"### {corpus}: loss at each position of {n} validation windows of {T}\n\n" + "\n".join(lines)
            + f"\n\nstandard error of a single position's loss: {min(se):.4f} to {max(se):.4f} nats/char")


def speed(train_ids, vocab_size: int, args) -> list:
    """Rows (T, B, {model: (tokens/s, ops per forward, step times)}) at args.speed_tokens tokens a batch."""
    models = {k: build_lm(k, vocab_size, max(args.speed_lengths), args.seed) for k in MODELS}
    opts = {k: adamw(m) for k, m in models.items()}
    rows = []
    for T in args.speed_lengths:
        B = max(1, args.speed_tokens // T)
        sampler = BatchSampler(train_ids, T, B, seed=args.seed + 2)
        times, n_ops = {k: [] for k in MODELS}, {}
        for step in range(args.speed_warmup + args.speed_steps):
            x, y = sampler.sample()
            for k in rotated(MODELS, step):
                _, seconds, ops = train_step(models[k], opts[k], x, y, 1e-4, count_ops=step == 0)
                if step == 0:
                    n_ops[k] = ops
                if step >= args.speed_warmup:
                    times[k].append(seconds)
        rows.append((T, B, {k: (B * T / np.median(times[k]), n_ops[k], times[k]) for k in MODELS}))
        print(f"  speed T={T} B={B}: " + ", ".join(f"{k} {rows[-1][2][k][0]:,.0f} tokens/s" for k in MODELS),
              file=sys.stderr, flush=True)
    return rows


def speed_table(rows: list, params: dict) -> str:
    cols = ["T", "B"] + [f"{k} tokens/s" for k in MODELS] + [f"GPT / {k}" for k in MODELS[:2]] \
        + [f"{k} ops per forward" for k in MODELS]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for T, B, r in rows:
        ratios = [np.median(np.array(r[k][2]) / np.array(r["gpt"][2])) for k in MODELS[:2]]
        lines.append(f"| {T} | {B} | " + " | ".join(f"{r[k][0]:,.0f}" for k in MODELS) + " | "
                     + " | ".join(f"{q:.2f}" for q in ratios) + " | "
                     + " | ".join(f"{r[k][1]:,}" for k in MODELS) + " |")
    return ("### training speed at a fixed number of tokens per batch\n\n" + "\n".join(lines)
            + "\n\nparams: " + ", ".join(f"{k} {v:,}" for k, v in params.items())
            + " (GPT: its position table has a row for every position up to the longest T)")


def seq2seq_times(args) -> list:
    """Rows (task, {arch: (params, step times)}, batch times), at `npformer seq2seq`'s default settings."""
    rows = []
    for name in args.tasks:
        task = get_task(name)
        tok = TaskTokenizer.for_task(task)
        runs = {}
        for arch in ("transformer", "rnn"):
            cfg = Seq2SeqTrainConfig(task=name, arch=arch).checked()
            model, _ = build_model(cfg, task, generator=np.random.default_rng(cfg.seed), device=cfg.device)
            opt = Adam(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)
            runs[arch] = (cfg, model.train(), opt, [])
        cfg = runs["transformer"][0]
        batch_rng = np.random.default_rng(cfg.seed + 1)
        batch_s = []
        with random.thread_default_generator(backend.default_rng(cfg.seed + 2, cfg.device), cfg.device):
            for step in range(1, args.seq2seq_warmup + args.seq2seq_steps + 1):
                t0 = time.perf_counter()
                src, tgt_in, tgt_out = make_batch(tok, task.batch(batch_rng, cfg.batch_size))   # shared
                batch_s.append(time.perf_counter() - t0)
                for arch in rotated(("transformer", "rnn"), step):
                    cfg_a, model, opt, times = runs[arch]
                    t0 = time.perf_counter()
                    set_lr(opt, noam(step, cfg_a.d_model, cfg_a.warmup, cfg_a.lr_factor))
                    loss = loss_fn(model, src, tgt_in, tgt_out, cfg_a.label_smoothing)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    loss.item()
                    if step > args.seq2seq_warmup:
                        times.append(time.perf_counter() - t0)
        rows.append((name, {a: (r[1].num_parameters(), r[3]) for a, r in runs.items()},
                     batch_s[args.seq2seq_warmup:]))
        print(f"  seq2seq {name}: " + ", ".join(f"{a} {np.median(r[3]):.3f} s/step" for a, r in runs.items()),
              file=sys.stderr, flush=True)
    return rows


def seq2seq_table(rows: list) -> str:
    cols = ["task", "steps (DEFAULT_ITERS)", "transformer params", "rnn params", "transformer s/step", "rnn s/step",
            "rnn / transformer", "batch s/step", "transformer implied train (s)", "rnn implied train (s)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name, r, batch_s in rows:
        (pt, tt), (pr, tr) = r["transformer"], r["rnn"]
        steps, b = DEFAULT_ITERS[name], float(np.median(batch_s))
        mt, mr = float(np.median(tt)), float(np.median(tr))
        lines.append(f"| {name} | {steps} | {pt:,} | {pr:,} | {mt:.4f} | {mr:.4f} | "
                     f"{np.median(np.array(tr) / np.array(tt)):.2f} | {b:.4f} | {(mt + b) * steps:.0f} | "
                     f"{(mr + b) * steps:.0f} |")
    return ("### seq2seq: seconds per training step at the default settings\n\n" + "\n".join(lines)
            + "\n\nimplied train = (model s/step + batch s/step) x steps, what `npformer seq2seq` counts as "
              "training time")


def load_corpora(args) -> list:
    """[(name, train_ids, val_ids, vocab_size, ToyLanguage or None)]; Shakespeare only when the file exists."""
    train_text, val_text = default_corpus(*((100_000, 20_000) if args.quick else ()))
    tok = CharTokenizer(train_text + val_text)
    out = [("built-in toy language", tok.encode(train_text), tok.encode(val_text), tok.vocab_size, ToyLanguage(seed=0))]
    if not os.path.exists(args.shakespeare):
        msg = f"tiny Shakespeare: skipped, {args.shakespeare} not found"
        print(msg, file=sys.stderr)
        print(f"{msg}\n")
        return out
    text = load_text(args.shakespeare)[:100_000 if args.quick else None]
    n_val = max(1, len(text) // 10)                                            # pretrain's split: the last tenth
    tok = CharTokenizer(text)
    out.append(("tiny Shakespeare", tok.encode(text[:-n_val]), tok.encode(text[-n_val:]), tok.vocab_size, None))
    return out


def run(args) -> None:
    t_start = time.perf_counter()
    print(f"{os.cpu_count()} CPUs, BLAS threads {args.threads}, load average at start "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; seed {args.seed}; sizes {SIZES}\n")
    lm, speed_rows, s2s_rows = [], None, None
    corpora = load_corpora(args) if {"lm", "speed"} & set(args.sections) else []
    if "lm" in args.sections:
        for name, train_ids, val_ids, V, lang in corpora:
            print(f"{name}: {len(train_ids):,} training and {len(val_ids):,} validation characters, vocab {V}; "
                  f"{args.steps} steps of {args.batch_size} x {args.block_size}", file=sys.stderr, flush=True)
            results = train_lm(name, train_ids, val_ids, V, args)
            floor_curve = floor = rate = None
            if lang is not None:
                floor_curve = lang.windowed_loss(args.block_size, n_windows=args.floor_windows)   # (T,)
                floor, rate = float(floor_curve.mean()), lang.entropy_rate()
            lm.append((name, results, floor_curve, rate))
            print(lm_tables(name, results, args.steps, floor, rate) + "\n")
            print(position_table(name, results, floor_curve) + "\n")
            print(f"load average now {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
                  f"{time.perf_counter() - t_start:.0f} s so far\n", flush=True)
    if "speed" in args.sections:
        speed_rows = speed(corpora[0][1], corpora[0][3], args)
        params = {k: n_params(build_lm(k, corpora[0][3], max(args.speed_lengths), args.seed)) for k in MODELS}
        print(speed_table(speed_rows, params) + "\n")
    if "seq2seq" in args.sections:
        s2s_rows = seq2seq_times(args)
        print(seq2seq_table(s2s_rows) + "\n")
    print(f"load average at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
          f"total time {time.perf_counter() - t_start:.0f} s")
    if args.plot_prefix:
        plot(args.plot_prefix, lm, speed_rows)


def plot(prefix: str, lm: list, speed_rows) -> None:
    """prefix_lm.png (val loss against steps and seconds), prefix_positions.png, prefix_speed.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plots written to {prefix}_*.png", file=sys.stderr)
        return
    colors = dict(zip(MODELS, ("tab:blue", "tab:orange", "tab:green")))
    if lm:
        fig, axes = plt.subplots(len(lm), 2, figsize=(12, 4.2 * len(lm)), squeeze=False)
        for (name, res, floor_curve, rate), (ax1, ax2) in zip(lm, axes):
            for k in MODELS:
                steps, secs, vals = zip(*res[k]["curve"])
                label = f"{k} ({res[k]['params']:,} params)"
                ax1.plot(steps, vals, "o-", ms=3, color=colors[k], label=label)
                ax2.plot(secs, vals, "o-", ms=3, color=colors[k], label=label)
            for ax in (ax1, ax2):
                if floor_curve is not None:
                    ax.axhline(rate, color="k", ls="--", lw=1, label=f"entropy rate {rate:.4f}")
                    ax.axhline(floor_curve.mean(), color="grey", ls=":", lw=1,
                               label=f"context floor (T={len(floor_curve)}) {floor_curve.mean():.4f}")
                values = [v for k in MODELS for _, _, v in res[k]["curve"]]
                low = min(values + ([rate] if rate is not None else []))
                _log_axis(ax, 0.95 * low, 1.05 * max(values))
                ax.set(ylabel="val loss (nats/char)")
                ax.legend(fontsize=8)
                ax.grid(alpha=0.3, which="both")
            ax1.set(xlabel="training step", title=f"{name}: val loss against steps")
            ax2.set(xlabel="cumulative training seconds (the model's own steps)",
                    title=f"{name}: val loss against training time")
        _save(fig, f"{prefix}_lm.png")
        fig, axes = plt.subplots(1, len(lm), figsize=(6.5 * len(lm), 4.5), squeeze=False)
        for (name, res, floor_curve, _), ax in zip(lm, axes[0]):
            T = res["lstm"]["losses"].shape[1]
            for k in MODELS:
                ax.plot(np.arange(1, T + 1), res[k]["losses"].mean(0), color=colors[k], lw=1.2, label=k)
            curves = [res[k]["losses"].mean(0) for k in MODELS]
            if floor_curve is not None:
                ax.plot(np.arange(1, T + 1), floor_curve, "k--", lw=1, label="floor (best possible)")
                curves.append(np.percentile(floor_curve, [5, 100]))      # a Monte-Carlo dip need not stretch the axis
            _log_axis(ax, 0.9 * min(c.min() for c in curves), 1.1 * max(c.max() for c in curves))
            ax.set(xscale="log", xlabel="characters of context seen (position t + 1)",
                   ylabel="val loss (nats/char)", title=f"{name}: loss at each position of a {T}-character window")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, which="both")
        _save(fig, f"{prefix}_positions.png")
    if speed_rows:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        Ts = [T for T, _, _ in speed_rows]
        for k in MODELS:
            ax1.plot(Ts, [r[k][0] for _, _, r in speed_rows], "o-", color=colors[k], label=k)
        for k in MODELS[:2]:
            ax2.plot(Ts, [np.median(np.array(r[k][2]) / np.array(r["gpt"][2])) for _, _, r in speed_rows], "o-",
                     color=colors[k], label=f"GPT tokens/s / {k} tokens/s")
        B_T = speed_rows[0][0] * speed_rows[0][1]
        ax1.set(xscale="log", ylim=(0, None), xlabel="sequence length T", ylabel="training tokens / s",
                title=f"training throughput, {B_T} tokens per batch")
        ax2.set(xscale="log", xlabel="sequence length T", ylabel="ratio", ylim=(0, None),
                title="how many times faster the GPT trains")
        for ax in (ax1, ax2):
            ax.set_xticks(Ts, [str(T) for T in Ts])
            ax.minorticks_off()
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        _save(fig, f"{prefix}_speed.png")


def _log_axis(ax, low: float, high: float) -> None:
    """A log y axis from low to high labelled with plain numbers (1, 1.5, 2, ...), not powers of ten."""
    from matplotlib.ticker import NullLocator
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ticks = [m * 10.0 ** e for e in range(-2, 3) for m in (1, 1.2, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8)]
    ticks = [t for t in ticks if low <= t <= high]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_locator(NullLocator())


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", choices=("lm", "speed", "seq2seq"), default=["lm", "speed", "seq2seq"])
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per model and corpus (default 1000; --quick 2)")
    ap.add_argument("--block-size", type=int, default=None, help="default 128")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 (--quick 1)")
    ap.add_argument("--eval-interval", type=int, default=None, help="steps between val losses (default 100; --quick 1)")
    ap.add_argument("--curve-windows", type=int, default=None,
                    help="consecutive val windows for the curves (default 64; --quick 2)")
    ap.add_argument("--position-windows", type=int, default=None,
                    help="val windows for the final loss and the positions (default 2048; --quick 4)")
    ap.add_argument("--position-stride", type=int, default=None, help="their start offsets (default 32)")
    ap.add_argument("--floor-windows", type=int, default=None,
                    help="windows of the floor's estimate (default 2048; --quick 8)")
    ap.add_argument("--speed-lengths", type=int, nargs="+", default=None,
                    help="default 32 64 128 256 512 (--quick 8 16)")
    ap.add_argument("--speed-tokens", type=int, default=None, help="tokens per batch (default 4096; --quick 32)")
    ap.add_argument("--speed-warmup", type=int, default=None, help="untimed steps per length (default 1)")
    ap.add_argument("--speed-steps", type=int, default=None, help="timed steps per length (default 3; --quick 1)")
    ap.add_argument("--tasks", nargs="+", default=None, choices=list(DEFAULT_ITERS),
                    help="seq2seq tasks (default all; --quick copy dates)")
    ap.add_argument("--seq2seq-warmup", type=int, default=None, help="untimed steps per task (default 2; --quick 1)")
    ap.add_argument("--seq2seq-steps", type=int, default=None, help="timed steps per task (default 6; --quick 1)")
    ap.add_argument("--shakespeare", default=SHAKESPEARE, help="tiny Shakespeare's text (skipped when absent)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny run for the tests: the same models, 2 steps of one window")
    ap.add_argument("--plot-prefix", default=None, help="write PREFIX_lm.png, PREFIX_positions.png, PREFIX_speed.png")
    args = ap.parse_args(argv)
    defaults = dict(steps=(1000, 2), block_size=(128, 128), batch_size=(16, 1), eval_interval=(100, 1),
                    curve_windows=(64, 2), position_windows=(2048, 4), position_stride=(32, 32),
                    floor_windows=(2048, 8),
                    speed_lengths=((32, 64, 128, 256, 512), (8, 16)), speed_tokens=(4096, 32), speed_warmup=(1, 1),
                    speed_steps=(3, 1), tasks=(list(DEFAULT_ITERS), ["copy", "dates"]), seq2seq_warmup=(2, 1),
                    seq2seq_steps=(6, 1))
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("steps", "block_size", "batch_size", "eval_interval", "curve_windows", "position_windows",
                 "position_stride", "floor_windows", "speed_tokens", "speed_warmup", "speed_steps", "seq2seq_warmup",
                 "seq2seq_steps", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if min(args.speed_lengths) < 1 or max(args.speed_lengths) > args.speed_tokens:
        ap.error(f"--speed-lengths must lie in [1, --speed-tokens={args.speed_tokens}]; got {args.speed_lengths}")
    with cpu.blas_threads(args.threads):
        run(args)


if __name__ == "__main__":
    main()
