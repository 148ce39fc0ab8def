"""WordPieceTokenizer: BERT's basic tokenization character by character, greedy longest-match WordPiece,
encode (pairs, truncation, padding, batches), decode, vocab.txt files and their errors.
Training is tested in test_wordpiece_train.py, agreement with transformers in test_wordpiece_hf.py."""

import json
import string

import numpy as np
import pytest

from npformer.data import WordPieceTokenizer
from npformer.data.wordpiece_basic import CJK_RANGES, BasicTokenizer, is_cjk, is_punctuation

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["un", "##aff", "##able", "hello", "world", "##s", "the", "cafe", "café", ",", "!", ".", "'", "a", "b",
         "##b", "##c", "x", "##x", "abc", "##d", "[", "]", "sep", "s", "-"]


def make(words=WORDS, **options):
    return WordPieceTokenizer(SPECIALS + list(words), **options)


def ids_of(tok, *tokens):
    return [tok.vocab[t] for t in tokens]


# ----------------------------------------------------------------------------- basic tokenization

@pytest.mark.parametrize("options, text, words", [
    ({}, "Hello,  World!", ["hello", ",", "world", "!"]),
    ({}, "hel\x00lo wor\x07ld\u200b x\ufffdy", ["hello", "world", "xy"]),      # NUL, BEL, ZWSP (Cf), U+FFFD dropped
    ({}, "a\u00a0b\tc\nd\re\u3000f", list("abcdef")),                        # NBSP and ideographic space are Zs
    ({}, "a\u2028b", ["a", "b"]),                   # U+2028 (Zl) is kept by cleaning, then str.split splits on it
    ({}, "", []), ({}, " \t\n ", []), ({}, "\x00\x01", []),
    ({}, "Café Naïve Ångström", ["cafe", "naive", "angstrom"]),
    ({"do_lower_case": False}, "Café Naïve Ångström", ["Café", "Naïve", "Ångström"]),
    ({"do_lower_case": False, "strip_accents": True}, "Café Naïve Ångström", ["Cafe", "Naive", "Angstrom"]),
    ({"strip_accents": False}, "Café Naïve Ångström", ["café", "naïve", "ångström"]),
    ({"do_lower_case": False}, "Cafe\u0301", ["Café"]),                  # NFC composes e + U+0301 into é
    ({}, "\u0301", []),                                                      # only a mark: stripped to nothing
    ({"strip_accents": False}, "ΟΔΟΣ", ["οδος"]),                            # str.lower: final sigma ς
    ({}, "hello中国world", ["hello", "中", "国", "world"]),
    ({"tokenize_chinese_chars": False}, "hello中国world", ["hello中国world"]),
    ({"strip_accents": False}, "ひらがな한국어", ["ひらがな한국어"]),          # kana and hangul are not CJK here
    ({}, "が", ["か"]),                                     # uncased BERT strips the dakuten too: it is an Mn mark
    ({}, "a-b--c", ["a", "-", "b", "-", "-", "c"]),
    ({}, "$5^2`x+y~z", ["$", "5", "^", "2", "`", "x", "+", "y", "~", "z"]),   # ASCII symbols (not P*) split too
    ({}, "¿qué?—sí…", ["¿", "que", "?", "—", "si", "…"]),                  # Unicode P* split
    ({}, "5€ 3×2", ["5€", "3×2"]),                                            # Sc / Sm outside ASCII do not split
    ({}, "😀x", ["😀x"]),
])
def test_basic_tokenization(options, text, words):
    tok = make(**options)
    assert tok.basic.tokenize(text) == words


def test_never_split_words_are_kept_whole_and_special_tokens_are_cut_out_of_raw_text():
    tok = make(never_split=["Don't"])
    assert tok.tokenize("Don't hello-world") == ["Don't", "hello", "-", "world"]
    assert tok.tokenize("hello[SEP]world [MASK]") == ["hello", "[SEP]", "world", "[MASK]"]
    assert tok.tokenize("[sep] [SE\x00P]") == ["[", "sep", "]", "[SEP]"]   # lower-case: not special; cleaned: is


def test_punctuation_is_every_ascii_symbol_and_unicode_p_categories():
    assert {c for c in map(chr, range(128)) if is_punctuation(c)} == set(string.punctuation)
    assert all(is_punctuation(c) for c in "¡«»‐–—‘’“”…、。「」")
    assert not any(is_punctuation(c) for c in "€£×÷©😀 a1é中")


def test_cjk_ranges_are_berts():
    assert CJK_RANGES == ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                          (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
    inside = [0x4E00, 0x9FFF, 0x3400, 0x4DBF, 0x20000, 0x2A6DF, 0x2A700, 0x2B81F, 0x2B820, 0x2B91F, 0x2CEAF,
              0xF900, 0xFAFF, 0x2F800, 0x2FA1F]
    outside = [0x4DFF, 0x4DC0, 0x33FF, 0xA000, 0x1FFFF, 0x2A6E0, 0x2A6FF, 0x2CEB0, 0xF8FF, 0xFB00, 0x2F7FF,
               0x2FA20, 0x3040, 0xAC00, 0x3000]
    assert all(is_cjk(chr(cp)) for cp in inside) and not any(is_cjk(chr(cp)) for cp in outside)


def test_basic_options_are_checked():
    with pytest.raises(TypeError, match="do_lower_case must be True or False"):
        BasicTokenizer(do_lower_case="yes")
    with pytest.raises(TypeError, match="strip_accents must be None, True or False"):
        BasicTokenizer(strip_accents=1)


# ----------------------------------------------------------------------------- WordPiece

def test_greedy_longest_match_first_without_backtracking():
    tok = make()
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tok.tokenize("abcd") == ["abc", "##d"]                   # "abc" beats "a" + "##b" + "##c"
    assert tok.tokenize("abx hellos") == ["a", "##b", "##x", "hello", "##s"]
    assert make(["ab", "a", "##bc"]).tokenize("abc") == ["[UNK]"]   # ab + ##c fails; a + ##bc is never tried
    assert tok.tokenize("helloz unaffablez") == ["[UNK]", "[UNK]"]  # one unmatched piece: the whole word


def test_words_over_max_input_chars_per_word_are_unk():
    tok = make()
    assert tok.tokenize("x" * 100) == ["x"] + ["##x"] * 99
    assert tok.tokenize("x" * 101 + " x") == ["[UNK]", "x"]
    assert make(max_input_chars_per_word=3).tokenize("xxx xxxx") == ["x", "##x", "##x", "[UNK]"]


def test_vocabulary_lookups():
    tok = make()
    assert tok.vocab_size == len(tok) == len(SPECIALS) + len(WORDS)
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == \
        [0, 1, 2, 3, 4] == tok.all_special_ids
    assert tok.convert_tokens_to_ids("hello") == 8 and tok.convert_tokens_to_ids(["world", "nope"]) == [9, 1]
    assert tok.convert_ids_to_tokens(8) == "hello"
    assert tok.convert_ids_to_tokens(np.array([2, 8, 3])) == ["[CLS]", "hello", "[SEP]"]
    assert tok.convert_ids_to_tokens([2, 8, 3], skip_special_tokens=True) == ["hello"]
    assert tok.get_vocab()["##s"] == 10


# ----------------------------------------------------------------------------- encode

def test_encode_single_and_pair():
    tok = make()
    out = tok.encode("Hello world!")
    assert set(out) == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(v.dtype == np.int64 and v.shape == (5,) for v in out.values())
    assert out["input_ids"].tolist() == ids_of(tok, "[CLS]", "hello", "world", "!", "[SEP]")
    pair = tok.encode("hello", "the worlds")
    assert pair["input_ids"].tolist() == ids_of(tok, "[CLS]", "hello", "[SEP]", "the", "world", "##s", "[SEP]")
    assert pair["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert pair["attention_mask"].tolist() == [1] * 7
    bare = tok.encode("hello", "world", add_special_tokens=False)
    assert bare["input_ids"].tolist() == ids_of(tok, "hello", "world") and bare["token_type_ids"].tolist() == [0, 0]
    assert tok.encode("")["input_ids"].tolist() == [2, 3]
    assert tok("hello")["input_ids"].tolist() == tok.encode("hello")["input_ids"].tolist()


@pytest.mark.parametrize("a, b, max_length, truncation, kept", [
    (7, None, 5, True, (3, None)),
    (7, None, 5, None, (3, None)),              # max_length alone turns on longest_first, as in HF
    (6, 2, 8, "longest_first", (3, 2)),         # only the longer one is cut
    (6, 6, 10, "longest_first", (4, 3)),        # 7 left for both: odd budget, the first text keeps the extra
    (3, 9, 10, True, (3, 4)),
    (4, 5, 8, True, (3, 2)),                    # first even out 4/4, then 5 to take: 2 from the first, 3 from the pair
    (6, 6, 10, "only_first", (1, 6)),
    (6, 6, 10, "only_second", (6, 1)),
    (6, 6, 30, True, (6, 6)),
])
def test_truncation(a, b, max_length, truncation, kept):
    tok = make()
    first, second = " ".join(["hello"] * a), None if b is None else " ".join(["world"] * b)
    ids = tok.encode(first, second, max_length=max_length, truncation=truncation)["input_ids"].tolist()
    expect = [2] + [8] * kept[0] + [3] + ([] if b is None else [9] * kept[1] + [3])
    assert ids == expect


def test_padding_to_max_length_and_impossible_lengths():
    tok = make()
    out = tok.encode("hello", "world", max_length=8, padding="max_length")
    assert out["input_ids"].tolist() == [2, 8, 3, 9, 3, 0, 0, 0]
    assert out["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert out["attention_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    long = tok.encode("hello " * 9, max_length=4, padding="max_length")        # no truncation asked for
    assert len(long["input_ids"]) == 11
    assert len(tok.encode("hello " * 9, max_length=4, padding="max_length", truncation=True)["input_ids"]) == 4
    with pytest.raises(ValueError, match="cannot fit a pair into max_length=2"):
        tok.encode("hello", "world", max_length=2)
    with pytest.raises(ValueError, match="'only_second' cannot fit"):
        tok.encode("hello " * 5, "world", max_length=4, truncation="only_second")
    with pytest.raises(ValueError, match="truncation needs max_length"):
        tok.encode("hello", truncation=True)
    assert len(make(model_max_length=6).encode("hello " * 9, truncation=True)["input_ids"]) == 6
    with pytest.raises(ValueError, match="truncation must be one of"):
        tok.encode("hello", truncation="longest")
    with pytest.raises(ValueError, match="padding must be one of"):
        tok.encode("hello", padding="left")
    with pytest.raises(ValueError, match="max_length must be"):
        tok.encode("hello", max_length=-1)


def test_encode_batch_pads_to_the_longest_or_to_max_length():
    tok = make()
    texts, pairs = ["hello", "hello world !", ""], ["world", "the", "a b"]
    out = tok.encode_batch(texts)
    assert all(v.shape == (3, 5) and v.dtype == np.int64 for v in out.values())
    assert out["input_ids"].tolist() == [[2, 8, 3, 0, 0], [2, 8, 9, 15, 3], [2, 3, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    for i, (a, b) in enumerate(zip(texts, pairs)):        # each row is encode's, padded
        row = tok.encode(a, b)
        batch = tok.encode_batch(texts, pairs, max_length=9, padding="max_length")
        n = len(row["input_ids"])
        for key in row:
            assert batch[key][i, :n].tolist() == row[key].tolist()
            assert batch[key][i, n:].tolist() == [0] * (9 - n)
    assert tok(texts, pairs, max_length=4, truncation=True)["input_ids"].shape == (3, 4)
    assert tok.encode_batch([])["input_ids"].shape == (0, 0)
    with pytest.raises(ValueError, match=r"texts\[1\] has 5 tokens, more than max_length=4"):
        tok.encode_batch(texts, max_length=4, padding="max_length")
    with pytest.raises(TypeError, match="texts must be a list of str"):
        tok.encode_batch("hello")
    with pytest.raises(ValueError, match="text_pairs must be a list as long as texts"):
        tok.encode_batch(texts, pairs[:2])
    with pytest.raises(ValueError, match="needs padding"):
        tok.encode_batch(texts, padding=False)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tok.encode_batch(["a", 3])


# ----------------------------------------------------------------------------- decode

def test_decode_glues_pieces_and_cleans_up_spaces():
    tok = make()
    ids = tok.encode("Hello worlds , the cafe ' s. unaffable!")["input_ids"]
    assert tok.decode(ids) == "[CLS] hello worlds, the cafe's. unaffable! [SEP]"
    assert tok.decode(ids, skip_special_tokens=True) == "hello worlds, the cafe's. unaffable!"
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == \
        "[CLS] hello worlds , the cafe ' s . unaffable ! [SEP]"
    pieces = [".", "?", "!", ",", "n't", "'m", "'s", "'ve", "'re", "' x"]       # each with a space before
    made = make(WORDS + ["?", "n't", "'m", "'s", "'ve", "'re"])
    assert made.decode(made.convert_tokens_to_ids(" ".join(["a"] + pieces).split())) == "a.?!,n't'm's've're'x"
    assert tok.decode(ids.tolist()) == tok.decode(ids)
    assert tok.decode(tok.vocab["##s"]) == "##s" and tok.decode([]) == ""
    assert tok.batch_decode(tok.encode_batch(["hello", "the world"])["input_ids"], skip_special_tokens=True) == \
        ["hello", "the world"]
    with pytest.raises(ValueError, match=r"token ids not in the vocabulary of 31: \[-1, 31\]"):
        tok.decode([5, 31, -1])
    with pytest.raises(ValueError, match="must be integers"):
        tok.decode([1.5])


# ----------------------------------------------------------------------------- files and errors

def test_vocab_file_round_trip(tmp_path):
    tok = make(do_lower_case=False, strip_accents=True, model_max_length=64)
    tok.save(tmp_path / "v.txt")
    assert (tmp_path / "v.txt").read_text(encoding="utf-8") == "".join(t + "\n" for t in tok.vocab_tokens)
    plain = WordPieceTokenizer.from_file(tmp_path / "v.txt")         # no config next to it: BERT's defaults
    assert plain.vocab_tokens == tok.vocab_tokens and plain.do_lower_case and plain.model_max_length is None
    tok.save(tmp_path)                                               # a directory: vocab.txt + the options
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is False and config["strip_accents"] is True and config["model_max_length"] == 64
    assert WordPieceTokenizer.from_file(tmp_path) == tok
    assert WordPieceTokenizer.from_file(tmp_path / "vocab.txt", do_lower_case=True).do_lower_case   # argument wins


def test_hf_config_options_are_read(tmp_path):
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in SPECIALS + WORDS), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": False, "tokenize_chinese_chars": False, "model_max_length": int(1e30),
         "tokenizer_class": "BertTokenizer", "clean_up_tokenization_spaces": True}))
    tok = WordPieceTokenizer.from_file(tmp_path / "vocab.txt")
    assert not tok.do_lower_case and not tok.tokenize_chinese_chars and tok.model_max_length is None
    assert tok.strip_accents is None
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": "no"}')
    with pytest.raises(ValueError, match="tokenizer_config.json: do_lower_case must be true or false"):
        WordPieceTokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        WordPieceTokenizer.from_file(tmp_path)


@pytest.mark.parametrize("lines, message", [
    (["[PAD]", "[CLS]", "[SEP]", "[MASK]", "a"], r"v\.txt lacks the special token\(s\) '\[UNK\]'"),
    (SPECIALS + ["a", "b", "a"], r"v\.txt: token 'a' appears twice, on lines 6 and 8"),
])
def test_bad_vocab_files(tmp_path, lines, message):
    path = tmp_path / "v.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        WordPieceTokenizer.from_file(path)


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocabulary file .*missing\.txt does not exist"):
        WordPieceTokenizer.from_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) '\[MASK\]'"):
        WordPieceTokenizer(SPECIALS[:4] + ["a"])
    with pytest.raises(ValueError, match="more than once"):
        WordPieceTokenizer(SPECIALS + ["a", "a"])
    with pytest.raises(ValueError, match="special tokens must be non-empty strings"):
        WordPieceTokenizer(SPECIALS, mask_token="")
    with pytest.raises(TypeError, match="vocab must be a list of token strings"):
        WordPieceTokenizer("vocab.txt")
    tok = make()
    for call in (lambda: tok.tokenize(b"hello"), lambda: tok.encode(None), lambda: tok(5)):
        with pytest.raises(TypeError, match="text must be a str"):
            call()
    with pytest.raises(TypeError, match="text_pair must be a str, got list"):
        tok.encode("hello", ["world"])
    with pytest.raises(ValueError, match="line break"):
        make(["a\rb"]).save(tmp_path / "v.txt")
    assert WordPieceTokenizer({t: i for i, t in enumerate(SPECIALS + WORDS)}) == tok
    with pytest.raises(ValueError, match="ids 0 .. len"):
        WordPieceTokenizer({"[UNK]": 3})
