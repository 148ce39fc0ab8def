"""``npformer generate --ckpt DIR``: sample text from a checkpoint written by ``npformer pretrain``.

    npformer generate --ckpt out-pretrain --prompt "the cat" --max-new-tokens 200
"""

from __future__ import annotations

import argparse

import numpy as np

from .. import backend


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a pretrained checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default=None,
                   help="text to continue (default: a newline, or the first token when the vocabulary has none)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", choices=backend.DEVICES, default=None)
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="recompute every position each step")
    p.set_defaults(run=run)


def run(args) -> None:
    from ..models.sampling import generate
    from ..training.loading import load_gpt
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0; got {args.max_new_tokens}")
    if args.prompt == "":
        raise ValueError("--prompt is empty; give at least one character")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0; got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1; got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1]; got {args.top_p}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1; got {args.num_samples}")
    model, tok = load_gpt(args.ckpt, device=args.device)
    if args.prompt is None:
        try:
            tok.encode("\n")
            args.prompt = "\n"
        except ValueError:                  # a character vocabulary without a newline
            args.prompt = tok.decode([0])
    ids = tok.encode(args.prompt)
    if len(ids) > model.config.block_size:
        ids = ids[-model.config.block_size:]
    for i in range(args.num_samples):
        out = generate(model, np.asarray(ids).reshape(1, -1), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed + i, use_cache=args.use_cache)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + tok.decode(out[0, len(ids):]))
