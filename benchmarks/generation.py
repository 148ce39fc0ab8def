"""Generation speed: npformer's generate with and without the KV cache, and HF transformers'
generate on the same GPT-2-shaped model (weights copied with npformer.interop.to_torch).

    python benchmarks/generation.py
    python benchmarks/generation.py --n-layer 4 --n-embd 128 --new-tokens 100

Greedy decoding (top_k=1 for npformer, do_sample=False for HF), batch 1, float32, on the CPU.
Reports tokens/s of each, median over --repeats runs, and checks that the three produce the
same tokens.
"""

import argparse
import os
import statistics
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=65)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    from npformer.models import GPT, GPTConfig
    from npformer.models.sampling import generate
    cfg = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(cfg, generator=np.random.default_rng(0), device="cpu")
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.prompt_tokens))
    runs = {
        "npformer + KV cache": lambda: generate(model, prompt, args.new_tokens, top_k=1, use_cache=True),
        "npformer, no cache": lambda: generate(model, prompt, args.new_tokens, top_k=1, use_cache=False),
    }
    try:
        import torch
        from npformer.interop import to_torch
        torch.set_num_threads(args.threads)
        hf = to_torch(model).eval()
        pt = torch.from_numpy(prompt)

        def hf_generate():
            with torch.no_grad():
                out = hf.generate(pt, attention_mask=torch.ones_like(pt), max_new_tokens=args.new_tokens,
                                  do_sample=False, use_cache=True, pad_token_id=0)
            return out.numpy()
        runs["HF transformers generate"] = hf_generate
    except ImportError:
        print("(torch/transformers not installed: HF column skipped)")

    outputs, speed = {}, {}
    for name, fn in runs.items():
        fn()                                               # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            outputs[name] = fn()
            times.append(time.perf_counter() - t)
        speed[name] = args.new_tokens / statistics.median(times)
    print(f"model: {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size}; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new, greedy, threads {args.threads}")
    print(f"{'':<28} {'tokens/s':>10} {'vs npformer+cache':>18}")
    base = speed["npformer + KV cache"]
    for name, s in speed.items():
        print(f"{name:<28} {s:10.1f} {s / base:18.2f}")
    ref = outputs["npformer + KV cache"]
    same = {name: bool(np.array_equal(out, ref)) for name, out in outputs.items()}
    print("same tokens as npformer + KV cache:", same)


if __name__ == "__main__":
    main()
