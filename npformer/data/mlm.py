"""BERT's masked-language-model (MLM) masking: the tokens the model must predict, and what it sees.

Each position is *chosen* independently with probability ``mlm_probability`` (BERT: 0.15), but only
among ordinary tokens: special tokens ([CLS], [SEP], ...) and padding are never chosen. Of the
chosen positions

- 80% are replaced by the mask token ([MASK]),
- 10% by a random token id drawn uniformly from [0, vocab_size),
- 10% keep their original token,

so the model cannot learn that "only [MASK] positions matter". The labels hold the original id at
chosen positions and -100 (``cross_entropy``'s default ``ignore_index``) everywhere else, so the
loss is taken over the chosen positions only.

Like Hugging Face's ``DataCollatorForLanguageModeling``, the random replacement is drawn from the
whole vocabulary, special ids (even [MASK] or [PAD]) included; with a vocabulary of tens of
thousands that happens rarely enough not to matter.
"""

import numbers

import numpy as np

IGNORE_INDEX = -100     # label of positions that are not predicted (cross_entropy's ignore_index)


def _check_id(name, value, vocab_size):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer token id, got {value!r}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be in [0, vocab_size={vocab_size}), got {value}")


def mask_tokens(input_ids, *, vocab_size, mask_token_id, special_ids=(), attention_mask=None,
                mlm_probability=0.15, generator):
    """Mask a batch for MLM pretraining; returns ``(masked_input_ids, labels)``.

    input_ids:       integer array (B, T) of token ids in [0, vocab_size); never modified.
    vocab_size:      number of token ids; random replacements are drawn from [0, vocab_size).
    mask_token_id:   id of [MASK].
    special_ids:     ids never chosen for prediction (e.g. [CLS], [SEP], [PAD]).
    attention_mask:  optional (B, T) array of 0/1 (or bool); positions with 0 are padding and
                     never chosen.
    mlm_probability: chance that an eligible position is chosen, in (0, 1].
    generator:       a ``numpy.random.Generator``; the same seed gives the same masking.

    masked_input_ids: int64 (B, T): input_ids with 80% of the chosen positions set to
                      mask_token_id, 10% to a uniform random id (special ids included), 10% kept.
    labels:           int64 (B, T): the original id where chosen, -100 elsewhere.
    """
    if not isinstance(generator, np.random.Generator):
        raise TypeError("generator must be a numpy.random.Generator, "
                        f"got {type(generator).__name__}")
    if isinstance(vocab_size, (bool, np.bool_)) or not isinstance(vocab_size, numbers.Integral) \
            or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    p = mlm_probability
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
        raise ValueError(f"mlm_probability must be a number in (0, 1], got {mlm_probability!r}")
    _check_id("mask_token_id", mask_token_id, vocab_size)
    for sid in special_ids:
        _check_id("each of special_ids", sid, vocab_size)

    ids = np.asarray(input_ids)
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (B, T), got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(f"input_ids must be in [0, vocab_size={vocab_size}), found {bad}")
    ids = ids.astype(np.int64)                                  # a copy: the input stays as it was

    eligible = ~np.isin(ids, np.asarray(list(special_ids), dtype=np.int64))      # (B, T) bool
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has shape "
                             f"{ids.shape}; they must be equal")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        eligible &= mask.astype(bool)

    chosen = eligible & (generator.random(ids.shape) < mlm_probability)         # (B, T) bool
    how = generator.random(ids.shape)                  # < 0.8: [MASK]; < 0.9: random id; else keep
    random_ids = generator.integers(0, vocab_size, size=ids.shape, dtype=np.int64)

    labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int64)
    masked = ids
    masked[chosen & (how < 0.8)] = mask_token_id
    use_random = chosen & (how >= 0.8) & (how < 0.9)
    masked[use_random] = random_ids[use_random]
    return masked, labels
