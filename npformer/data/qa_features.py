"""Extractive question answering as BERT reads it: examples -> model inputs, and logits -> answer spans.

One row per example (qa.py's dicts: "id", "question", "context", "answer_text", "answer_start"):

    [CLS] question [SEP] context [SEP] [PAD] ...
      0     0 .. 0   0    1 .. 1    1    0        <- token_type_ids (BERT's segments A and B)

start_positions / end_positions are the indices of the answer's first and last token (inclusive),
as HF's BertForQuestionAnswering takes them. Only the context is truncated (HF's "only_second");
an answer cut off by max_length is an error, never a silently wrong label.

WordPieceTokenizer gives no character offsets, so token_offsets() tokenizes the text again word by
word, as the basic tokenizer does (split on whitespace, then around punctuation), and counts the
characters of each WordPiece: a piece "##ing" covers the 3 characters after the previous piece. A
word whose normalised form changes length (accents stripped) or that becomes [UNK] gets the whole
word's span for each of its pieces. The tokens are checked against tokenizer.tokenize(text).

best_spans() decodes the model's output: per row, the (s, e) with s <= e, both in the context and
e - s < max_answer_tokens, maximising start_logits[s] + end_logits[e], as characters of the context.
"""

from __future__ import annotations

import re

import numpy as np

from .wordpiece_basic import is_punctuation

FEATURE_KEYS = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions", "offsets")


def token_offsets(tokenizer, text: str) -> tuple:
    """(tokens, offsets): tokenizer.tokenize(text) and per token its (start, end) characters in text."""
    tokens, offsets = [], []
    basic = tokenizer.basic
    for m in re.finditer(r"\S+", text):
        raw, at = m.group(), m.start()
        if raw in basic.never_split:
            pieces = [(0, len(raw))]
        else:                                   # runs of non-punctuation, and each punctuation alone
            pieces, start = [], 0
            for i, ch in enumerate(raw):
                if is_punctuation(ch):
                    pieces += [(start, i)] * (i > start) + [(i, i + 1)]
                    start = i + 1
            pieces += [(start, len(raw))] * (len(raw) > start)
        for a, b in pieces:
            for word in basic.split_word(raw[a:b]):
                subs = [word] if word in tokenizer.never_split else tokenizer.wordpiece(word)
                if len(word) == b - a and tokenizer.unk_token not in subs:
                    pos = at + a
                    for piece in subs:                  # each piece covers its own characters
                        n = len(piece) - 2 if piece.startswith("##") else len(piece)
                        offsets.append((pos, pos + n))
                        pos += n
                else:                                   # length changed: the whole word, per piece
                    offsets += [(at + a, at + b)] * len(subs)
                tokens += subs
    if tokens != tokenizer.tokenize(text):
        raise ValueError(f"token_offsets cannot follow the tokenizer on {text[:60]!r} (special tokens "
                         "or control characters in the text?)")
    return tokens, offsets


def qa_features(tokenizer, examples, max_length: int, padding: str = "longest") -> dict:
    """Model inputs and labels for a list of QA examples; N = len(examples).

    Returns int64 arrays: input_ids, token_type_ids, attention_mask (N, L); start_positions,
    end_positions (N,); offsets (N, L, 2), the (start, end) characters of each context token in its
    context and (-1, -1) for [CLS], the question, [SEP] and [PAD]. L is the longest row (padding
    "longest") or max_length ("max_length"). The context is cut to fit max_length; ValueError if
    that cuts into the answer, if the question alone does not fit, or if the answer is not where
    answer_start says. An example without "answer_text" (a question to answer) gets positions 0
    ([CLS]) and is never cut: a context that does not fit is a ValueError.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 4:
        raise ValueError(f"qa_features: max_length must be an int >= 4, got {max_length!r}")
    if padding not in ("longest", "max_length"):
        raise ValueError(f"qa_features: padding must be 'longest' or 'max_length', got {padding!r}")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = []
    for ex in examples:
        name, context, labelled = ex.get("id", "?"), ex["context"], "answer_text" in ex
        a0 = int(ex["answer_start"]) if labelled else 0
        a1 = a0 + len(ex["answer_text"]) if labelled else len(context)
        if labelled and (not ex["answer_text"].strip() or context[a0:a1] != ex["answer_text"]):
            raise ValueError(f"example {name}: answer {ex['answer_text']!r} is not at character {a0} "
                             f"of its context")
        question = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(ex["question"]))
        room = max_length - len(question) - 3                  # context tokens that fit
        if room < 1:
            raise ValueError(f"example {name}: the question alone has {len(question)} tokens; with "
                             f"[CLS] and two [SEP] it leaves no context in max_length={max_length}")
        tokens, offsets = token_offsets(tokenizer, context)
        inside = [i for i, (s, e) in enumerate(offsets) if s < a1 and e > a0]
        if not labelled and len(tokens) > room:
            raise ValueError(f"example {name}: its context has {len(tokens)} tokens, but max_length={max_length} "
                             f"keeps {room} after the question; shorten the context")
        if not inside:
            raise ValueError(f"example {name}: no token of its context covers the answer {ex['answer_text']!r}")
        if inside[-1] >= room:
            raise ValueError(f"example {name}: the answer (characters {a0}:{a1}, context tokens "
                             f"{inside[0]}..{inside[-1]}) is cut off by max_length={max_length}, which "
                             f"keeps {room} context tokens")
        tokens, offsets = tokens[:room], offsets[:room]
        head = len(question) + 2                                 # [CLS] question [SEP]
        rows.append({
            "input_ids": [cls, *question, sep, *tokenizer.convert_tokens_to_ids(tokens), sep],
            "token_type_ids": [0] * head + [1] * (len(tokens) + 1),
            "offsets": [(-1, -1)] * head + offsets + [(-1, -1)],
            "start_positions": head + inside[0] if labelled else 0,
            "end_positions": head + inside[-1] if labelled else 0})
    L = max_length if padding == "max_length" else max((len(r["input_ids"]) for r in rows), default=0)
    N = len(rows)
    out = {"input_ids": np.full((N, L), tokenizer.pad_token_id, dtype=np.int64),
           "token_type_ids": np.zeros((N, L), dtype=np.int64),
           "attention_mask": np.zeros((N, L), dtype=np.int64),
           "offsets": np.full((N, L, 2), -1, dtype=np.int64),
           "start_positions": np.array([r["start_positions"] for r in rows], dtype=np.int64).reshape(N),
           "end_positions": np.array([r["end_positions"] for r in rows], dtype=np.int64).reshape(N)}
    for n, r in enumerate(rows):
        T = len(r["input_ids"])
        out["input_ids"][n, :T] = r["input_ids"]
        out["token_type_ids"][n, :T] = r["token_type_ids"]
        out["attention_mask"][n, :T] = 1
        out["offsets"][n, :T] = r["offsets"]
    return out


def _host(a, name, shape) -> np.ndarray:
    """a (NumPy or CuPy) as a float64 NumPy array of the given shape."""
    if not isinstance(a, np.ndarray) and hasattr(a, "get"):
        a = a.get()
    a = np.asarray(a, dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"best_spans: {name} has shape {a.shape}, the features need {shape}")
    return a


def best_spans(start_logits, end_logits, features: dict, max_answer_tokens: int = 30) -> list:
    """The best answer span per row, as (start_char, end_char): answer = context[start_char:end_char].

    start_logits, end_logits: (N, L); features: qa_features' dict (its "offsets" (N, L, 2) mark the
    context tokens). Maximises start_logits[s] + end_logits[e] over context tokens s <= e with
    e - s < max_answer_tokens; scores (rows, L, L) are built a block of rows at a time.
    """
    offsets = np.asarray(features["offsets"])
    N, L = offsets.shape[:2]
    start, end = _host(start_logits, "start_logits", (N, L)), _host(end_logits, "end_logits", (N, L))
    if not (isinstance(max_answer_tokens, (int, np.integer)) and max_answer_tokens >= 1):
        raise ValueError(f"best_spans: max_answer_tokens must be an int >= 1, got {max_answer_tokens!r}")
    valid = offsets[..., 0] >= 0                                    # (N, L) context tokens
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    band = (j >= i) & (j - i < max_answer_tokens)                   # (L, L) allowed (s, e)
    spans = []
    block = max(1, (1 << 22) // max(1, L * L))
    for lo in range(0, N, block):
        v = valid[lo:lo + block]
        ok = band & v[:, :, None] & v[:, None, :]                   # (B, L, L)
        score = np.where(ok, start[lo:lo + block, :, None] + end[lo:lo + block, None, :], -np.inf)
        best = score.reshape(len(v), -1).argmax(1)                  # (B,) flat index s * L + e
        s, e = np.divmod(best, L)
        for n, (si, ei) in enumerate(zip(s.tolist(), e.tolist())):
            if not ok[n, si, ei]:
                raise ValueError(f"best_spans: row {lo + n} has no context token")
            spans.append((int(offsets[lo + n, si, 0]), int(offsets[lo + n, ei, 1])))
    return spans


def answer_questions(model, tokenizer, questions, contexts, max_length: int = None,
                     max_answer_tokens: int = 30) -> list:
    """The answers (str, spans of their contexts) of a BertForQuestionAnswering to questions[i] about
    contexts[i]. max_length: None takes the model's max_position_embeddings; a context longer than
    that leaves is a ValueError (never cut short silently)."""
    from ..autograd import no_grad
    if isinstance(questions, str) or isinstance(contexts, str) or len(questions) != len(contexts):
        raise ValueError("answer_questions: questions and contexts must be lists of str of the same length")
    examples = [{"id": f"question {i}", "question": q, "context": c} for i, (q, c) in enumerate(zip(questions, contexts))]
    features = qa_features(tokenizer, examples, max_length or model.config.max_position_embeddings)
    was_training = model.training
    try:
        with no_grad():
            out = model.eval()(features["input_ids"], features["attention_mask"], features["token_type_ids"])
    finally:
        model.train(was_training)
    spans = best_spans(out.start_logits.data, out.end_logits.data, features, max_answer_tokens)
    return [c[a:b] for c, (a, b) in zip(contexts, spans)]
