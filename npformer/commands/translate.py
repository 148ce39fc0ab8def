"""``npformer translate --ckpt DIR "text"``: decode one input with a model trained by ``npformer seq2seq``.

    npformer translate --ckpt out-seq2seq-numbers 1205            # one thousand two hundred five
    npformer translate --ckpt out-seq2seq-dates --beam-size 4 2026-11-29

The input is first read the way the task writes its sources (Task.parse_source): a number with
leading zeros is the number (000012 -> 12), a date may drop the leading zeros of its month and day
(2026-1-5 -> 2026-01-05); an input outside the task's range is refused with a one-line error.
"""

from __future__ import annotations

import argparse

from .. import backend

TEXT_HELP = ("the source text: copy and reverse: letters a..j; numbers: an integer 0 .. 999999, leading zeros "
             "allowed (000012 reads as 12); dates: YYYY-MM-DD of the years 1900 .. 2099, month and day with or "
             "without a leading zero (2026-1-5 reads as 2026-01-05)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("translate", help="decode one input with a model trained by `npformer seq2seq`",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("text", help=TEXT_HELP)
    # required, so it has no default to show in --help
    p.add_argument("--ckpt", required=True, default=argparse.SUPPRESS,
                   help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--beam-size", type=int, default=1, help="hypotheses kept per step; 1: greedy decoding")
    p.add_argument("--length-penalty", type=float, default=0.6,
                   help="GNMT alpha of beam search, score = log P / ((5 + n) / 6) ** alpha for n tokens: 0 ranks "
                        "by log P, larger values favour longer outputs, negative ones shorter; a finite number")
    p.add_argument("--device", choices=backend.DEVICES, default=None, help="None: $NPFORMER_DEVICE, else cpu")
    p.set_defaults(run=run)


def run(args) -> None:
    from ..training.seq2seq import check_length_penalty, load_seq2seq, translate
    if args.beam_size < 1:
        raise ValueError(f"--beam-size must be >= 1; got {args.beam_size}")
    check_length_penalty(args.length_penalty)
    if not args.text:
        raise ValueError("the input text is empty")
    model, tok, meta = load_seq2seq(args.ckpt, device=args.device)
    print(translate(model, tok, meta, args.text, args.beam_size, args.length_penalty))
