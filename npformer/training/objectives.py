"""What ``npformer pretrain`` trains: a causal LM (GPT, LLaMA, LSTM, GRU) or a masked LM (BERT), behind one
interface.

The loop in pretrain.py draws blocks of token ids from the corpus, runs a step, evaluates, saves and
resumes the same way for both models; an objective supplies what differs:

    objective.model                  what the loop calls: model(x, y) -> (logits, loss), loss the mean
                                     over the targets that are not ignore_index (parallel.py splits
                                     batches by that count)
    objective.saved                  the module whose state_dict a checkpoint stores (meta["model"]
                                     = objective.kind, meta["model_config"] = its config)
    objective.batch(sampler)         (x, y) host int64 arrays for one step
    objective.evaluate(ids, seed)    {"loss": ..., and for BERT "accuracy": ...} over fixed batches
    objective.show(tok, text, log)   what the end of a run prints: samples, or filled-in masks

CausalLM (GPT): x = a block of block_size ids, y = x shifted by one; every position is a target.
LlamaLM (LLaMA): the same batches and loss, on a LlamaForCausalLM (RMSNorm, RoPE, SwiGLU, grouped-query
attention with --n-kv-head key/value heads; no biases, untied embeddings, as LLaMA).
RecurrentLM (LSTM, GRU): the same batches and loss, on an RNNLM (models/rnn_lm.py) of --n-layer recurrent
layers --n-embd wide; truncated backpropagation through time over each block, every block from a zero
state. Its samples carry the state from token to token, with no window.

MaskedLM (BERT): x = [CLS] + a block of block_size - 2 ids + [SEP], then data.mask_tokens chooses 15%
of the ordinary tokens (80% -> [MASK], 10% -> a random id, 10% kept); y = the original id at the
chosen positions, -100 elsewhere. The loss is the cross-entropy over the chosen positions (the
"masked-token loss") and the accuracy the fraction of them predicted exactly. The masking draws from
its own generator (seed + 5), stored in the checkpoint, so a resumed run masks as the uninterrupted
run would. Evaluation masks with a fixed generator, so every evaluation scores the same positions, and
shows every chosen token as [MASK]: a kept token would be visible to the model, and its loss could go
below the floor of a hidden one.
"""

from __future__ import annotations

import numpy as np

from .. import backend, nn
from ..autograd import no_grad
from ..data import BatchSampler, WordPieceStream, mask_tokens
from ..data.mlm import IGNORE_INDEX
from ..models.bert import BertConfig
from ..models.bert_heads import BertForMaskedLM
from ..models.gpt import GPT, GPTConfig
from ..models.llama import LlamaConfig, LlamaForCausalLM
from ..models.rnn_lm import RNNLM, RNNLMConfig
from ..models.sampling import generate
from ..tensor import Tensor
from .memory import shard_plan

MODELS = ("gpt", "bert", "llama", "lstm", "gru")
RECURRENT = ("lstm", "gru")             # RNNLM cells: no attention heads
SHOWN = 40                              # tokens of each block shown by MaskedLM.show


def make_objective(cfg, tok):
    """The objective of cfg.model (one of MODELS) for a checked PretrainConfig and its tokenizer."""
    return {"gpt": CausalLM, "bert": MaskedLM, "llama": LlamaLM, "lstm": RecurrentLM,
            "gru": RecurrentLM}[cfg.model](cfg, tok)


def llama_intermediate_size(n_embd: int) -> int:
    """SwiGLU's width for a LLaMA as wide as a GPT of n_embd: three C x I matrices hold the 8 C^2 weights
    of GPT's two C x 4C ones when I = 8C/3 (LLaMA's rule), rounded up to a multiple of 8."""
    return -(-8 * n_embd // 24) * 8


def _pieces(cfg) -> np.ndarray:
    """Row edges cutting an evaluation batch into as many pieces as a training step's shards, so an
    evaluation never holds more activations at once than one shard of a training step."""
    return np.linspace(0, cfg.batch_size, shard_plan(cfg)[0] + 1).astype(int)


class CausalLM:
    """GPT: predict every next token."""

    kind = "gpt"
    ignore_index = -1                   # GPT's loss counts every target; parallel.py's default
    accuracy = False                    # evaluate reports the loss only

    def __init__(self, cfg, tok):
        self.cfg, self.tok = cfg, tok
        self.config = GPTConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                                n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
        self.model = self.saved = GPT(self.config, generator=np.random.default_rng(cfg.seed), device=cfg.device)

    def sampler(self, ids, seed: int) -> BatchSampler:
        return BatchSampler(ids, self.cfg.block_size, self.cfg.batch_size, seed=seed)

    def batch(self, sampler: BatchSampler) -> tuple:
        return sampler.sample()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def evaluate(self, ids, seed: int) -> dict:
        """Mean loss over cfg.eval_iters batches drawn with `seed` (the same batches every time)."""
        return {"loss": float(np.mean([self._scores(x, y)[0] for x, y in self._batches(ids, seed)]))}

    def _batches(self, ids, seed: int):
        sampler = self.sampler(ids, seed)
        for _ in range(self.cfg.eval_iters):
            yield self.batch(sampler)

    def _scores(self, x, y) -> tuple:
        """(mean loss, correct predictions, targets) of one batch, run in pieces of rows."""
        cfg, model = self.cfg, self.model
        was_training = model.training
        model.eval()
        total = correct = count = 0.0
        edges = _pieces(cfg)
        with no_grad():
            for a, b in zip(edges[:-1], edges[1:]):
                xs, ys = backend.to_device(x[a:b], cfg.device), backend.to_device(y[a:b], cfg.device)
                logits, loss = model(xs, ys)
                n = int((y[a:b] != self.ignore_index).sum())
                if n:
                    total, count = total + loss.item() * n, count + n
                    if self.accuracy:
                        correct += int(((logits.data.argmax(-1) == ys) & (ys != self.ignore_index)).sum())
                del logits                  # a piece's logits are freed before the next piece runs
        model.train(was_training)
        return (total / count if count else float("nan")), correct, count

    def show(self, val_text: str, log) -> None:
        """cfg.samples continuations of the validation text's first character (WordPiece: first token)."""
        cfg, tok = self.cfg, self.tok
        prompt = tok.encode(val_text[:1])
        if prompt.size == 0:                # a space or a line break: WordPiece drops it
            prompt = tok.encode(val_text[:200])[:1]
        for i in range(cfg.samples):
            prompt = prompt.reshape(1, -1)
            ids = generate(self.saved, prompt, cfg.sample_tokens, temperature=0.8, top_k=None,
                           seed=cfg.seed + 10 + i,
                           window=cfg.block_size if self.kind == "llama" else None)   # the length it learned
            log(f"--- sample {i + 1} ---\n{tok.decode(ids[0])}")


class _CausalLMStep(nn.Module):
    """LlamaForCausalLM called as the loop calls a GPT: model(x, y) -> (logits, loss), y the next tokens
    (HF's labels are x itself, shifted inside the model; here the sampler has shifted them already)."""

    def __init__(self, lm: LlamaForCausalLM):
        super().__init__()
        self.lm = lm

    def forward(self, x, y):
        logits = self.lm(x).logits                                              # (B, T, V)
        B, T, V = logits.shape
        t = y.data if isinstance(y, Tensor) else y
        return logits, nn.functional.cross_entropy(logits.reshape(B * T, V), t.reshape(B * T), ignore_index=-1)


class LlamaLM(CausalLM):
    """LLaMA: predict every next token, as GPT does."""

    kind = "llama"

    def __init__(self, cfg, tok):
        self.cfg, self.tok = cfg, tok
        self.config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=cfg.n_embd,
                                  intermediate_size=llama_intermediate_size(cfg.n_embd), num_hidden_layers=cfg.n_layer,
                                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                                  max_position_embeddings=cfg.block_size, attention_dropout=cfg.dropout,
                                  bos_token_id=None, eos_token_id=None)
        self.saved = LlamaForCausalLM(self.config, generator=np.random.default_rng(cfg.seed), device=cfg.device)
        self.model = _CausalLMStep(self.saved)


class RecurrentLM(CausalLM):
    """LSTM or GRU (cfg.model): predict every next token, as GPT does, from an RNNLM called as a GPT."""

    def __init__(self, cfg, tok):
        self.cfg, self.tok, self.kind = cfg, tok, cfg.model
        self.config = RNNLMConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                                  n_embd=cfg.n_embd, cell=cfg.model, dropout=cfg.dropout, bias=cfg.bias)
        self.model = self.saved = RNNLM(self.config, generator=np.random.default_rng(cfg.seed), device=cfg.device)


class _MaskedLMStep(nn.Module):
    """BertForMaskedLM called as the loop calls a GPT: model(x, y) -> (logits, loss)."""

    def __init__(self, mlm: BertForMaskedLM):
        super().__init__()
        self.mlm = mlm

    def forward(self, x, y):
        out = self.mlm(x, labels=y)
        return out.logits, out.loss


class MaskedLM(CausalLM):
    """BERT: predict the masked tokens from both sides."""

    kind = "bert"
    ignore_index = IGNORE_INDEX
    accuracy = True                     # evaluate reports the masked-token accuracy too

    def __init__(self, cfg, tok):
        if not isinstance(tok, WordPieceStream):
            raise ValueError(f"--model bert needs --tokenizer wordpiece (its [CLS], [SEP] and [MASK] tokens); "
                             f"got --tokenizer {cfg.tokenizer}")
        self.cfg, self.tok, wp = cfg, tok, tok.wordpiece
        self.config = BertConfig(vocab_size=tok.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                                 num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.n_embd,
                                 hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                                 max_position_embeddings=cfg.max_positions, pad_token_id=wp.pad_token_id)
        self.saved = BertForMaskedLM(self.config, generator=np.random.default_rng(cfg.seed), device=cfg.device)
        self.model = _MaskedLMStep(self.saved)
        self.special = (wp.cls_token_id, wp.sep_token_id, wp.pad_token_id)
        self.mask_rng = np.random.default_rng(cfg.seed + 5)

    def sampler(self, ids, seed: int) -> BatchSampler:
        return BatchSampler(ids, self.cfg.block_size - 2, self.cfg.batch_size, seed=seed)

    def batch(self, sampler: BatchSampler, rng=None) -> tuple:
        """(masked input (B, block_size), labels (B, block_size)) from the sampler's next block."""
        block, _ = sampler.sample()                                       # (B, block_size - 2)
        cls, sep, _ = self.special
        B = len(block)
        rows = np.concatenate([np.full((B, 1), cls), block, np.full((B, 1), sep)], axis=1)
        return mask_tokens(rows, vocab_size=self.tok.vocab_size, mask_token_id=self.tok.wordpiece.mask_token_id,
                           special_ids=self.special, generator=self.mask_rng if rng is None else rng)

    def state_dict(self) -> dict:
        return {"mask_rng": backend.generator_state(self.mask_rng)}

    def load_state_dict(self, state: dict) -> None:
        backend.set_generator_state(self.mask_rng, state.get("mask_rng"))

    def evaluate(self, ids, seed: int) -> dict:
        """Masked-token loss and accuracy over cfg.eval_iters batches, sampled and masked with fixed seeds."""
        total = correct = count = 0.0
        for x, y in self._batches(ids, seed):
            loss, c, n = self._scores(x, y)
            if n:
                total, correct, count = total + loss * n, correct + c, count + n
        return {"loss": total / count, "accuracy": correct / count}

    def _batches(self, ids, seed: int):
        """Evaluation batches: every chosen token shown as [MASK] (none kept or replaced), so that each
        scored token is hidden and ToyLanguage.masked_floor() bounds the loss from below."""
        sampler, rng = self.sampler(ids, seed), np.random.default_rng(seed + 1000)
        for _ in range(self.cfg.eval_iters):
            x, y = self.batch(sampler, rng)
            yield np.where(y != IGNORE_INDEX, self.tok.wordpiece.mask_token_id, x), y

    def show(self, val_text: str, log) -> None:
        """cfg.samples validation blocks with masked tokens, and the model's guesses for them."""
        cfg, wp = self.cfg, self.tok.wordpiece
        sampler, rng = self.sampler(self.tok.encode(val_text[:20_000]), cfg.seed + 10), np.random.default_rng(cfg.seed + 11)
        x, y = self.batch(sampler, rng)
        chosen = y != IGNORE_INDEX
        x = np.where(chosen, wp.mask_token_id, x)           # every chosen token shown as [MASK]
        with no_grad():
            self.saved.eval()
            guess = backend.to_numpy(self.saved(backend.to_device(x, cfg.device)).logits.data.argmax(-1))
        shown = slice(1, min(SHOWN + 1, x.shape[1] - 1))      # [CLS], [SEP] and the tokens after SHOWN left out
        x, y, guess, chosen = x[:, shown], y[:, shown], guess[:, shown], chosen[:, shown]
        for i in range(min(cfg.samples, len(x))):
            n = int(chosen[i].sum())
            right = int((guess[i] == y[i])[chosen[i]].sum())
            log(f"--- fill-in {i + 1}: {right}/{n} masked tokens right ---\n"
                f"input: {wp.decode(x[i].tolist())}\n"
                f"model: {wp.decode(np.where(chosen[i], guess[i], x[i]).tolist())}\n"
                f"truth: {wp.decode(np.where(chosen[i], y[i], x[i]).tolist())}")
