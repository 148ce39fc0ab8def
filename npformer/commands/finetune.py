"""``npformer finetune``: fine-tune a pretrained GPT checkpoint as a classifier and print its test accuracy.

    npformer finetune --ckpt out-pretrain --task sentiment                  # full fine-tuning
    npformer finetune --ckpt out-pretrain --task sentiment --freeze         # linear probe
    npformer finetune --ckpt out-pretrain --task sentiment --from-scratch   # same architecture, random init
"""

from __future__ import annotations

import argparse

from .. import backend


def add_parser(subparsers) -> None:
    from ..training.finetune import TASKS, FinetuneConfig
    d = FinetuneConfig()
    p = subparsers.add_parser("finetune", help="fine-tune a pretrained GPT on a classification task",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # required, so it has no default to show in --help
    p.add_argument("--ckpt", required=True, default=argparse.SUPPRESS,
                   help="a pretraining run directory (its latest checkpoint) or a checkpoint")
    p.add_argument("--task", choices=sorted(TASKS), default=d.task, help="the classification task")
    p.add_argument("--freeze", action="store_true", help="train only the classifier head (a linear probe)")
    p.add_argument("--from-scratch", action="store_true",
                   help="the checkpoint's architecture with random weights, trained with the same budget")
    p.add_argument("--max-iters", type=int, default=d.max_iters, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW, warmup + cosine)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="new weights: seed, batch order: seed + 1, dropout: seed + 2")
    p.add_argument("--device", choices=backend.DEVICES, default=None, help="None: $NPFORMER_DEVICE, else cpu")
    p.add_argument("--out", default=d.out, help="directory for the fine-tuned classifier's checkpoint")
    p.set_defaults(run=run)


def run(args) -> None:
    from ..training.finetune import FinetuneConfig, finetune
    cfg = FinetuneConfig(ckpt=args.ckpt, task=args.task, freeze=args.freeze, from_scratch=args.from_scratch,
                         max_iters=args.max_iters, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         device=args.device, out=args.out)
    summary = finetune(cfg)
    print(f"test accuracy: {summary['test_accuracy']:.4f} "
          f"({round(summary['test_accuracy'] * summary['n_test'])}/{summary['n_test']})")
