"""nanoGPT's Shakespeare-char CPU recipe, trained by npformer: validation loss and ms/iter.

    python benchmarks/shakespeare.py                       # the full recipe (2000 iterations)
    python benchmarks/shakespeare.py --max-iters 200       # a quick look

Recipe: char-level tinyshakespeare (first 90% train, last 10% val), n_layer 4, n_head 4,
n_embd 128, block 64, batch 12, 2000 iterations, AdamW lr 1e-3 with 100 warmup steps and a
cosine decay to 1e-4, betas (0.9, 0.99), weight decay 0.1, grad clip 1.0, dropout 0.
The validation loss is the mean over --eval-iters (default 200) batches of the validation
split. Target: <= 1.93 (nanoGPT reports 1.88 for this recipe).
"""

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--eval-iters", type=int, default=200)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"shakespeare benchmark: {args.data} is absent")

    from npformer.training.pretrain import PretrainConfig, pretrain
    out = args.out or tempfile.mkdtemp(prefix="npformer-shakespeare-")
    cfg = PretrainConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                         max_iters=args.max_iters, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                         lr_decay_iters=args.max_iters, weight_decay=0.1, beta1=0.9, beta2=0.99,
                         grad_clip=1.0, dropout=0.0, eval_interval=args.max_iters, eval_iters=args.eval_iters,
                         seed=1337, device=args.device, data=args.data, tokenizer="char", out=out,
                         samples=1, sample_tokens=300)
    s = pretrain(cfg)
    print(f"\n| recipe | iters | val loss | ms/iter | wall (s) |\n|---|---|---|---|---|\n"
          f"| nanoGPT shakespeare-char CPU | {s['step']} | {s['val_loss']:.4f} | {s['ms_per_iter']:.1f} | "
          f"{s['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()
