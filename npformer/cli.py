"""The ``npformer`` command: its subcommands (``pretrain``, ``generate``, ``seq2seq``, ``translate``,
``finetune``) are the modules listed in ``npformer.commands.COMMANDS``; this module parses, runs
and turns failures into one line.

Every expected failure (bad flags, bad data, bad checkpoint) prints one line,
``npformer: error: ...``, and exits with status 2; nothing already on disk is
overwritten. Set NPFORMER_DEBUG=1 to see the full traceback instead.

``npformer pretrain --out DIR --resume`` (and ``seq2seq``/``finetune --resume``) continues with
the settings stored in DIR's newest intact checkpoint: every flag of the command but --out,
--device, --workers and --allow-data-change; only the flags given again override them, e.g.
``--max-iters`` to train for longer. A run stopped by Ctrl-C or SIGTERM saves its last step
first and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import commands, cpu
from .training.rundir import check_resume_target
from .training.stopping import Interrupted

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


def build_parser(resume_defaults: dict = None) -> argparse.ArgumentParser:
    """The argument parser; resume_defaults {command: {flag dest: value}} replace those flags'
    defaults (a resumed run's stored settings)."""
    parser = argparse.ArgumentParser(prog="npformer", description="npformer: a Transformer on NumPy/CuPy")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in commands.COMMANDS:
        importlib.import_module(f"{commands.__name__}.{name}").add_parser(sub)
    for command, defaults in (resume_defaults or {}).items():
        sub.choices[command].set_defaults(**defaults)
    return parser


def main(argv=None) -> int:
    cpu.tune_allocator()                # glibc: reuse freed arrays (NPFORMER_TUNE_MALLOC=0 keeps the system's)
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
