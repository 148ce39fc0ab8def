"""QA model inputs: the layout BERT expects, labels that point exactly at the answer, character offsets,
truncation errors, and best_spans against a brute-force search."""

import numpy as np
import pytest

from npformer.data import WordPieceTokenizer, default_corpus
from npformer.data.qa import normalize_answer, qa_splits
from npformer.data.qa_features import FEATURE_KEYS, best_spans, qa_features, token_offsets

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def examples():
    return qa_splits(n_train=200, n_val=20, n_test=100, seed=1)["test"]


@pytest.fixture(scope="module", params=["pieces", "words"])
def tokenizer(request):
    """"pieces": a 120-token vocabulary, so most words are several pieces; "words": 400 tokens learned
    from a slice of the pretraining corpus and the passages, so most words are whole."""
    split = qa_splits(n_train=300, n_val=1, n_test=1, seed=2)["train"]
    texts = [ex["context"] + " " + ex["question"] for ex in split]
    if request.param == "pieces":
        return WordPieceTokenizer.train(texts, 120)
    return WordPieceTokenizer.train(texts + [default_corpus(20_000, 10)[0]], 400)


@pytest.fixture(scope="module")
def features(tokenizer, examples):
    return qa_features(tokenizer, examples, max_length=128)


def test_shapes_and_dtypes(features, examples):
    N, L = features["input_ids"].shape
    assert set(features) == set(FEATURE_KEYS) and N == len(examples)
    assert L == features["attention_mask"].sum(1).max() <= 128           # padded to the longest row
    for k in FEATURE_KEYS:
        assert features[k].dtype == np.int64
        assert features[k].shape == {"start_positions": (N,), "end_positions": (N,), "offsets": (N, L, 2)}.get(k, (N, L))


def test_rows_are_the_tokenizers_pair_encoding(tokenizer, features, examples):
    """[CLS] question [SEP] context [SEP], types 0 then 1, mask 1, then [PAD] with type 0 and mask 0."""
    for n, ex in enumerate(examples):
        ref = tokenizer.encode(ex["question"], ex["context"])
        T = len(ref["input_ids"])
        assert np.array_equal(features["input_ids"][n, :T], ref["input_ids"])
        assert np.array_equal(features["token_type_ids"][n, :T], ref["token_type_ids"])
        assert (features["attention_mask"][n, :T] == 1).all() and (features["attention_mask"][n, T:] == 0).all()
        assert (features["input_ids"][n, T:] == tokenizer.pad_token_id).all()
        assert (features["token_type_ids"][n, T:] == 0).all()


def test_offsets_mark_exactly_the_context_tokens(tokenizer, features, examples):
    for n, ex in enumerate(examples):
        ids, off = features["input_ids"][n], features["offsets"][n]
        seps = np.flatnonzero(ids == tokenizer.sep_token_id)
        assert len(seps) == 2
        in_context = np.zeros(len(ids), dtype=bool)
        in_context[seps[0] + 1:seps[1]] = True
        assert np.array_equal(off[:, 0] >= 0, in_context) and (off[~in_context] == -1).all()
        for token, (a, b) in zip(tokenizer.convert_ids_to_tokens(ids[in_context]), off[in_context].tolist()):
            assert ex["context"][a:b].lower() == token.removeprefix("##")


def test_positions_point_exactly_at_the_answer(tokenizer, features, examples):
    for n, ex in enumerate(examples):
        s, e = features["start_positions"][n], features["end_positions"][n]
        assert features["token_type_ids"][n, s] == 1 and s <= e
        decoded = tokenizer.decode(features["input_ids"][n, s:e + 1])
        assert decoded == ex["answer_text"].lower()
        assert normalize_answer(decoded) == normalize_answer(ex["answer_text"])
        a, b = features["offsets"][n, s, 0], features["offsets"][n, e, 1]
        assert ex["context"][a:b] == ex["answer_text"] and a == ex["answer_start"]


def test_best_spans_round_trip(features, examples):
    """One-hot logits at the gold positions give back the gold text, for every example."""
    N, L = features["input_ids"].shape
    start, end = np.zeros((N, L)), np.zeros((N, L))
    start[np.arange(N), features["start_positions"]] = 1.0
    end[np.arange(N), features["end_positions"]] = 1.0
    spans = best_spans(start, end, features)
    assert [ex["context"][a:b] for ex, (a, b) in zip(examples, spans)] == [ex["answer_text"] for ex in examples]


def test_best_spans_against_brute_force(features):
    rng = np.random.default_rng(0)
    N, L = features["input_ids"].shape
    start, end = rng.normal(size=(N, L)), rng.normal(size=(N, L))
    start[:, 1] = end[:, 1] = 100.0                      # a question token: must never be chosen
    for max_tokens in (1, 3, 30):
        spans = best_spans(start, end, features, max_answer_tokens=max_tokens)
        for n in range(0, N, 7):
            ctx = np.flatnonzero(features["offsets"][n, :, 0] >= 0)
            best = max((start[n, s] + end[n, e], s, e) for s in ctx for e in ctx if 0 <= e - s < max_tokens)
            off = features["offsets"][n]
            assert spans[n] == (off[best[1], 0], off[best[2], 1])


def test_best_spans_never_ends_before_it_starts(features):
    N, L = features["input_ids"].shape
    start, end = np.zeros((N, L)), np.zeros((N, L))
    last = features["attention_mask"].sum(1) - 2                     # the last context token
    start[np.arange(N), last] = 10.0                                  # best start after the best end
    end[:, features["start_positions"].min()] = 5.0                 # 10 + 0 at (last, last) wins
    for (a, b), n in zip(best_spans(start, end, features), range(N)):
        assert a == features["offsets"][n, last[n], 0] and b == features["offsets"][n, last[n], 1]


def test_best_spans_bad_shapes(features):
    N, L = features["input_ids"].shape
    with pytest.raises(ValueError, match=r"start_logits has shape \(3, 4\)"):
        best_spans(np.zeros((3, 4)), np.zeros((N, L)), features)
    with pytest.raises(ValueError, match="max_answer_tokens"):
        best_spans(np.zeros((N, L)), np.zeros((N, L)), features, max_answer_tokens=0)


def test_padding_to_max_length(tokenizer, examples):
    f = qa_features(tokenizer, examples[:5], max_length=128, padding="max_length")
    assert f["input_ids"].shape == (5, 128) and f["offsets"].shape == (5, 128, 2)
    assert np.array_equal(f["input_ids"] != tokenizer.pad_token_id, f["attention_mask"] == 1)


def answer_last(examples, tokenizer):
    """An example whose answer ends with the last word of its context, and the rows' token counts."""
    ex = next(ex for ex in examples if ex["answer_start"] + len(ex["answer_text"]) == len(ex["context"]) - 1)
    return ex, len(tokenizer.encode(ex["question"], ex["context"])["input_ids"])


def test_truncation_keeps_or_rejects_the_answer(tokenizer, examples):
    ex, T = answer_last(examples, tokenizer)
    kept = qa_features(tokenizer, [ex], max_length=T - 1)                 # drops only the final "."
    ref = tokenizer.encode(ex["question"], ex["context"], truncation="only_second", max_length=T - 1)
    assert np.array_equal(kept["input_ids"][0], ref["input_ids"])
    s, e = kept["start_positions"][0], kept["end_positions"][0]
    assert tokenizer.decode(kept["input_ids"][0, s:e + 1]) == ex["answer_text"].lower()
    with pytest.raises(ValueError, match=rf"example {ex['id']}: the answer \(characters "
                                         rf"{ex['answer_start']}:.*max_length={T - 2}"):
        qa_features(tokenizer, [ex], max_length=T - 2)


def test_a_question_longer_than_max_length(tokenizer, examples):
    ex = examples[0]
    n_question = len(tokenizer.tokenize(ex["question"]))
    with pytest.raises(ValueError, match=f"example {ex['id']}: the question alone has {n_question} tokens"):
        qa_features(tokenizer, [ex], max_length=n_question + 3)


def test_bad_inputs(tokenizer, examples):
    moved = dict(examples[0], answer_start=examples[0]["answer_start"] + 1)
    with pytest.raises(ValueError, match="is not at character"):
        qa_features(tokenizer, [moved], max_length=128)
    for bad in (3, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be"):
            qa_features(tokenizer, examples[:1], max_length=bad)
    with pytest.raises(ValueError, match="padding"):
        qa_features(tokenizer, examples[:1], max_length=128, padding="left")


def test_token_offsets_with_punctuation_and_accents():
    vocab = SPECIALS + ["hello", ",", "wor", "##ld", "-", "!", "cafe", "x"]
    tok = WordPieceTokenizer(vocab)
    text = "Hello,  wor-world!  Café xyz"
    tokens, offsets = token_offsets(tok, text)
    assert tokens == tok.tokenize(text)
    assert tokens == ["hello", ",", "wor", "-", "wor", "##ld", "!", "cafe", "[UNK]"]
    assert [text[a:b] for a, b in offsets] == ["Hello", ",", "wor", "-", "wor", "ld", "!", "Café", "xyz"]
    with pytest.raises(ValueError, match="cannot follow the tokenizer"):
        token_offsets(tok, "hello[SEP]x")          # cut out whole by tokenize, split by the basic rules


@pytest.mark.verify
def test_offsets_match_hf_bert_tokenizer_fast(tokenizer, features, examples, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    for n, ex in enumerate(examples[:40]):
        enc = hf(ex["question"], ex["context"], return_offsets_mapping=True)
        T = len(enc["input_ids"])
        assert features["input_ids"][n, :T].tolist() == enc["input_ids"]
        is_context = np.array(enc.sequence_ids()) == 1
        hf_offsets = np.array(enc["offset_mapping"])[is_context]
        assert np.array_equal(features["offsets"][n, :T][is_context], hf_offsets)
