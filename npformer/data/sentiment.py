"""A sentiment task in the toy language whose labels depend on word order.

Each example is two copular clauses joined by "but"; the label is the polarity of the clause
after "but":

    The sad dog is not happy but my cats are soft.       -> positive
    My cats are soft but the sad dog is not happy.       -> negative

- clause = subject noun phrase, "is"/"are" (agreeing in number), an optional "not", and a
  predicate adjective: NP = determiner, optionally one adjective (any of the toy language's ten,
  so "happy" and "sad" also appear as distractors before the noun), an animate noun;
- predicate adjectives carry the polarity: positive = ("happy", "soft"), negative = ("sad",
  "dark"); "not" flips it: polarity(clause) = polarity(adjective) XOR negated;
- the two clauses always have opposite polarities, and label = polarity(second clause).

Why a bag of words cannot do better than chance: the two clauses are drawn by the same process
given their polarities, and the label is uniform, so swapping them maps an example of one label
onto an equally likely example of the other with the same multiset of (case-folded) words and
the same length. P(bag of words | label) is the same for both labels; so is P(bag of n-grams |
label) for n-grams that leave out "but" (an n-gram such as "not sad but" does carry order). An
order-aware reader gets 100%: the last two words decide the label.

Words and spelling are the toy language's (npformer.data.corpus), plus the function words
"is", "are", "not", "but", whose letters all occur in it; sentences start with a capitalised
determiner as the toy language's do, so the text encodes with the char tokenizer of
default_corpus(). Examples are at most MAX_CHARS = 64 characters, so a model with a block size of
64 or more reads them whole.
"""

from __future__ import annotations

import numpy as np

from .corpus import ADJECTIVES, ANIMATE, DETERMINERS, P_DET, P_PLURAL

POSITIVE = ("happy", "soft")
NEGATIVE = ("sad", "dark")
LABELS = ("negative", "positive")           # label id -> name
FUNCTION_WORDS = ("is", "are", "not", "but")
MAX_CHARS = 64
P_ATTRIBUTIVE = 0.3                         # P(an adjective before the noun), as in the toy grammar
P_NEGATED = 0.5


def clause(rng: np.random.Generator, polarity: int, capital: bool) -> str:
    """One clause "det [adj] noun is|are [not] adjective" with the given polarity (0 or 1)."""
    group = ("sg", "pl", "any")[rng.choice(3, p=[P_DET[g] for g in ("sg", "pl", "any")])]
    det = DETERMINERS[group][rng.integers(len(DETERMINERS[group]))]
    plural = {"sg": False, "pl": True, "any": bool(rng.random() < P_PLURAL)}[group]
    words = [det.capitalize() if capital else det]
    if rng.random() < P_ATTRIBUTIVE:
        words.append(ADJECTIVES[rng.integers(len(ADJECTIVES))])
    words.append(ANIMATE[rng.integers(len(ANIMATE))][int(plural)])
    words.append("are" if plural else "is")
    negated = bool(rng.random() < P_NEGATED)
    if negated:
        words.append("not")
    lexicon = POSITIVE if polarity ^ negated else NEGATIVE     # adjective polarity = polarity XOR not
    words.append(lexicon[rng.integers(len(lexicon))])
    return " ".join(words)


def example(rng: np.random.Generator) -> tuple:
    """(text, label): "clause but clause." with opposite polarities; label = the second's."""
    label = int(rng.integers(2))
    return f"{clause(rng, 1 - label, capital=True)} but {clause(rng, label, capital=False)}.", label


def label_of(text: str) -> int:
    """The label read off the text by its order: the predicate of the clause after "but"."""
    words = text.rstrip(".").split(" but ")[-1].split()
    adjective, negated = words[-1], words[-2] == "not"
    if adjective not in POSITIVE + NEGATIVE:
        raise ValueError(f"not a sentiment example: {text!r}")
    return int(adjective in POSITIVE) ^ int(negated)


def sentiment_splits(n_train: int = 4000, n_val: int = 500, n_test: int = 1000, seed: int = 0) -> dict:
    """{"train", "val", "test"} -> (texts: list of str, labels: (N,) int64), seeded by `seed`.

    Distinct sentences are drawn until there are n_train + n_val + n_test of them (longer than
    MAX_CHARS are dropped), then shuffled and cut in three, so no sentence is in two splits.
    """
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"sentiment_splits: {name} must be a positive integer; got {n!r}")
    rng = np.random.default_rng(seed)
    total = n_train + n_val + n_test
    seen: dict = {}                                 # text -> label, in order of first draw
    for _ in range(50 * total):
        text, label = example(rng)
        if len(text) <= MAX_CHARS:
            seen.setdefault(text, label)
            if len(seen) == total:
                break
    else:
        raise ValueError(f"sentiment_splits: could not draw {total} distinct sentences")
    items = list(seen.items())
    order = rng.permutation(total)
    cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: ([items[i][0] for i in idx.tolist()], np.array([items[i][1] for i in idx.tolist()],
                                                                  dtype=np.int64))
            for name, idx in cuts.items()}


# ----------------------------------------------------------------------------- reference baselines

def words(text: str) -> list:
    """The words of an example, case-folded, without the final "."."""
    return text.lower().replace(".", "").split()


def bag_of_words(texts) -> list:
    """Per text, the features of a bag-of-words model: its words (order discarded)."""
    return [words(t) for t in texts]


def final_bigram(texts) -> list:
    """Per text, one order-aware feature: its last two words, e.g. "not happy"."""
    return [[" ".join(words(t)[-2:])] for t in texts]


def counts(features: list, vocabulary: list) -> np.ndarray:
    """(N, V) counts of each vocabulary entry in each text's feature list; others are ignored."""
    index = {f: i for i, f in enumerate(vocabulary)}
    X = np.zeros((len(features), len(vocabulary)))
    for n, feats in enumerate(features):
        for f in feats:
            if f in index:
                X[n, index[f]] += 1
    return X


def logistic_regression(X, y, X_test, lr: float = 0.5, steps: int = 500, l2: float = 1e-3) -> np.ndarray:
    """Predicted labels for X_test from a binary logistic regression fitted to (X, y) by full-batch
    gradient descent on the mean log loss + l2/2 |w|^2; features standardised on X."""
    mu, sd = X.mean(0), X.std(0) + 1e-8
    Z, Z_test = (X - mu) / sd, (X_test - mu) / sd
    w, b = np.zeros(Z.shape[1]), 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(Z @ w + b)))                  # (N,) P(label 1)
        w -= lr * (Z.T @ (p - y) / len(y) + l2 * w)
        b -= lr * float((p - y).mean())
    return (Z_test @ w + b > 0).astype(np.int64)


def baseline_accuracy(splits: dict, featurize=bag_of_words, split: str = "test") -> float:
    """Accuracy on `split` of a logistic regression on featurize(texts) counts fitted on "train"
    (vocabulary = the training features): bag_of_words (~0.5 here) or final_bigram (1.0)."""
    train_feats = featurize(splits["train"][0])
    vocabulary = sorted({f for feats in train_feats for f in feats})
    texts, labels = splits[split]
    pred = logistic_regression(counts(train_feats, vocabulary), splits["train"][1],
                               counts(featurize(texts), vocabulary))
    return float((pred == labels).mean())
