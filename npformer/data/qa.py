"""An extractive question-answering task in the toy language, with SQuAD's metrics.

Each example is a passage of 3 to 5 transitive sentences, a question about one of them, and the
answer, a span of the passage:

    The sad dog sees my cats behind a hill. Some kings follow a tall boat now. A fox likes the men.
    what does the dog see             -> "my cats"          (kind "what": the object)
    who follows a tall boat           -> "Some kings"       (kind "who": the subject)
    where does the dog see my cats    -> "behind a hill"    (kind "where": the place)

- sentence = subject NP, transitive verb agreeing with it, object NP, then nothing, an adverb or a
  prepositional phrase; NP = determiner, at most one adjective, noun (subjects animate, objects
  animate or things, places things), drawn with the toy language's word lists;
- within a passage the subjects' nouns are distinct (so "the dog" names one sentence whatever its
  determiner) and so are the (verb, object) pairs (so "who follows a tall boat" does too);
- questions: "what does|do the NOUN VERB" (answer: the object NP), "who VERBS OBJECT" (answer: the
  subject NP, capitalised as in the passage), and, for sentences with a place, "where does|do the
  NOUN VERB OBJECT" (answer: the prepositional phrase). "does"/"do" agree with NOUN.

answer_of() finds the answer again by parsing the text alone, and checks that the question matches
exactly one sentence. Words are the toy language's plus "what", "who", "where", "does", "do", whose
letters all occur in it; questions are lower case without "?" (the toy corpus has no "?" and no
capital W), so every character is one of default_corpus()'s. Passage and question together have at
most MAX_WORDS = 60 words, which fits 128 WordPiece tokens with [CLS] and two [SEP].

An example is a dict {"id": str, "question": str, "context": str, "answer_text": str,
"answer_start": int}, with context[answer_start:answer_start + len(answer_text)] == answer_text
(SQuAD's fields, flattened: one answer per question).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

from .corpus import ADJECTIVES, ADVERBS, ANIMATE, DETERMINERS, P_DET, P_PLURAL, PREPOSITIONS, THINGS, TRANSITIVE

FUNCTION_WORDS = ("what", "who", "where", "does", "do")
KINDS = ("what", "who", "where")
MAX_WORDS = 60
N_SENTENCES = (3, 5)               # fewest and most sentences in a passage
P_ADJECTIVE = 0.3                  # P(one adjective in a noun phrase)
P_TAIL = (0.25, 0.4)               # P(adverb), P(prepositional phrase) after the object; else none


# ----------------------------------------------------------------------------- generator

def noun_phrase(rng: np.random.Generator, nouns, capital: bool = False) -> tuple:
    """(text, noun index, plural): "det [adj] noun" with determiner and noun agreeing in number."""
    group = ("sg", "pl", "any")[rng.choice(3, p=[P_DET[g] for g in ("sg", "pl", "any")])]
    det = DETERMINERS[group][rng.integers(len(DETERMINERS[group]))]
    plural = {"sg": False, "pl": True, "any": bool(rng.random() < P_PLURAL)}[group]
    words = [det.capitalize() if capital else det]
    if rng.random() < P_ADJECTIVE:
        words.append(ADJECTIVES[rng.integers(len(ADJECTIVES))])
    noun = int(rng.integers(len(nouns)))
    words.append(nouns[noun][int(plural)])
    return " ".join(words), noun, plural


def sentence(rng: np.random.Generator, subject: int) -> dict:
    """One sentence about ANIMATE[subject], as its parts: {"subject", "plural", "noun", "verb" (base
    form), "object", "tail" ("" or " adverb" or " place"), "place" (the PP or None), "text"}."""
    subj, _, plural = noun_phrase(rng, ANIMATE[subject:subject + 1], capital=True)
    verb = TRANSITIVE[rng.integers(len(TRANSITIVE))]
    obj = noun_phrase(rng, ANIMATE + THINGS)[0]
    u, place, tail = rng.random(), None, ""
    if u < P_TAIL[0]:
        tail = " " + ADVERBS[rng.integers(len(ADVERBS))]
    elif u < P_TAIL[0] + P_TAIL[1]:
        place = PREPOSITIONS[rng.integers(len(PREPOSITIONS))] + " " + noun_phrase(rng, THINGS)[0]
        tail = " " + place
    text = f"{subj} {verb[int(plural)]} {obj}{tail}."
    return {"subject": subj, "plural": plural, "noun": ANIMATE[subject][int(plural)], "verb": verb[1],
            "verb_3sg": verb[0], "object": obj, "place": place, "text": text}


def example(rng: np.random.Generator) -> dict:
    """One example {"question", "context", "answer_text", "answer_start"} (no "id"), see the docstring."""
    while True:
        n = int(rng.integers(N_SENTENCES[0], N_SENTENCES[1] + 1))
        subjects = rng.permutation(len(ANIMATE))[:n].tolist()          # distinct subject nouns
        sentences, pairs = [], set()
        for s in subjects:
            while True:                                                # distinct (verb, object) pairs
                sent = sentence(rng, s)
                if (sent["verb"], sent["object"]) not in pairs:
                    break
            pairs.add((sent["verb"], sent["object"]))
            sentences.append(sent)
        context = " ".join(sent["text"] for sent in sentences)
        starts = np.cumsum([0] + [len(sent["text"]) + 1 for sent in sentences]).tolist()
        target = int(rng.integers(n))
        sent, at = sentences[target], starts[target]
        kinds = KINDS if sent["place"] is not None else KINDS[:2]
        kind = kinds[rng.integers(len(kinds))]
        aux = "do" if sent["plural"] else "does"
        if kind == "what":
            question, answer = f"what {aux} the {sent['noun']} {sent['verb']}", sent["object"]
            start = at + len(sent["subject"]) + len(sent["verb_3sg" if not sent["plural"] else "verb"]) + 2
        elif kind == "who":
            question, answer, start = f"who {sent['verb_3sg']} {sent['object']}", sent["subject"], at
        else:
            question, answer = f"where {aux} the {sent['noun']} {sent['verb']} {sent['object']}", sent["place"]
            start = at + len(sent["text"]) - 1 - len(sent["place"])
        if len(context.split()) + len(question.split()) <= MAX_WORDS:
            assert context[start:start + len(answer)] == answer
            return {"question": question, "context": context, "answer_text": answer, "answer_start": start}


def qa_splits(n_train: int = 4000, n_val: int = 500, n_test: int = 1000, seed: int = 0) -> dict:
    """{"train", "val", "test"} -> list of example dicts (module docstring), seeded by `seed`.

    Examples with distinct passages are drawn until there are n_test + n_val + n_train: the first
    n_test are the test split, the next n_val the validation split, the rest the training split. No
    passage (so no (question, context) pair) is in two splits, and the held-out splits do not depend
    on n_train: more training examples are scored on the same test questions.
    Ids are "{split}-{index}", the index as wide as the split's largest, e.g. "val-007" of 500.
    """
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"qa_splits: {name} must be a positive integer; got {n!r}")
    rng = np.random.default_rng(seed)
    total = n_train + n_val + n_test
    seen: dict = {}                                   # context -> example, in order of first draw
    for _ in range(50 * total):
        ex = example(rng)
        seen.setdefault(ex["context"], ex)
        if len(seen) == total:
            break
    else:
        raise ValueError(f"qa_splits: could not draw {total} distinct passages")
    items = list(seen.values())
    cuts = {"train": range(n_test + n_val, total), "val": range(n_test, n_test + n_val), "test": range(n_test)}
    return {name: [{"id": f"{name}-{i:0{len(str(len(idx) - 1))}d}", **items[j]} for i, j in enumerate(idx)]
            for name, idx in cuts.items()}


# ----------------------------------------------------------------------------- independent checker

_DETS = {d for group in DETERMINERS.values() for d in group}
_SUBJECTS = {form: plural for pair in ANIMATE for plural, form in enumerate(pair)}
_NOUNS = {form for pair in ANIMATE + THINGS for form in pair}
_PLACES = {form for pair in THINGS for form in pair}
_VERB_BASE = {form: pair[1] for pair in TRANSITIVE for form in pair}      # any form -> base form


def _phrase(words, i, nouns):
    """Index just past the NP "det adj* noun" that starts at words[i]; ValueError if there is none."""
    if i >= len(words) or words[i][0].lower() not in _DETS:
        raise ValueError(f"expected a determiner at word {i}")
    i += 1
    while i < len(words) and words[i][0] in ADJECTIVES:
        i += 1
    if i >= len(words) or words[i][0] not in nouns:
        raise ValueError(f"expected a noun at word {i}")
    return i + 1


def parse_sentence(text: str, offset: int) -> dict:
    """The parts of one passage sentence as (start, end) character spans shifted by offset:
    {"subject", "object", "place" (or None)}, plus "noun" (the subject's), "verb" (base form) and
    "object_text"."""
    words = [(m.group(), m.start() + offset, m.end() + offset) for m in re.finditer(r"[A-Za-z]+", text)]
    j = _phrase(words, 0, _SUBJECTS)
    if j >= len(words) or words[j][0] not in _VERB_BASE:
        raise ValueError(f"no transitive verb after the subject in {text!r}")
    k = _phrase(words, j + 1, _NOUNS)
    rest, place = words[k:], None
    if len(rest) == 1 and rest[0][0] in ADVERBS:
        pass
    elif rest and rest[0][0] in PREPOSITIONS and _phrase(rest, 1, _PLACES) == len(rest):
        place = (rest[0][1], rest[-1][2])
    elif rest:
        raise ValueError(f"cannot parse the end of {text!r}")
    return {"subject": (words[0][1], words[j - 1][2]), "object": (words[j + 1][1], words[k - 1][2]),
            "place": place, "noun": words[j - 1][0], "verb": _VERB_BASE[words[j][0]],
            "object_text": " ".join(w for w, _, _ in words[j + 1:k])}


def answer_of(question: str, passage: str) -> tuple:
    """(answer_text, answer_start) read off the texts: the span of the one sentence the question asks
    about. ValueError if the question has none of the three forms, or matches 0 or 2+ sentences."""
    sentences = [parse_sentence(m.group(), m.start()) for m in re.finditer(r"[^.]+\.", passage)]
    q = question.split()
    if len(q) >= 5 and q[0] in ("what", "where") and q[1] in ("do", "does") and q[2] == "the":
        noun, verb, obj = q[3], q[4], " ".join(q[5:])
        if noun not in _SUBJECTS or _SUBJECTS[noun] != (q[1] == "do") or _VERB_BASE.get(verb) != verb:
            raise ValueError(f"malformed question {question!r}")
        if (q[0] == "what") != (obj == ""):
            raise ValueError(f"malformed question {question!r}")
        hits = [s for s in sentences if s["noun"] == noun and s["verb"] == verb
                and (q[0] == "what" or s["object_text"] == obj)]
        part = "object" if q[0] == "what" else "place"
    elif len(q) >= 4 and q[0] == "who" and q[1] in _VERB_BASE and _VERB_BASE[q[1]] != q[1]:
        hits = [s for s in sentences if s["verb"] == _VERB_BASE[q[1]] and s["object_text"] == " ".join(q[2:])]
        part = "subject"
    else:
        raise ValueError(f"not a question of this task: {question!r}")
    if len(hits) != 1 or hits[0][part] is None:
        raise ValueError(f"question {question!r} matches {len(hits)} sentences (with a {part}) of the passage")
    start, end = hits[0][part]
    return passage[start:end], start


# ----------------------------------------------------------------------------- SQuAD metrics

def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation, drop the articles a/an/the, one space."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Token-level F1 of the normalised answers: 2 P R / (P + R) over the common tokens (as
    multisets); 1.0 if both are empty, 0.0 if only one is."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions, truths) -> dict:
    """{"exact_match": %, "f1": %}: the means over examples, times 100. truths[i] is a str or a list of
    acceptable answers, of which the best one counts (as in SQuAD)."""
    if len(predictions) != len(truths) or not predictions:
        raise ValueError(f"squad_metrics needs as many predictions ({len(predictions)}) as truths "
                         f"({len(truths)}), at least one")
    em = f1 = 0.0
    for pred, truth in zip(predictions, truths):
        golds = [truth] if isinstance(truth, str) else list(truth)
        em += max(exact_match(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1 / len(predictions)}
