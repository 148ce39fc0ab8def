"""``npformer generate --ckpt DIR``: sample text from a checkpoint written by ``npformer pretrain``.

    npformer generate --ckpt out-pretrain --prompt "the cat" --max-new-tokens 200

The checkpoint may hold a GPT, a LLaMA, an LSTM or a GRU (``npformer pretrain --model ...``).

The text is printed as it is produced, one flush per token (as Hugging Face's TextStreamer and
llama.cpp do), and the printed text is exactly the decode of all the sampled tokens.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .. import backend


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a pretrained checkpoint",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # required, so it has no default to show in --help
    p.add_argument("--ckpt", required=True, default=argparse.SUPPRESS,
                   help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default=None,
                   help="text to continue; None: a newline, or the first token when the vocabulary has none")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens sampled after the prompt")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits: below 1 sharpens the distribution, above 1 flattens it")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens; None: all")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the fewest most likely tokens whose probability reaches p; None: all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; sample i (from 1) uses seed + i - 1")
    p.add_argument("--num-samples", type=int, default=1,
                   help="independent samples, each under a '--- sample i ---' line when more than one")
    p.add_argument("--device", choices=backend.DEVICES, default=None, help="None: $NPFORMER_DEVICE, else cpu")
    p.add_argument("--cache", dest="use_cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the keys and values of earlier positions, or an LSTM's or GRU's recurrent state "
                        "(--no-cache recomputes every position each step; same tokens)")
    p.set_defaults(run=run)


class TextStream:
    """Prints the text of a growing list of token ids, flushing after every token.

    Each call decodes all the ids so far and prints what was not printed yet. Byte-level BPE can
    end a token inside a UTF-8 character, which decodes to U+FFFD until its last bytes arrive, so
    trailing U+FFFD characters are held back; end() prints the rest. Decoding runs left to right,
    so text before the held-back tail never changes, and the printed text equals tok.decode(ids).

    Use it as generate(..., on_token=stream) for a batch of one.
    """

    def __init__(self, tok, file=None):
        self.tok, self.file = tok, file          # file None: sys.stdout at the time of writing
        self.ids, self.printed = [], ""

    def __call__(self, new_ids) -> None:
        """new_ids: (1,) int, the newest token (generate's on_token)."""
        self.ids.extend(np.asarray(new_ids).reshape(-1).tolist())
        self._write(self.tok.decode(self.ids).rstrip("\ufffd"))

    def end(self) -> str:
        """Print what was held back; returns the whole text printed."""
        self._write(self.tok.decode(self.ids))
        return self.printed

    def _write(self, text: str) -> None:
        if len(text) > len(self.printed) and text.startswith(self.printed):
            print(text[len(self.printed):], end="", file=self.file or sys.stdout, flush=True)
            self.printed = text


def run(args) -> None:
    from ..models.sampling import generate
    from ..models.llama import LlamaForCausalLM
    from ..models.rnn_lm import RNNLM
    from ..training.loading import load_language_model
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
    if args.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0; got {args.seed}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1; got {args.num_samples}")
    model, tok = load_language_model(args.ckpt, device=args.device)
    llama = isinstance(model, LlamaForCausalLM)
    if llama:                               # the context a prompt is cropped to: the length it learned
        window = model.config.max_position_embeddings
    elif isinstance(model, RNNLM):          # its state runs on over any length: nothing is cropped
        window = None
    else:
        window = model.config.block_size
    if args.prompt is None:
        try:
            tok.encode("\n")
            args.prompt = "\n"
        except ValueError:                  # a character vocabulary without a newline
            args.prompt = tok.decode([0])
    ids = tok.encode(args.prompt)
    if window is not None and len(ids) > window:
        ids = ids[-window:]
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt, end="", flush=True)
        stream = TextStream(tok)
        generate(model, np.asarray(ids).reshape(1, -1), args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed + i, use_cache=args.use_cache,
                 on_token=stream, window=window if llama else None)
        stream.end()
        print(flush=True)
