"""Models built from npformer.nn: a GPT language model, the encoder-decoder Transformer, and a
sequence classifier over either."""

from .classifier import SequenceClassifier
from .gpt import GPT, GPTConfig, KVCache
from .seq2seq import DecoderKVCache, Seq2SeqConfig, Seq2SeqTransformer

__all__ = ["GPT", "GPTConfig", "KVCache", "Seq2SeqTransformer", "Seq2SeqConfig", "DecoderKVCache",
           "SequenceClassifier"]
