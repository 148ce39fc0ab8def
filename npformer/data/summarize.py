"""A summarization task in the toy language, with an independent checker of every reference summary.

Rule: the summary is the sentences whose subject is the document's most frequent subject noun (the
topic; singular and plural count as one noun), in order, each with its subject written "the NOUN":

    my big cat sees a dog. our dogs sleep. some cats find the red boat. a king runs.
    -> the cat sees a dog. the cats find the red boat.                     (topic: cat, 2 of 4)

- document = 3 to 5 sentences "det [adj] subject verb [det [adj] object]." in lower case, one
  space between sentences; subjects are animate nouns, objects animate nouns or things, the
  determiner and the verb agree with their noun; words are the toy language's
  (npformer.data.corpus) drawn uniformly within their class;
- the topic is the subject noun of k = 2 or 3 sentences (never all of them); every other subject
  noun is the subject of fewer than k sentences, so the topic is unique and the summary non-empty.
  The topic may also appear as an object elsewhere: only subjects count;
- documents are at most MAX_SRC_LEN characters and summaries at most MAX_TGT_LEN (longer draws are
  drawn again), which fits the default char-level seq2seq model.

``document(rng)`` draws a document and renders its summary from the parts it drew. ``summary_of(text)``
finds the summary again from the text alone, by parsing each sentence against the grammar and
counting the subjects' nouns, and raises ValueError for a text the task cannot hold (an unknown
word, a sentence off the grammar, no unique most frequent subject). The task itself,
npformer.data.tasks.SummarizeTask, trains on the generator's pairs and uses summary_of as its
source -> target map; tests/test_summarize.py checks that the two agree on thousands of draws.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from .corpus import ADJECTIVES, ANIMATE, DETERMINERS, INTRANSITIVE, P_DET, P_PLURAL, THINGS, TRANSITIVE

MAX_SRC_LEN = 150
MAX_TGT_LEN = 64
N_SENTENCES = (3, 5)                # fewest and most sentences in a document
TOPIC_COUNTS = (2, 3)               # the topic is the subject of this many sentences (fewer than all)
P_ADJECTIVE = 0.3                   # P(one adjective in a noun phrase)
P_TRANSITIVE = 0.6
WORDS = sorted({w for group in DETERMINERS.values() for w in group} | set(ADJECTIVES)
               | {w for pair in ANIMATE + THINGS + TRANSITIVE + INTRANSITIVE for w in pair})
CHARS = "".join(sorted(set(" ." + "".join(WORDS))))        # the source and target alphabet


# ----------------------------------------------------------------------------- generator

def noun_phrase(rng: np.random.Generator, nouns, noun: int = None) -> tuple:
    """(determiner, adjective or None, noun form, plural) of "det [adj] noun", agreeing in number;
    nouns[noun] if noun is given, else a noun drawn from nouns."""
    group = ("sg", "pl", "any")[rng.choice(3, p=[P_DET[g] for g in ("sg", "pl", "any")])]
    det = DETERMINERS[group][rng.integers(len(DETERMINERS[group]))]
    plural = {"sg": False, "pl": True, "any": bool(rng.random() < P_PLURAL)}[group]
    adj = ADJECTIVES[rng.integers(len(ADJECTIVES))] if rng.random() < P_ADJECTIVE else None
    pair = nouns[int(rng.integers(len(nouns))) if noun is None else noun]
    return det, adj, pair[int(plural)], plural


def render(parts: tuple, short_subject: bool = False) -> str:
    """The text of a sentence (subject NP, verb, object NP or None) ending in "."; with the subject
    written "the NOUN" when short_subject is True (a summary clause)."""
    (det, adj, noun, _), verb, obj = parts
    words = ["the", noun] if short_subject else [det, *([adj] if adj else []), noun]
    words.append(verb)
    if obj is not None:
        det, adj, noun, _ = obj
        words += [det, *([adj] if adj else []), noun]
    return " ".join(words) + "."


def sentence(rng: np.random.Generator, subject: int) -> tuple:
    """(subject NP, verb, object NP or None): one sentence about ANIMATE[subject]."""
    subj = noun_phrase(rng, ANIMATE, subject)
    if rng.random() < P_TRANSITIVE:
        verb, obj = TRANSITIVE[rng.integers(len(TRANSITIVE))], noun_phrase(rng, ANIMATE + THINGS)
    else:
        verb, obj = INTRANSITIVE[rng.integers(len(INTRANSITIVE))], None
    return subj, verb[int(subj[3])], obj                     # (3sg, base): plural subjects take the base


def subjects(rng: np.random.Generator) -> tuple:
    """(topic, list of subject nouns per sentence): the topic k times, the others fewer times each."""
    n = int(rng.integers(N_SENTENCES[0], N_SENTENCES[1] + 1))
    k = int(rng.integers(TOPIC_COUNTS[0], min(TOPIC_COUNTS[1], n - 1) + 1))
    topic = int(rng.integers(len(ANIMATE)))
    others = [i for i in range(len(ANIMATE)) if i != topic]
    while True:
        rest = [others[i] for i in rng.integers(len(others), size=n - k).tolist()]
        if max(Counter(rest).values()) < k:
            break
    order = rng.permutation(n).tolist()
    return topic, [([topic] * k + rest)[i] for i in order]


def document(rng: np.random.Generator) -> tuple:
    """(document, summary) drawn with rng (see the module docstring); the summary is rendered from
    the drawn parts: the topic's sentences, each subject written "the NOUN"."""
    while True:
        topic, nouns = subjects(rng)
        parts = [sentence(rng, s) for s in nouns]
        text = " ".join(render(p) for p in parts)
        summary = " ".join(render(p, short_subject=True) for p, s in zip(parts, nouns) if s == topic)
        if len(text) <= MAX_SRC_LEN and len(summary) <= MAX_TGT_LEN:
            return text, summary


# ----------------------------------------------------------------------------- independent checker

_DETS = {d: group for group, dets in DETERMINERS.items() for d in dets}
_ANIMATE = {form: pair[0] for pair in ANIMATE for form in pair}          # subject form -> lemma
_NOUNS = {form: plural for pair in ANIMATE + THINGS for plural, form in enumerate(pair)}
_VERBS = {form: (plural, transitive) for transitive, verbs in ((False, INTRANSITIVE), (True, TRANSITIVE))
          for pair in verbs for plural, form in enumerate(pair)}


def _parse_np(words: list, i: int, nouns: dict, text: str) -> tuple:
    """(noun, index past "det [adj] noun" starting at words[i]) with det and noun agreeing."""
    if i >= len(words) or words[i] not in _DETS:
        raise ValueError(f"expected a determiner at word {i + 1} of {text!r}")
    det, i = words[i], i + 1
    if i < len(words) and words[i] in ADJECTIVES:
        i += 1
    if i >= len(words) or words[i] not in nouns:
        raise ValueError(f"expected a noun at word {i + 1} of {text!r}")
    plural = _NOUNS[words[i]]
    if {"sg": plural, "pl": not plural, "any": False}[_DETS[det]]:
        raise ValueError(f"{det!r} does not agree with {words[i]!r} in {text!r}")
    return words[i], i + 1


def parse_sentence(text: str) -> tuple:
    """(lemma, clause) of one sentence "det [adj] noun verb [det [adj] noun]." of the grammar: the
    singular form of its subject noun, and the sentence with its subject written "the NOUN" (the
    summary's clause); ValueError naming what is wrong otherwise."""
    words = text.rstrip(".").split(" ")
    noun, i = _parse_np(words, 0, _ANIMATE, text)
    if i >= len(words) or words[i] not in _VERBS:
        raise ValueError(f"expected a verb at word {i + 1} of {text!r}")
    plural, transitive = _VERBS[words[i]]
    if plural != _NOUNS[noun]:
        raise ValueError(f"{words[i]!r} does not agree with {noun!r} in {text!r}")
    end = _parse_np(words, i + 1, _NOUNS, text)[1] if transitive else i + 1
    if end != len(words):
        raise ValueError(f"unexpected words after word {end} of {text!r}")
    return _ANIMATE[noun], " ".join(["the", *words[i - 1:]]) + "."


def summary_of(text: str) -> str:
    """The reference summary of a document, read off its text: the sentences whose subject noun is
    the most frequent one, in order, each with its subject written "the NOUN". ValueError if the text
    is not a document of the task (a sentence off the grammar, no unique most frequent subject)."""
    sentences = re.findall(r"[^.]+\.", text)
    if not sentences or " ".join(s.strip() for s in sentences) != text:
        raise ValueError(f"not a document of sentences ending in '.' separated by one space: {text!r}")
    sentences = [s.strip() for s in sentences]
    parsed = [parse_sentence(s) for s in sentences]
    (top, n), *rest = Counter(t for t, _ in parsed).most_common(2) + [(None, 0)]
    if rest[0][1] == n:
        raise ValueError(f"no unique most frequent subject: {top!r} and {rest[0][0]!r} are the subject of "
                         f"{n} sentences each")
    return " ".join(clause for t, clause in parsed if t == top)


def normalize(text: str) -> str:
    """User input in the form documents are drawn: lower case, single spaces, a space after every
    ".", a final "."; ValueError (one line) for a character other than a letter, space or ".", and for
    words outside WORDS (so every character is one of CHARS)."""
    text = " ".join(text.lower().replace(".", ". ").split()).replace(" .", ".")
    if text and not text.endswith("."):
        text += "."
    bad = sorted(set(text) - set(" .abcdefghijklmnopqrstuvwxyz"))
    if bad:
        raise ValueError(f"summarize: the input may hold only letters, spaces and '.'; got "
                         f"{', '.join(repr(c) for c in bad[:10])}")
    unknown = sorted(set(text.replace(".", " ").split()) - set(WORDS))
    if unknown:
        raise ValueError(f"summarize: {len(unknown)} word(s) outside the task's vocabulary: "
                         f"{', '.join(repr(w) for w in unknown[:10])}")
    if not text.replace(".", "").strip():
        raise ValueError("summarize: the input has no words")
    return text


# ----------------------------------------------------------------------------- ROUGE

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_MISSING = "ROUGE needs the rouge-score package: pip install rouge-score (or pip install -e '.[rouge]')"


def rouge_scores(references, predictions) -> dict:
    """{"rouge1", "rouge2", "rougeL"}: the F-measure of each prediction against its reference, averaged
    over the pairs, in [0, 1]. Computed by rouge-score (Google's implementation of Lin, 2004) with its
    default tokenizer (lower case, runs of letters and digits; "." is dropped) and no stemming, so
    "cat" and "cats" are different words. ImportError(ROUGE_MISSING) when rouge-score is not installed."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError(ROUGE_MISSING) from None
    if len(references) != len(predictions) or not references:
        raise ValueError(f"rouge_scores needs as many predictions ({len(predictions)}) as references "
                         f"({len(references)}), at least one")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for ref, pred in zip(references, predictions):
        scores = scorer.score(ref, pred)                       # score(target, prediction)
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: v / len(references) for k, v in totals.items()}
