"""Position schemes compared on the built-in toy language: trained at block size 64, evaluated at 64, 128, 256.

    python benchmarks/positions.py                      # the full experiment (docs/positions.md)
    python benchmarks/positions.py --quick              # a tiny run (seconds), for the tests

Five models differ only in how they learn where a token is (docs/positions.md):

    sinusoidal   x + PE[:T], the paper's fixed sinusoids (nn.SinusoidalPositionalEncoding)
    learned      x + P[:T], a learned (64, C) table (nn.LearnedPositionalEmbedding): no rows past 63
    rope         q and k rotated by position (nn.RotaryEmbedding, nn.apply_rotary_pos_emb)
    alibi        -m_h (i - j) added to the scores (nn.alibi_bias), no parameters
    t5           a learned scalar per (distance bucket, head) added to the scores (nn.RelativePositionBias)

Everything else is one pre-norm decoder (PositionLM below) built from the same seed, trained on the
same batches in the same order with the same AdamW schedule (npformer pretrain's defaults: lr 2e-3
cosine to 2e-4, warm-up min(100, steps // 10), weight decay 0.1 on matrices, betas (0.9, 0.99), clip
1.0). The scores are scaled by 1/sqrt(d_head) in every scheme, T5's included (T5 itself uses 1).

Evaluation: the validation text cut into consecutive windows of T characters (the same characters
for every T), the loss averaged over every position of every window, against the best loss any
model can reach with T characters of context, ToyLanguage(seed=0).context_floor(T). A learned table
has no rows past its length: that model raises, and its cells read "n/a (a 64-row table)".

Then GPT-style (npformer.models.GPT: learned positions, LayerNorm, GELU MLP, tied embeddings) against
LLaMA-style (LlamaForCausalLM: RoPE, RMSNorm, SwiGLU of width 8C/3, untied), trained the same way.

Prints markdown tables (stdout) and progress (stderr); writes the plot to --plot when matplotlib is
installed. BLAS runs on --threads threads (1 by default: for matrices this small more give little).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from npformer import cpu, nn, no_grad, ops, random
from npformer.data import BatchSampler, CharTokenizer, ToyLanguage, default_corpus
from npformer.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM
from npformer.nn import functional as F
from npformer.optim import AdamW, clip_grad_norm, set_lr, warmup_cosine, weight_decay_groups
from npformer.tensor import Tensor
from npformer.training.objectives import llama_intermediate_size

SCHEMES = ("sinusoidal", "learned", "rope", "alibi", "t5")
BLOCK_SIZE = 64                 # the training length
LENGTHS = (64, 128, 256)        # the evaluation lengths
MAX_LEN = 4096                  # rows of the schemes' fixed tables (sinusoids, RoPE's cos/sin): no limit here


class PositionsPastTable(ValueError):
    """Positions asked of a learned table that has no rows for them."""


class Block(nn.Module):
    """Pre-norm block: x + proj(attention(ln_1(x))), then x + fc_proj(gelu(fc(ln_2(x)))).

    x: (B, T, C) -> (B, T, C). rope: None or RoPE's (cos, sin), each (T, d_head), applied to q and k.
    bias: None or an additive score bias broadcastable to (B, n_head, T, T) (ALiBi, T5).
    """

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.fc_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x, rope=None, bias=None):
        B, T, C = x.shape
        H, d = self.n_head, C // self.n_head
        q, k, v = ops.split(self.qkv(self.ln_1(x)), C, axis=2)                 # 3 x (B, T, C)
        q, k, v = (t.reshape(B, T, H, d).transpose(1, 2) for t in (q, k, v))   # (B, H, T, d)
        if rope is not None:
            q, k = nn.apply_rotary_pos_emb(q, k, *rope, unsqueeze_dim=None)    # rotated by position
        y = ops.attention(q, k, v, scale=1.0 / math.sqrt(d), causal=True, bias=bias)   # (B, H, T, d)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))                   # (B, T, C)
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class PositionLM(nn.Module):
    """A decoder-only char LM whose position scheme is the only thing that changes between runs.

    forward(idx (B, T) ints, targets (B, T) ints or None) -> (logits (B, T, V), mean cross-entropy or None).
    The shared weights (wte, blocks, ln_f, lm_head) are drawn first from default_rng(seed), with the
    layers' own (PyTorch's) initialisation, so they are equal in every scheme; the scheme's own
    parameters (the learned table, T5's buckets) come from default_rng(seed + 1) afterwards.
    """

    def __init__(self, scheme: str, vocab_size: int, n_layer: int = 4, n_embd: int = 128, n_head: int = 4,
                 block_size: int = BLOCK_SIZE, seed: int = 0):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"PositionLM: scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
        if n_embd % n_head or (n_embd // n_head) % 2:
            raise ValueError(f"PositionLM: n_embd ({n_embd}) / n_head ({n_head}) must be an even integer (RoPE)")
        self.scheme, self.n_head = scheme, n_head
        self.max_positions = block_size if scheme == "learned" else None     # None: any length runs
        with random.thread_default_generator(np.random.default_rng(seed), "cpu"):
            self.wte = nn.Embedding(vocab_size, n_embd)
            self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
            self.ln_f = nn.LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        with random.thread_default_generator(np.random.default_rng(seed + 1), "cpu"):
            if scheme == "sinusoidal":
                self.pos = nn.SinusoidalPositionalEncoding(n_embd, max_len=MAX_LEN)
            elif scheme == "learned":
                self.pos = nn.LearnedPositionalEmbedding(block_size, n_embd)          # N(0, 1), as wte
            elif scheme == "rope":
                self.rotary = nn.RotaryEmbedding(n_embd // n_head, max_position_embeddings=MAX_LEN)
            elif scheme == "t5":
                self.rel = nn.RelativePositionBias(32, 128, num_heads=n_head, bidirectional=False)
                nn.init.normal_(self.rel.relative_attention_bias.weight, std=n_embd ** -0.5)   # T5's (HF's) init

    def forward(self, idx, targets=None):
        idx = idx.data if isinstance(idx, Tensor) else idx
        B, T = idx.shape
        if self.max_positions is not None and T > self.max_positions:
            raise PositionsPastTable(f"PositionLM ({self.scheme}): the position table has {self.max_positions} rows "
                                     f"(positions 0..{self.max_positions - 1}); a sequence of {T} needs rows up to "
                                     f"{T - 1}, and a learned table cannot extrapolate")
        x = self.wte(idx)                                                     # (B, T, C)
        rope = bias = None
        if self.scheme in ("sinusoidal", "learned"):
            x = self.pos(x)                                                   # x + table[:T]
        elif self.scheme == "rope":
            rope = self.rotary(x.xp.arange(T))                                # cos, sin: (T, d_head) each
        elif self.scheme == "alibi":
            bias = nn.alibi_bias(self.n_head, T, T, dtype=x.dtype, device=x.device)   # (H, T, T), a constant
        else:
            bias = self.rel(T, T)                     # (1, H, T, T), computed once and shared by all layers (T5)
        for block in self.blocks:
            x = block(x, rope, bias)
        logits = self.lm_head(self.ln_f(x))                                   # (B, T, V)
        return logits, next_token_loss(logits, targets)


class LlamaNextToken(nn.Module):
    """LlamaForCausalLM called as GPT is: model(x, y) -> (logits, loss) with y already shifted."""

    def __init__(self, lm: LlamaForCausalLM):
        super().__init__()
        self.lm = lm

    def forward(self, idx, targets=None):
        logits = self.lm(idx).logits                                          # (B, T, V)
        return logits, next_token_loss(logits, targets)


def next_token_loss(logits, targets):
    """Mean cross-entropy of logits (B, T, V) against targets (B, T) ints; None without targets."""
    if targets is None:
        return None
    B, T, V = logits.shape
    t = targets.data if isinstance(targets, Tensor) else targets
    return F.cross_entropy(logits.reshape(B * T, V), t.reshape(B * T))


def position_rows(model):
    """Rows of the model's learned position table; None when every length runs."""
    return model.config.block_size if isinstance(model, GPT) else getattr(model, "max_positions", None)


def train(model, train_ids, args, name: str) -> float:
    """args.steps AdamW steps on batches drawn from train_ids (the same batches for every model). Returns
    the seconds taken."""
    opt = AdamW(weight_decay_groups(model.named_parameters(), 0.1), lr=args.lr, betas=(0.9, 0.99))
    sampler = BatchSampler(train_ids, BLOCK_SIZE, args.batch_size, seed=args.seed + 1)
    warmup = min(100, args.steps // 10)
    model.train()
    t0, smooth = time.perf_counter(), None
    for step in range(args.steps):
        set_lr(opt, warmup_cosine(step, args.lr, args.lr / 10, warmup, args.steps))
        x, y = sampler.sample()                                              # (B, 64) each
        _, loss = model(x, y)
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            print(f"  {name}: step {step + 1}/{args.steps}, train loss {smooth:.4f} (smoothed), "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def window_losses(model, val_ids, T: int, n_tokens: int, rows: int):
    """(n, T) per-character losses of the n = n_tokens // T consecutive validation windows of length T,
    run `rows` windows at a time without gradients."""
    n = min(n_tokens, len(val_ids) - 1) // T
    x = val_ids[:n * T].reshape(n, T)                                         # (n, T)
    y = val_ids[1:n * T + 1].reshape(n, T)                                    # (n, T): the next characters
    out = []
    model.eval()
    with no_grad():
        for a in range(0, n, rows):
            logits, _ = model(x[a:a + rows])                                  # (rows, T, V)
            b, V = logits.shape[0], logits.shape[2]
            loss = F.cross_entropy(logits.reshape(b * T, V), y[a:a + rows].reshape(b * T), reduction="none")
            out.append(loss.data.reshape(b, T))
    model.train()
    return np.concatenate(out)


def evaluate(model, val_ids, args) -> dict:
    """{T: (n_windows, T) losses, or the error text where the model has no positions for T}."""
    out = {}
    for T in LENGTHS:
        try:
            out[T] = window_losses(model, val_ids, T, args.eval_tokens, max(1, 4096 // T))
        except ValueError as exc:                     # only a learned table past its rows may refuse a length
            rows = position_rows(model)
            if rows is None or T <= rows:
                raise
            out[T] = f"n/a (a {rows}-row table)"
            print(f"  T={T}: {exc}", file=sys.stderr)
    return out


def table(title: str, results: list, floors: dict) -> str:
    """A markdown table: one row per (name, params, seconds, {T: losses or text}), and the floors."""
    head = "| " + title + " | params | train (s) | " + " | ".join(
        f"val loss @{T} | gap @{T}" for T in LENGTHS) + " |"
    lines = [head, "|" + " --- |" * (3 + 2 * len(LENGTHS))]
    for name, params, seconds, losses in results:
        cells = []
        for T in LENGTHS:
            v = losses[T]
            cells += [v, ""] if isinstance(v, str) else [f"{v.mean():.4f}", f"{100 * (v.mean() / floors[T] - 1):+.1f}%"]
        lines.append(f"| {name} | {params:,} | {seconds:.0f} | " + " | ".join(cells) + " |")
    floor_cells = [c for T in LENGTHS for c in (f"{floors[T]:.4f}", "")]
    lines.append("| floor: context_floor(T) | | | " + " | ".join(floor_cells) + " |")
    return "\n".join(lines)


def plot(path: str, results: list, floors: dict, floor_curve) -> None:
    """Left: mean loss against the evaluation length per model, the floor drawn. Right: the loss at each
    position of the longest windows (bins of 8), against the best possible loss at that position."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    T_max = LENGTHS[-1]
    for name, _, _, losses in results:
        Ts = [T for T in LENGTHS if not isinstance(losses[T], str)]
        (line,) = ax1.plot(Ts, [losses[T].mean() for T in Ts], "o-", label=name)
        if not isinstance(losses[T_max], str):
            curve = losses[T_max].mean(0).reshape(-1, 8).mean(1)              # (T_max / 8,)
            ax2.plot(np.arange(4, T_max, 8), curve, color=line.get_color(), label=name)
    ax1.plot(LENGTHS, [floors[T] for T in LENGTHS], "k--", label="floor")
    ax2.plot(np.arange(T_max), floor_curve, "k--", lw=1, label="floor")
    ax1.set(xticks=LENGTHS, xlabel="evaluation length T (characters)", ylabel="val loss (nats/char)", yscale="log",
            title=f"trained at {BLOCK_SIZE}: mean loss over the T positions")
    ax2.axvline(BLOCK_SIZE, color="grey", lw=0.8)
    ax2.set(xlabel="position in the window", ylabel="val loss (nats/char)", yscale="log",
            title=f"loss at each position of {T_max}-character windows")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}", file=sys.stderr)


def run(args) -> None:
    t_start = time.perf_counter()
    train_text, val_text = default_corpus(*((100_000, 20_000) if args.quick else ()))
    tok = CharTokenizer(train_text + val_text)
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
    lang = ToyLanguage(seed=0)
    exact = 16 if args.quick else 256                 # --quick: positions past 16 taken at the entropy rate
    floors = {T: lang.context_floor(T, exact_positions=exact) for T in LENGTHS}
    floor_curve = lang.windowed_loss(min(exact, LENGTHS[-1]))
    floor_curve = np.concatenate([floor_curve, np.full(LENGTHS[-1] - len(floor_curve), lang.entropy_rate())])
    print(f"{args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads; block {BLOCK_SIZE}, batch "
          f"{args.batch_size}, {args.steps} steps, seed {args.seed}; vocab {tok.vocab_size}; evaluation on "
          f"{args.eval_tokens:,} validation characters; entropy rate {lang.entropy_rate():.4f} nats/char; "
          f"BLAS threads {args.threads}", file=sys.stderr, flush=True)
    size = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)

    schemes = []
    for scheme in args.schemes:
        model = PositionLM(scheme, tok.vocab_size, seed=args.seed, **size)
        seconds = train(model, train_ids, args, scheme)
        schemes.append((scheme, model.num_parameters(), seconds, evaluate(model, val_ids, args)))

    styles = []
    if not args.no_styles:
        gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK_SIZE, n_layer=args.n_layer,
                            n_head=args.n_head, n_embd=args.n_embd), generator=np.random.default_rng(args.seed))
        llama = LlamaNextToken(LlamaForCausalLM(LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=args.n_embd, intermediate_size=llama_intermediate_size(args.n_embd),
            num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, max_position_embeddings=BLOCK_SIZE,
            bos_token_id=None, eos_token_id=None), generator=np.random.default_rng(args.seed)))
        for name, model in (("GPT-style", gpt), ("LLaMA-style", llama)):
            seconds = train(model, train_ids, args, name)
            n_params = nn.Module.num_parameters(model)                        # GPT's own leaves out wpe
            styles.append((name, n_params, seconds, evaluate(model, val_ids, args)))

    print(f"\nval loss in nats/char; gap = val loss / floor - 1; trained {args.steps} steps at block size "
          f"{BLOCK_SIZE}, batch {args.batch_size}; {args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads\n")
    print(table("scheme", schemes, floors))
    if styles:
        print()
        print(table("model", styles, floors))
    se = [v.mean(axis=1).std() / math.sqrt(len(v))
          for _, _, _, losses in schemes + styles for v in losses.values() if not isinstance(v, str)]
    print(f"\nstandard error of each val loss above (spread of its per-window means / sqrt(windows)): from "
          f"{min(se):.4f} to {max(se):.4f} nats/char")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    if args.plot:
        plot(args.plot, schemes + styles, floors, floor_curve)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default 800; --quick 3)")
    ap.add_argument("--batch-size", type=int, default=None, help="windows of 64 per step (default 32; --quick 2)")
    ap.add_argument("--n-layer", type=int, default=None, help="default 4 (--quick 1)")
    ap.add_argument("--n-embd", type=int, default=None, help="default 128 (--quick 16)")
    ap.add_argument("--n-head", type=int, default=None, help="default 4 (--quick 2)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine to a tenth of it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="validation characters per evaluation length (default 65536; --quick 512)")
    ap.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    ap.add_argument("--no-styles", action="store_true", help="skip the GPT-style vs LLaMA-style comparison")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--quick", action="store_true", help="a tiny run for the tests: small model, 3 steps")
    ap.add_argument("--plot", default=None, help="write the plot here (e.g. docs/positions.png)")
    args = ap.parse_args(argv)
    defaults = dict(steps=(800, 3), batch_size=(32, 2), n_layer=(4, 1), n_embd=(128, 16), n_head=(4, 2),
                    eval_tokens=(65536, 512))
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("steps", "batch_size", "n_layer", "n_embd", "n_head", "eval_tokens", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if args.eval_tokens < LENGTHS[-1]:
        ap.error(f"--eval-tokens must be at least {LENGTHS[-1]} (one window of the longest length)")
    with cpu.blas_threads(args.threads):
        run(args)


if __name__ == "__main__":
    main()
