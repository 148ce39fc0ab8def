"""How much memory a pretraining run needs, checked before anything is allocated.

``npformer pretrain --block-size 100000`` on a 24 GB machine used to grow until the kernel
killed it without a word. ``check_pretrain_memory(cfg, vocab_size)`` compares an estimate
of the run's peak with the memory still available and raises ``MemoryTooSmall`` (a
ValueError: the CLI prints one line and exits 2) naming the flags that lower it.

The estimate counts the arrays the code really holds (float32, f = 4 bytes). Shapes:
B rows of one shard, T = block_size, C = n_embd, H = n_head, V = vocab_size, L = n_layer,
p = dropout, P the parameter count. Causal self-attention takes the query-block path of
npformer/ops/attention.py when T >= 2 * 64 and p == 0 ("blocked", n_b = ceil(T / 64)
blocks of about T / n_b queries); otherwise it holds the full (B, H, T, T) scores.

Kept for the backward, per shard (the Node closures of npformer/autograd.py; tensors that
no backward needs are freed during the forward):

    per layer   ln_1 output (held by c_attn) and its normalised input xhat    2 BTC
                c_attn output qkv (held by self_attention)                    3 BTC
                attention output (held by c_proj)                             1 BTC
                ln_2 output and xhat                                          2 BTC
                c_fc output, GELU's h and GELU output (held by c_proj)       12 BTC
                the two LayerNorms' 1 / std                                   2 BT
                dropout scales after attention and MLP (p > 0)                2 BTC
                attention weights: blocked, block [i0, i1) keeps (B, H, i1, i1 - i0),
                    in all  B H T^2 (n_b + 1) / (2 n_b)
                  otherwise the softmax B H T^2; with dropout also the weights
                  after dropout and the dropout scale: 3 B H T^2
    once        embedding dropout scale (p > 0)                               1 BTC
                ln_f output and xhat                                          2 BTC + BT
                logits (held by the loss closure and run_shards' `_`)         1 BTV
                log-softmax of cross_entropy                                  1 BTV
                integer arrays: ids, targets, the loss's row index and masks  40 bytes / token

On top of that, the largest transient, at one of four moments (in elements over the kept set):

    cross-entropy   `shifted` (forward) or the logits' gradient (backward)      BTV
                    + the previous shard's logits, still bound to run_shards' `_` while the
                      next forward runs (a process with 2 or more shards)        + BTV
    lm_head bwd     its input and weight gradients                          BTC + VC
    last MLP bwd    GELU's gradient, its input's and the residual's, with the weight
                    gradients so far; GELU's output and the log-softmax freed
                                                          3 BTC - BTV + VC + 8 C^2
    last attention  blocked: one block's scores or their gradient  B H T ceil(T / n_b);
                    full: the scores' gradient B H T^2, with dropout the uniform draws
                    and their comparison 1.25 B H T^2, the causal mask table 13 T^2 bytes;
                    less what is not (or no longer) there then     - (11 + 2p) BTC - BTV

Worker k of n = min(workers, shards) runs shards k, k + n, ... one after another, the first
its largest (rows_k = ceil or floor of batch_size / shards); the n processes (or threads)
together hold the sum over k. Beside the activations:

    weights P f,  AdamW state 2 P f (exp_avg, exp_avg_sq),
    gradients at the activations' peak: P f for each process (thread) past its first shard
        (its running sum) and each forked worker (its shared block, filled since step 1);
        while the sums are added to .grad, with no activations left: (n + 1) P f,
    forked workers (workers - 1) * WORKER_OVERHEAD: the pages of the parent each one copies
        (Python's reference counts write to every object a worker touches),
    data: what the caller says it allocates after the reading (the encoded corpus).

Evaluation (objectives.py: evaluate) runs under no_grad in the main process, in pieces of at most
rows_0 rows (as many pieces as shards): nothing is kept, and its peak is the largest live
set of one forward,

    max(attention  7 BTC (residual, ln_1 out, qkv, output, scaled q) + the scores
                   (blocked: every block's, until the op returns; else B H T^2 and the mask),
        MLP       14 BTC (residual, ln_2 out, c_fc out, GELU h and output),
        head       BTC + 3 BTV (logits, shifted, exp))
    + 40 bytes / token (evaluate keeps only each piece's loss, so a piece's logits are freed
    before the next piece runs),

while the weights, the AdamW state, the workers and their blocks stay. ``peak_bytes`` is
the larger of the training step and that. tests/test_memory.py holds the formula within 10%
of the NumPy arrays traced live (tracemalloc) and within 30% of measured peak RSS
(benchmarks/memory_estimate.py prints those next to the estimate).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..fast.attention import CAUSAL_BLOCK
from . import parallel
from . import workers as shard_workers
from .memory_reading import (  # noqa: F401  (the free-memory readings; re-exported)
    CGROUP_ROOT, ENV_VAR, MEMINFO, PROC_CGROUP, available_memory, format_bytes, gpu_available_memory, parse_bytes)

ITEMSIZE = 4                    # float32 training
TOKEN_BYTES = 40                # integer arrays per token (ids, targets, loss indices and masks)
WORKER_OVERHEAD = 16 << 20      # pages of the parent a forked worker copies (measured 6-8 MB)


class MemoryTooSmall(ValueError):
    """The run would need more memory than is available (a ValueError: the CLI prints one line)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a pretraining run needs; `parts` names where they go (the training step's parts
    and "evaluation piece")."""
    train_bytes: int                # a training step: model, optimizer, gradients, activations, workers
    eval_bytes: int                 # one evaluation piece's activations (the model is counted in train)
    peak_bytes: int                 # the most the process tree holds at once
    parts: dict = field(hash=False)
    rows: int                       # rows of the largest shard (and evaluation piece)
    shards: int
    workers: int                    # processes (or threads) running shards at once

    @property
    def decided_by(self) -> str:
        """Which of the two sets the peak: "training" or "evaluation"."""
        return "training" if self.peak_bytes == self.train_bytes else "evaluation"


# ----------------------------------------------------------------------------- the estimate

def parameter_count(n_layer: int, n_embd: int, vocab_size: int, block_size: int, bias: bool = True) -> int:
    """Parameters of npformer.models.gpt.GPT (lm_head tied to wte, so counted once)."""
    C, b = n_embd, int(bias)
    layer = (2 * C + 2 * b * C                          # ln_1, ln_2
             + 3 * C * C + 3 * b * C + C * C + b * C    # c_attn, attn.c_proj
             + 4 * C * C + 4 * b * C + 4 * C * C + b * C)   # c_fc, mlp.c_proj
    return vocab_size * C + block_size * C + n_layer * layer + C + b * C


def _blocked(T: int, dropout: float) -> bool:
    return T >= 2 * CAUSAL_BLOCK and dropout == 0.0


def _scores(B, T, H, dropout):
    """(kept, transient) elements of one layer's attention weights (training)."""
    mask = 13 * T * T / ITEMSIZE                        # bool, float64 and float32 T x T, in elements
    if _blocked(T, dropout):
        n_b = -(-T // CAUSAL_BLOCK)
        return B * H * T * T * (n_b + 1) / (2 * n_b), B * H * T * -(-T // n_b)
    full = B * H * T * T
    if dropout:
        return 3 * full, max(1.25 * full, mask)
    return full, max(full, mask)


def shard_parts(B, T, C, H, V, L, dropout=0.0, more_shards=False) -> dict:
    """Bytes one process holds at its peak while running a training shard of B rows.

    more_shards: the process ran another shard before this one (whose logits are still bound).
    Returns {"attention scores", "activations", "logits": bytes}; see the module docstring.
    """
    BT, drop = B * T, dropout > 0
    layer = (20 + 2 * drop) * BT * C + 2 * BT
    kept_scores, scores_transient = _scores(B, T, H, dropout)
    head_kept = drop * BT * C + 2 * BT * C + BT
    # the largest transient, at one of four moments (module docstring)
    head = max(BT * V * (1 + more_shards), BT * C + V * C)
    mlp = 3 * BT * C - BT * V + V * C + 8 * C * C
    attention_extra = scores_transient - (11 + 2 * drop) * BT * C - BT * V
    attention, logits, other = L * kept_scores, 2 * BT * V, L * layer + head_kept
    extra = max(head, mlp, attention_extra)
    if extra == attention_extra:
        attention += extra
    elif extra == head:
        logits += extra
    else:
        other += extra
    return {"attention scores": ITEMSIZE * attention,
            "activations": ITEMSIZE * other + TOKEN_BYTES * BT,
            "logits": ITEMSIZE * logits}


def eval_piece_bytes(B, T, C, H, V, L) -> float:
    """Bytes of the largest live set of one forward under no_grad (B rows; see the docstring)."""
    BT = B * T
    kept, _ = _scores(B, T, H, 0.0)
    scores = kept if _blocked(T, 0.0) else kept + 13 * T * T / ITEMSIZE     # full: the scores and the mask
    live = max(7 * BT * C + scores, 14 * BT * C, BT * C + 3 * BT * V)
    return ITEMSIZE * live + TOKEN_BYTES * BT


def shard_plan(cfg) -> tuple:
    """(shards, workers running at once, rows of each worker's first shard) as parallel.plan_shards cuts."""
    threads, batch = cfg.workers or 1, cfg.batch_size
    shards = cfg.shards or parallel.default_shards(batch * cfg.block_size, threads, cfg.device or "cpu")
    shards = min(shards, batch)
    q, r = divmod(batch, shards)                         # the first r shards have one row more
    n = min(threads, shards)
    return shards, n, [q + (k < r) for k in range(n)]


def estimate_pretrain(cfg, vocab_size: int, data_bytes: int = 0) -> MemoryEstimate:
    """The memory a pretraining run of `cfg` (a checked PretrainConfig) needs; see the docstring.

    data_bytes: memory the run allocates besides the estimate's parts and after the reading of the
    available memory, e.g. the encoded corpus (8 bytes a token); shown as the part "data"."""
    T, C, H, L, V = cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer, vocab_size
    shards, n, rows = shard_plan(cfg)
    P = ITEMSIZE * parameter_count(L, C, V, T, cfg.bias)
    processes = (cfg.device or "cpu") == "cpu" and shard_workers.available()
    forked = (cfg.workers or 1) - 1 if processes else 0            # pretrain forks them for workers > 1
    base = {"weights": P, "AdamW state": 2 * P, "worker processes": forked * WORKER_OVERHEAD, "data": data_bytes}
    # at the activations' peak: each process's or thread's gradient sum of its earlier shards
    # (a forked worker's shared block keeps its pages from the last step)
    peak = dict(base, **{"attention scores": 0.0, "activations": 4 * 8 * cfg.batch_size * T,   # the batch, sent
                         "gradients": P * (n - 1 if processes else 0)})
    for k, B in enumerate(rows):
        more = len(range(k, shards, n)) > 1
        for name, b in shard_parts(B, T, C, H, V, L, cfg.dropout, more).items():
            peak[name] = peak.get(name, 0.0) + b
        if more and (k == 0 or not processes):
            peak["gradients"] += P
    # while the sums are added to .grad the activations are gone
    update = dict(base, **{"attention scores": 0, "activations": 0, "logits": 0, "gradients": (n + 1) * P})
    parts = max(peak, update, key=lambda d: sum(d.values()))
    train = sum(parts.values())
    stays = sum(base.values()) + P * (n - 1 if processes else 0)      # during evaluation
    evaluation = eval_piece_bytes(rows[0], T, C, H, V, L)
    parts = {k: int(v) for k, v in parts.items()}
    parts["evaluation piece"] = int(evaluation)
    return MemoryEstimate(train_bytes=int(train), eval_bytes=int(evaluation),
                          peak_bytes=int(max(train, stays + evaluation)), parts=parts,
                          rows=rows[0], shards=shards, workers=n)


# ----------------------------------------------------------------------------- the check

def _search(peak, lo: int, hi: int, free: int, largest: bool):
    """The largest (or smallest) v in [lo, hi] with peak(v) <= free, peak monotone; None if none."""
    good = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if peak(mid) <= free:
            good = mid
            lo, hi = (mid + 1, hi) if largest else (lo, mid - 1)
        else:
            lo, hi = (lo, mid - 1) if largest else (mid + 1, hi)
    return good


def _advice(cfg, vocab_size: int, est: MemoryEstimate, free: int) -> str:
    """The flags that lower the peak (by 1% or more), each with the value that fits where changing it
    alone is enough. A resumed run keeps its model and batch: only --workers and --shards are named."""
    def peak(**change):
        return estimate_pretrain(replace(cfg, **change), vocab_size, est.parts["data"]).peak_bytes

    def flag(name, now, fit):
        fits.append(fit is not None)
        return f"--{name} ({now} now" + (f", {fit} fits)" if fit is not None else ")")
    lower, other, fits = [], [], []
    for name in ("workers",) if cfg.resume else ("batch_size", "block_size", "workers"):
        now = getattr(cfg, name) or 1
        if now < 2 or peak(**{name: now // 2}) > 0.99 * est.peak_bytes:
            continue                                  # halving it would not help
        fit = _search(lambda v: peak(**{name: v}), 1, now - 1, free, largest=True)
        lower.append(flag(name.replace("_", "-"), now, fit))
    if est.shards < cfg.batch_size and peak(shards=cfg.batch_size) <= 0.99 * est.peak_bytes:
        fit = _search(lambda v: peak(shards=v), est.shards + 1, cfg.batch_size, free, largest=False)
        other.append("raise " + flag("shards", est.shards, fit))
    if cfg.dropout > 0 and not cfg.resume and peak(dropout=0.0) <= 0.99 * est.peak_bytes:
        other.append(f"set --dropout 0 ({cfg.dropout} now)")
    phrase = []
    if lower:
        phrase.append("lower " + (" or ".join(lower) if len(lower) < 3 else ", ".join(lower[:-1]) + " or " + lower[-1]))
    phrase += other
    if not any(fits):
        phrase.append("start a new run with a smaller model or batch" if cfg.resume
                      else "use a smaller model (--n-layer, --n-embd)")
    return ", or ".join(phrase)


def check_pretrain_memory(cfg, vocab_size: int, available=None, data_bytes: int = 0) -> MemoryEstimate:
    """Raise MemoryTooSmall when the run of `cfg` (checked) would not fit; return the estimate.

    available: bytes, or a (bytes, description) pair as available_memory() returns; None reads
    the device's (available_memory() on the CPU, gpu_available_memory() on a GPU). A reading of
    None skips the check. data_bytes: as for estimate_pretrain (host memory: not counted on a GPU).
    """
    gpu = cfg.device == "gpu"
    est = estimate_pretrain(cfg, vocab_size, 0 if gpu else data_bytes)
    if available is None:
        available = gpu_available_memory() if gpu else available_memory()
    free, source = available if isinstance(available, tuple) else (available, "given")
    if free is None or est.peak_bytes <= free:
        return est
    if est.decided_by == "training":
        what = "a training step"
        shown = {k: v for k, v in est.parts.items() if k != "evaluation piece"}
    else:
        what = "an evaluation"
        shown = {"model, optimizer and workers": est.peak_bytes - est.eval_bytes,
                 "one piece": est.eval_bytes}
    top = sorted(shown.items(), key=lambda kv: -kv[1])[:3]
    detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in top if v > 0)
    where = " of GPU memory" if gpu else ""
    raise MemoryTooSmall(f"{what} needs about {format_bytes(est.peak_bytes)}{where} ({detail}) but "
                         f"{format_bytes(free)} is available ({source}); {_advice(cfg, vocab_size, est, free)}")
