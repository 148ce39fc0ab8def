"""``npformer finetune``: fine-tune a pretrained GPT or BERT checkpoint and print its test score.

    npformer finetune --ckpt out-pretrain --task sentiment                  # full fine-tuning
    npformer finetune --ckpt out-pretrain --task sentiment --freeze         # linear probe
    npformer finetune --ckpt out-pretrain --task sentiment --from-scratch   # same architecture, random init
    npformer finetune --resume                                              # continue a stopped run
    npformer finetune --ckpt out-bert --task qa --out out-qa                # BERT: question answering
"""

from __future__ import annotations

import argparse
import dataclasses

from .. import backend


def add_parser(subparsers) -> None:
    from ..training.finetune import BERT_TASKS, TASKS, FinetuneConfig
    d = FinetuneConfig()
    p = subparsers.add_parser("finetune", help="fine-tune a pretrained GPT or BERT on a task",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # required for a new run (checked in run(), since --resume takes the run's own)
    p.add_argument("--ckpt", default=None,
                   help="a pretraining run directory (its latest checkpoint), a checkpoint, or an HF BERT "
                        "directory (config.json, model.safetensors, vocab.txt); None: only with --resume, which "
                        "takes the run's own")
    p.add_argument("--task", choices=sorted(set(TASKS) | set(BERT_TASKS)), default=d.task,
                   help="sentiment: classify (GPT or BERT); qa: extractive question answering (BERT)")
    p.add_argument("--train-examples", type=int, default=d.train_examples,
                   help="--task qa: training questions (None: 4,000); the validation and test questions stay the same")
    p.add_argument("--freeze", action="store_true", help="train only the classifier head (a linear probe)")
    p.add_argument("--from-scratch", action="store_true",
                   help="the checkpoint's architecture with random weights, trained with the same budget")
    p.add_argument("--reinit-layers", type=int, default=d.reinit_layers,
                   help="BERT: draw the top N encoder layers fresh (with --seed) and keep the lower ones pretrained")
    p.add_argument("--max-iters", type=int, default=d.max_iters, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW, warmup + cosine)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the pooled vector, before the head")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="new weights: seed, batch order: seed + 1, dropout: seed + 2")
    p.add_argument("--device", choices=backend.DEVICES, default=None, help="None: $NPFORMER_DEVICE, else cpu")
    p.add_argument("--out", default=d.out, help="directory for the fine-tuned classifier's checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint, with the settings "
                        "stored there (flags given again override them)")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept in --out, the newest (0: all)")
    p.set_defaults(run=run)


def run(args) -> None:
    from .. import distributed
    from ..training.finetune import FinetuneConfig, finetune
    if args.ckpt is None:
        raise ValueError("--ckpt is required: the pretraining run to fine-tune (with --resume, the run's own)")
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})
    # under mpiexec -n N, one of N ranks (docs/distributed.md); finetune quiets the others' log
    summary, comm = distributed.run_launched(finetune, cfg, cfg.device or backend.default_device())
    if comm is not None and comm.rank != 0:
        return
    if "test_accuracy" in summary:
        print(f"test accuracy: {summary['test_accuracy']:.4f} "
              f"({round(summary['test_accuracy'] * summary['n_test'])}/{summary['n_test']})")
    else:
        print(f"test exact match: {summary['test_exact_match']:.1f}%, F1 {summary['test_f1']:.1f}% "
              f"({summary['n_test']} questions)")
