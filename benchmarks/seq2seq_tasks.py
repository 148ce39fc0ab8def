"""Train the encoder-decoder Transformer on the toy tasks with the default settings of
``npformer seq2seq`` and report held-out accuracy.

    python benchmarks/seq2seq_tasks.py                          # copy and numbers
    python benchmarks/seq2seq_tasks.py --tasks copy reverse numbers dates --beam-size 4
    python benchmarks/seq2seq_tasks.py --tasks copy reverse numbers dates --archs transformer bart t5

Each task trains from scratch (default model, steps and seed), then decodes its test split
(1000 sources never seen in training) greedily, and with beam search when --beam-size > 1.
With several --archs each task is trained once per architecture (``npformer seq2seq --arch``), with
the same flags and seed. Prints: architecture, task, steps, training time (the optimizer steps only, not evaluation), exact match and
token accuracy. BLAS runs single-threaded by default (--threads): for matrices this small extra
threads give nothing and, on cores shared with other work, cost many times over.
"""

import argparse
import os
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["copy", "numbers"])
    ap.add_argument("--archs", nargs="+", default=["transformer"], help="transformer, bart, t5")
    ap.add_argument("--beam-size", type=int, default=1, help="> 1: also evaluate with beam search")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--keep", default=None, help="keep the run directories (with attention maps) under this folder")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)             # read when NumPy loads BLAS: set before the import

    from npformer.training.seq2seq import Seq2SeqTrainConfig, train

    root = args.keep or tempfile.mkdtemp(prefix="seq2seq-bench-")
    rows = []
    for arch in args.archs:
        for task in args.tasks:
            t0 = time.perf_counter()
            cfg = Seq2SeqTrainConfig(task=task, arch=arch, beam_size=args.beam_size,
                                     out=os.path.join(root, f"{arch}-{task}"),
                                     attention_maps=args.keep is not None and arch == "transformer")
            s = train(cfg, log=lambda *a: None)
            rows.append((arch, s, time.perf_counter() - t0))
            print(f"{arch} {task}: done", file=sys.stderr)
    if args.keep is None:
        import shutil
        shutil.rmtree(root, ignore_errors=True)

    head = "| arch | task | steps | train time (s) | total time (s) | exact match | token accuracy |"
    if args.beam_size > 1:
        head += f" exact match, beam {args.beam_size} | token accuracy, beam {args.beam_size} |"
    print(f"\nheld-out test split, {os.cpu_count()} CPU cores, {args.threads} BLAS thread(s)\n")
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for arch, s, total in rows:
        g = s["greedy"]
        line = (f"| {arch} | {s['task']} | {s['steps']} | {s['train_seconds']:.1f} | {total:.1f} | "
                f"{100 * g['exact_match']:.1f}% | {100 * g['token_accuracy']:.2f}% |")
        if "beam" in s:
            line += f" {100 * s['beam']['exact_match']:.1f}% | {100 * s['beam']['token_accuracy']:.2f}% |"
        print(line)


if __name__ == "__main__":
    main()
