"""``npformer translate --ckpt DIR "text"``: decode one input with a model trained by ``npformer seq2seq``.

    npformer translate --ckpt out-seq2seq-numbers 1205            # one thousand two hundred five
    npformer translate --ckpt out-seq2seq-dates --beam-size 4 2026-11-29
"""

from __future__ import annotations

import argparse

from .. import backend


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("translate", help="decode one input with a model trained by `npformer seq2seq`",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("text", help="the source text, e.g. 1205 for --task numbers")
    p.add_argument("--ckpt", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--beam-size", type=int, default=1, help="1: greedy decoding")
    p.add_argument("--length-penalty", type=float, default=0.6, help="GNMT alpha for beam search")
    p.add_argument("--device", choices=backend.DEVICES, default=None)
    p.set_defaults(run=run)


def translate(model, tok, meta: dict, text: str, beam_size: int = 1, length_penalty: float = 0.6) -> str:
    """The model's output text for one source text; ValueError for an input it cannot take."""
    from ..training.seq2seq import decode
    if not text:
        raise ValueError("the input text is empty")
    limit = min(int(meta.get("max_src_len", model.config.max_len)), model.config.max_len)
    if len(text) > limit:
        raise ValueError(f"the input has {len(text)} characters; this {meta.get('task', 'seq2seq')} model takes "
                         f"at most {limit}")
    try:
        src = tok.encode(text)
    except ValueError as exc:
        raise ValueError(f"the input has {exc} (task {tok.task})") from None
    return tok.decode(decode(model, tok, src[None], beam_size, length_penalty)[0, 1:])


def run(args) -> None:
    from ..training.seq2seq import load_seq2seq
    if args.beam_size < 1:
        raise ValueError(f"--beam-size must be >= 1; got {args.beam_size}")
    if not args.text:
        raise ValueError("the input text is empty")
    model, tok, meta = load_seq2seq(args.ckpt, device=args.device)
    print(translate(model, tok, meta, args.text, args.beam_size, args.length_penalty))
