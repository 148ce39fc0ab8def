"""Does pretraining help? The sentiment task fine-tuned from a pretrained GPT, trained from scratch,
and probed linearly, with one budget.

    python benchmarks/finetune_sentiment.py                      # pretrain first (default settings)
    python benchmarks/finetune_sentiment.py out-pretrain         # reuse a pretraining run directory

Without a run directory it pretrains with the default settings of ``npformer pretrain`` into
WORK/pretrain. Then, on the checkpoint's architecture, with the same steps, batch size, batches
(seed), schedule and head initialisation (npformer.training.finetune):

    full fine-tuning       pretrained weights, all of them trained
    from scratch           random weights, all trained (at --lr, and again at --scratch-lr)
    linear probe           pretrained weights frozen, only the head trained

and, for scale, two logistic regressions on words (npformer.data.sentiment): a bag of words, which
cannot beat chance on this task, and the last two words, which solve it. Prints one table with
test accuracy (1000 examples) and the wall time of each part, and writes WORK/results.json.
BLAS runs single-threaded by default (--threads): on small matrices and shared cores extra
threads cost more than they give.
"""

import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default=None, help="an existing pretraining run directory")
    ap.add_argument("--work", default=os.path.join("runs", "finetune-sentiment"),
                    help="directory for the runs (must not hold them already)")
    ap.add_argument("--max-iters", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scratch-lr", type=float, default=3e-3,
                    help="a second from-scratch run at this lr (its better one here); 0 skips it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)             # read when NumPy loads BLAS: set before the import

    from npformer.data import sentiment
    from npformer.training.finetune import FinetuneConfig, finetune
    from npformer.training.pretrain import PretrainConfig, pretrain

    quiet = lambda *a: None                             # noqa: E731
    load_start = os.getloadavg()[0]
    rows, timing = [], {}
    ckpt = args.run_dir
    if ckpt is None:
        ckpt = os.path.join(args.work, "pretrain")
        print(f"pretraining with the default settings into {ckpt} ...", file=sys.stderr)
        t0 = time.perf_counter()
        s = pretrain(PretrainConfig(out=ckpt), log=quiet)
        timing["pretrain"] = time.perf_counter() - t0
        print(f"pretrained in {timing['pretrain']:.0f} s: val loss {s['val_loss']:.4f} nats/char "
              f"({s['gap_percent']:+.1f}% over the entropy floor)", file=sys.stderr)

    runs = [("full fine-tuning", dict(), args.lr),
            ("from scratch", dict(from_scratch=True), args.lr)]
    if args.scratch_lr:
        runs.append(("from scratch", dict(from_scratch=True), args.scratch_lr))
    runs.append(("linear probe", dict(freeze=True), args.lr))
    for i, (name, kw, lr) in enumerate(runs):
        cfg = FinetuneConfig(ckpt=ckpt, max_iters=args.max_iters, batch_size=args.batch_size, lr=lr,
                             seed=args.seed, device=args.device, out=os.path.join(args.work, f"ft-{i}"), **kw)
        print(f"{name} (lr {lr:g}) ...", file=sys.stderr)
        s = finetune(cfg, log=quiet)
        rows.append({"model": name, "lr": lr, **{k: s[k] for k in ("trainable", "train_loss", "val_accuracy",
                                                                    "test_accuracy", "seconds", "out")}})

    splits = sentiment.sentiment_splits()
    t0 = time.perf_counter()
    for name, feats in (("bag of words (logistic regression)", sentiment.bag_of_words),
                        ("last two words (logistic regression)", sentiment.final_bigram)):
        rows.append({"model": name, "lr": None, "trainable": None, "train_loss": None,
                     "val_accuracy": sentiment.baseline_accuracy(splits, feats, "val"),
                     "test_accuracy": sentiment.baseline_accuracy(splits, feats, "test"), "seconds": None})
    timing["baselines"] = time.perf_counter() - t0

    print(f"\nsentiment task: {len(splits['train'][0])} train / {len(splits['val'][0])} val / "
          f"{len(splits['test'][0])} test examples; {args.max_iters} steps of {args.batch_size} examples; "
          f"checkpoint {ckpt}")
    print("| model | lr | trainable params | final train loss | val acc | test acc | time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [r["model"], "" if r["lr"] is None else f"{r['lr']:g}",
                 "" if r["trainable"] is None else f"{r['trainable']:,}",
                 "" if r["train_loss"] is None else f"{r['train_loss']:.4f}",
                 f"{r['val_accuracy']:.3f}", f"{r['test_accuracy']:.3f}",
                 "" if r["seconds"] is None else f"{r['seconds']:.0f} s"]
        print("| " + " | ".join(cells) + " |")
    if "pretrain" in timing:
        print(f"pretraining (default settings): {timing['pretrain']:.0f} s")
    load_end = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPU cores, BLAS threads {args.threads}, 1-minute load average "
          f"{load_start:.1f} at the start and {load_end:.1f} at the end (other work shares the cores)")
    os.makedirs(args.work, exist_ok=True)
    with open(os.path.join(args.work, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "timing": timing, "ckpt": ckpt, "args": vars(args),
                   "load_average": [load_start, load_end]}, f, indent=1)


if __name__ == "__main__":
    main()
