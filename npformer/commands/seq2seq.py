"""``npformer seq2seq``: train the encoder-decoder Transformer on a toy task and report its accuracy.

    npformer seq2seq --task copy                     # ~1 minute on a CPU core, >= 99% exact match
    npformer seq2seq --task numbers --beam-size 4    # "1205" -> "one thousand two hundred five"
    npformer seq2seq --task numbers --resume         # continue a stopped run (Ctrl-C saves its last step)
    npformer seq2seq --task dates --arch t5          # a T5 (or --arch bart) instead of the 2017 Transformer
    npformer seq2seq --task summarize                # documents -> summaries; also ROUGE-1/2/L (rouge-score)
    mpiexec -n 2 npformer seq2seq --task copy        # two ranks share each batch (docs/distributed.md)
"""

from __future__ import annotations

import argparse

from .. import backend
from ..data.tasks import TASKS


def add_parser(subparsers) -> None:
    from ..training.seq2seq import DEFAULT_DROPOUT, DEFAULT_ITERS, TASK_DROPOUT, Seq2SeqTrainConfig
    d = Seq2SeqTrainConfig()
    p = subparsers.add_parser("seq2seq", help="train an encoder-decoder Transformer on a toy task "
                                              f"({', '.join(TASKS)})",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # validated by the run (not by argparse choices) so that a bad name gives a one-line error
    p.add_argument("--task", default=d.task, help=f"one of {', '.join(TASKS)}")
    g = p.add_argument_group("model (the same number of encoder and decoder layers)")
    g.add_argument("--arch", default=d.arch,
                   help="transformer: the 2017 encoder-decoder; bart: post-norm, learned positions; t5: pre-norm "
                        "RMS, relative position bias (one vocabulary for source and target); rnn: LSTM encoder-decoder with "
                        "attention (docs/seq2seq.md)")
    g.add_argument("--d-model", type=int, default=d.d_model, help="model width")
    g.add_argument("--nhead", type=int, default=d.nhead, help="attention heads")
    g.add_argument("--num-layers", type=int, default=d.num_layers, help="encoder layers = decoder layers")
    g.add_argument("--dim-feedforward", type=int, default=d.dim_feedforward, help="feed-forward width")
    g.add_argument("--dropout", type=float, default=None,
                   help=f"on sub-layer outputs, embeddings, attention; None: {DEFAULT_DROPOUT}, except "
                        + ", ".join(f"{k} {v}" for k, v in TASK_DROPOUT.items()))
    g = p.add_argument_group("optimisation (Adam betas (0.9, 0.98), eps 1e-9, the paper's schedule)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="examples per step (under mpiexec: the global batch, split evenly across the ranks)")
    g.add_argument("--max-iters", type=int, default=None,
                   help="optimizer steps; None: per task, " + ", ".join(f"{k} {v}" for k, v in DEFAULT_ITERS.items()))
    g.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps of the learning-rate schedule")
    g.add_argument("--lr-factor", type=float, default=d.lr_factor,
                   help="lr = factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="epsilon of the smoothed targets")
    g = p.add_argument_group("evaluation on the held-out test split")
    g.add_argument("--beam-size", type=int, default=d.beam_size, help="> 1: also evaluate with beam search")
    g.add_argument("--length-penalty", type=float, default=d.length_penalty,
                   help="GNMT alpha of beam search (a finite number; see `npformer translate --help`)")
    g.add_argument("--n-test", type=int, default=d.n_test, help="test examples (distinct sources)")
    g.add_argument("--eval-interval", type=int, default=None, help="evaluate and checkpoint every N steps; "
                                                                    "None: at the end only")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed, help="weights: seed, batches: seed + 1, dropout: seed + 2")
    g.add_argument("--device", choices=backend.DEVICES, default=None, help="None: $NPFORMER_DEVICE, else cpu")
    g.add_argument("--out", default=None, help="run directory for checkpoints; None: out-seq2seq-TASK")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint, with the settings "
                        "stored there (flags given again override them)")
    g.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept in --out, the newest (0: all)")
    g.add_argument("--attention-maps", action="store_true",
                   help="save PNGs of the attention weights for one test example (needs matplotlib)")
    p.set_defaults(run=run)


def run(args) -> None:
    """Train in this process, or, started by an MPI launcher (``mpiexec -n N npformer seq2seq``), as
    one of N ranks (docs/distributed.md): an error on one rank then ends all of them, in one line."""
    import dataclasses
    from .. import distributed
    from ..training.seq2seq import Seq2SeqTrainConfig, train
    fields = {f.name for f in dataclasses.fields(Seq2SeqTrainConfig)}
    cfg = Seq2SeqTrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    distributed.run_launched(train, cfg, cfg.device or backend.default_device())
