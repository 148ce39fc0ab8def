"""Models built from npformer.nn: a GPT language model, BERT and its task heads, a LLaMA language
model, an LSTM or GRU language model, BART, T5, the encoder-decoder Transformer, and a sequence
classifier over a GPT or a Transformer."""

from .bart import BartConfig, BartForConditionalGeneration, BartModel
from .bert import BaseModelOutputWithPooling, BertConfig, BertModel
from .bert_heads import (BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification, MaskedLMOutput,
                         QuestionAnsweringModelOutput, SequenceClassifierOutput)
from .classifier import SequenceClassifier
from .gpt import GPT, GPTConfig, KVCache
from .llama import BaseModelOutputWithPast, CausalLMOutputWithPast, LlamaConfig, LlamaForCausalLM, LlamaModel
from .rnn_lm import RNNLM, RNNLMConfig, RNNState
from .seq2seq import DecoderKVCache, Seq2SeqConfig, Seq2SeqLMOutput, Seq2SeqModelOutput, Seq2SeqTransformer
from .t5 import T5Config, T5ForConditionalGeneration, T5Model

__all__ = ["GPT", "GPTConfig", "KVCache", "Seq2SeqTransformer", "Seq2SeqConfig", "DecoderKVCache",
           "SequenceClassifier", "BertConfig", "BertModel", "BertForMaskedLM", "BertForSequenceClassification",
           "BertForQuestionAnswering", "BaseModelOutputWithPooling", "MaskedLMOutput", "SequenceClassifierOutput",
           "QuestionAnsweringModelOutput", "LlamaConfig", "LlamaModel", "LlamaForCausalLM", "BaseModelOutputWithPast",
           "CausalLMOutputWithPast", "BartConfig", "BartModel", "BartForConditionalGeneration",
           "T5Config", "T5Model", "T5ForConditionalGeneration", "Seq2SeqModelOutput", "Seq2SeqLMOutput",
           "RNNLM", "RNNLMConfig", "RNNState"]
