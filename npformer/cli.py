"""The ``npformer`` command: ``pretrain`` here, and ``generate``, ``seq2seq``, ``translate`` and
``finetune`` from the modules in ``npformer.commands``.

Every expected failure (bad flags, bad data, bad checkpoint) prints one line,
``npformer: error: ...``, and exits with status 2; nothing already on disk is
overwritten. Set NPFORMER_DEBUG=1 to see the full traceback instead.

``npformer pretrain --out DIR --resume`` (and ``seq2seq --resume``) continues with the
settings stored in DIR's newest intact checkpoint (all but --device and --workers); only the
flags given again override them, e.g. ``--max-iters`` to train for longer. A run stopped by
Ctrl-C or SIGTERM saves its last step first and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import os
import sys

from . import backend, commands
from .training.rundir import check_resume_target
from .training.stopping import Interrupted

class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except where X is None (the help then says
    what None stands for) or a store_true flag's False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _pretrain_parser(sub):
    from .training.pretrain import PretrainConfig
    d = PretrainConfig()
    p = sub.add_parser("pretrain", help="train a GPT language model (the built-in toy language by default)",
                       formatter_class=DefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, default=d.n_layer, help="Transformer blocks")
    g.add_argument("--n-head", type=int, default=d.n_head, help="attention heads per block")
    g.add_argument("--n-embd", type=int, default=d.n_embd, help="model width (embedding size)")
    g.add_argument("--block-size", type=int, default=d.block_size, help="context length in tokens")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout probability (0 disables)")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True, help="biases in Linear and LayerNorm")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    g.add_argument("--max-iters", type=int, default=d.max_iters, help="training steps")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-iters", type=int, default=None,
                   help="linear warm-up steps (default: min(100, --max-iters // 10))")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="cosine decay length (default: --max-iters; with --resume, the checkpoint's)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay (not on biases and norms)")
    g.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0 disables)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval, help="evaluate and checkpoint every N steps")
    g.add_argument("--eval-iters", type=int, default=d.eval_iters, help="batches per evaluation")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for weights, batches and dropout")
    g.add_argument("--device", choices=backend.DEVICES, default=None, help="default: $NPFORMER_DEVICE or cpu")
    g.add_argument("--workers", type=int, default=None,
                   help="CPU workers (processes on Linux, else threads), each running the model "
                        "on its share of the batch (default: all usable cores)")
    g.add_argument("--shards", type=int, default=None,
                   help="cut each batch into this many pieces, run one after another per worker "
                        "(gradient accumulation): more shards, less activation memory, a little "
                        "slower (default: on the CPU pieces of about 512 tokens, a multiple of "
                        "--workers; on a GPU one)")
    g.add_argument("--data", default=None, help="a UTF-8 text file (default: the built-in toy language)")
    g.add_argument("--tokenizer", choices=("char", "bpe"), default=d.tokenizer, help="character-level or byte-level BPE")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size, help="vocabulary size for --tokenizer bpe")
    g.add_argument("--out", default=d.out, help="run directory for checkpoints, metrics.jsonl and loss.png")
    g.add_argument("--keep", type=int, default=d.keep,
                   help="checkpoints kept in --out, the newest (0: all); --resume falls back to an older "
                        "one when the newest is damaged")
    g.add_argument("--allow-data-change", action="store_true",
                   help="with --resume, continue even though the data file's contents changed")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the settings stored there "
                        "(flags given again override them)")
    g.add_argument("--samples", type=int, default=d.samples, help="samples printed at the end")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens, help="tokens per final sample")
    p.set_defaults(run=_run_pretrain)


# commands that resume: (their default --out, the checkpoint meta key that stores the settings)
RESUMABLE = {"pretrain": ("out-pretrain", "pretrain_config"),
             "seq2seq": ("out-seq2seq-{task}", "train_config"),
             "finetune": ("out-finetune", "finetune_config")}
NOT_INHERITED = {"out", "resume", "device", "workers", "allow_data_change"}


def _saved_settings(command: str, out: str, flags) -> dict:
    """The settings of the run whose newest intact checkpoint is in `out`, as defaults of the
    command's `flags` (dest names) for --resume. Settings that have no flag (e.g. finetune's
    derived min_lr) are left to be derived again from the flags."""
    from .training.checkpoint import load_meta
    _, key = RESUMABLE[command]
    saved = load_meta(out, fallback=True)[1].get(key)
    inherit = set(flags) - NOT_INHERITED
    return {k: v for k, v in saved.items() if k in inherit} if isinstance(saved, dict) else {}


def _run_pretrain(args):
    from .training.pretrain import PretrainConfig, pretrain
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    pretrain(cfg)


def build_parser(resume_defaults: dict = None) -> argparse.ArgumentParser:
    """The argument parser; resume_defaults {command: {flag dest: value}} replace those flags'
    defaults (a resumed run's stored settings)."""
    parser = argparse.ArgumentParser(prog="npformer", description="npformer: a Transformer on NumPy/CuPy")
    sub = parser.add_subparsers(dest="command", required=True)
    _pretrain_parser(sub)
    for name in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"{commands.__name__}.{name}").add_parser(sub)
    for command, defaults in (resume_defaults or {}).items():
        sub.choices[command].set_defaults(**defaults)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command in RESUMABLE and args.resume:
            out = args.out or RESUMABLE[args.command][0].format(**vars(args))
            check_resume_target(out)        # at once, before the checkpoint is read and verified
            saved = _saved_settings(args.command, out, vars(args))
            args = build_parser({args.command: saved}).parse_args(argv)
        args.run(args)
    except Interrupted as exc:          # the run saved its last step (pretrain's GracefulStop)
        print(f"npformer: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("npformer: interrupted; the checkpoints already written, if any, are intact", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    except MemoryError:
        if os.environ.get("NPFORMER_DEBUG"):
            raise
        lower = {"pretrain": "lower --batch-size or --block-size, or raise --shards",
                 "seq2seq": "lower --batch-size or --d-model"}.get(args.command, "lower --batch-size")
        print(f"npformer: error: out of memory in `npformer {args.command}`; the checkpoints already written, "
              f"if any, are intact; {lower}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, FloatingPointError, IndexError) as exc:
        if os.environ.get("NPFORMER_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.strerror:    # "[Errno 28] ..." told without the errno
            msg = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        else:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"npformer: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
