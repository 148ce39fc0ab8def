"""``npformer pretrain``: train a GPT (or LLaMA, LSTM, GRU, BERT) language model, the built-in toy language by default.

    npformer pretrain                                    # a few minutes on a CPU
    npformer pretrain --model llama --out out-llama      # LLaMA's blocks on the same loop
    npformer pretrain --model bert --out out-bert        # a BERT masked LM with a WordPiece vocabulary
    npformer pretrain --model lstm --out out-lstm        # a recurrent LM (or --model gru)
    npformer pretrain --resume                           # continue the run in out-pretrain/
    npformer pretrain --data ../shared/data/tinyshakespeare.txt --out out-shakespeare
    mpiexec -n 2 npformer pretrain                       # two ranks share each batch (docs/distributed.md)

The flags follow nanoGPT's names; the loop is npformer/training/pretrain.py.
"""

from __future__ import annotations

import argparse
import dataclasses

from .. import backend
from . import DefaultsHelpFormatter


def add_parser(subparsers) -> None:
    from ..training.pretrain import PretrainConfig
    d = PretrainConfig()
    p = subparsers.add_parser("pretrain", help="train a GPT, LLaMA, LSTM, GRU or BERT language model (the built-in "
                                               "toy language by default)",
                       formatter_class=DefaultsHelpFormatter)
    g = p.add_argument_group("model")
    # no argparse choices: a wrong --model is refused in one line by PretrainConfig.checked
    g.add_argument("--model", metavar="{gpt,llama,lstm,gru,bert}", default=d.model,
                   help="gpt: a causal LM (predict the next token); llama: the same with LLaMA's blocks (RMSNorm, "
                        "rotary positions, SwiGLU, grouped-query attention, no biases); lstm, gru: the same with a "
                        "recurrent network (truncated backpropagation through each block); bert: a masked LM "
                        "(predict 15%% of the tokens, masked, from both sides)")
    g.add_argument("--n-layer", type=int, default=d.n_layer, help="Transformer blocks (lstm, gru: recurrent layers)")
    g.add_argument("--n-head", type=int, default=d.n_head, help="attention heads per block (not for lstm, gru)")
    g.add_argument("--n-kv-head", type=int, default=d.n_kv_head,
                   help="llama: key/value heads, dividing --n-head (grouped-query attention; None: --n-head)")
    g.add_argument("--n-embd", type=int, default=d.n_embd,
                   help="model width (embedding size; lstm, gru: also the hidden size)")
    g.add_argument("--block-size", type=int, default=d.block_size,
                   help="context length in tokens (lstm, gru: the length each training block is run over)")
    g.add_argument("--max-positions", type=int, default=d.max_positions,
                   help="bert: rows of the position table (None: --block-size); larger lets a --resume "
                        "continue on longer blocks, as BERT trains short sequences first")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout probability (0 disables)")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                   help="biases in Linear and LayerNorm (gpt; lstm, gru: in the recurrent and output layers; llama "
                        "has none)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per step (under mpiexec: the global batch, split evenly across the ranks)")
    g.add_argument("--max-iters", type=int, default=d.max_iters, help="training steps")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-iters", type=int, default=None,
                   help="linear warm-up steps (default: min(100, --max-iters // 10))")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="cosine decay length (default: --max-iters; with --resume, the checkpoint's)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay (not on biases and norms)")
    g.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0 disables)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval, help="evaluate and checkpoint every N steps")
    g.add_argument("--eval-iters", type=int, default=d.eval_iters, help="batches per evaluation")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for weights, batches and dropout")
    g.add_argument("--device", choices=backend.DEVICES, default=None, help="default: $NPFORMER_DEVICE or cpu")
    g.add_argument("--workers", type=int, default=None,
                   help="CPU workers (processes on Linux, else threads), each running the model "
                        "on its share of the batch (default: all usable cores; under mpiexec 1 per rank)")
    g.add_argument("--shards", type=int, default=None,
                   help="cut each batch into this many pieces, run one after another per worker "
                        "(gradient accumulation): more shards, less activation memory, a little "
                        "slower (default: on the CPU pieces of about 512 tokens, a multiple of "
                        "--workers; on a GPU one)")
    g.add_argument("--data", default=None, help="a UTF-8 text file (default: the built-in toy language)")
    g.add_argument("--tokenizer", choices=("char", "bpe", "wordpiece"), default=d.tokenizer,
                   help="character-level, byte-level BPE or WordPiece (None: char for gpt, wordpiece for bert)")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="vocabulary size for --tokenizer bpe and wordpiece (wordpiece: at most)")
    g.add_argument("--out", default=d.out, help="run directory for checkpoints, metrics.jsonl and loss.png")
    g.add_argument("--keep", type=int, default=d.keep,
                   help="checkpoints kept in --out, the newest (0: all); --resume falls back to an older "
                        "one when the newest is damaged")
    g.add_argument("--allow-data-change", action="store_true",
                   help="with --resume, continue even though the data file's contents changed")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the settings stored there "
                        "(flags given again override them)")
    g.add_argument("--samples", type=int, default=d.samples, help="samples printed at the end")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens, help="tokens per final sample")
    p.set_defaults(run=run)


def run(args) -> None:
    """Train in this process, or, started by an MPI launcher (``mpiexec -n N npformer pretrain``), as
    one of N ranks (docs/distributed.md): an error on one rank then ends all of them, in one line."""
    from .. import distributed
    from ..training.pretrain import PretrainConfig, pretrain
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    distributed.run_launched(pretrain, cfg, cfg.device or backend.default_device())
