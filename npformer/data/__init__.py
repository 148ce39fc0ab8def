"""Data for pretraining: tokenizers, the built-in toy language, text loading and batch sampling."""

from .corpus import ToyLanguage, default_corpus
from .dataset import BatchSampler, DataError, DataFileNotFoundError, load_text, split_train_val
from .tokenizers import ByteBPETokenizer, CharTokenizer, load_tokenizer
from .wordpiece import WordPieceTokenizer
from .mlm import mask_tokens
from .tasks import TASKS, TaskTokenizer, get_task     # also registers TaskTokenizer with load_tokenizer
from .wordpiece_stream import WordPieceStream   # registers the "wordpiece" type with load_tokenizer
