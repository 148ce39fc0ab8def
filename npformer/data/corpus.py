"""The built-in toy language: English-like sentences with an exactly known entropy rate.

Construction
------------
A small probabilistic grammar written as a *unifilar* Markov source over word tokens. The source
has a finite set of states s (a grammar position such as "subject, after one adjective, singular");
in state s it emits a token w with probability P(w | s) and moves to the state next(s, w), a
deterministic function of s and w. Sentences look like

    The sad king likes our cat with my river. A man helps these houses behind many dark hills.
    My foxes follow this boat.

- vocabulary: 9 determiners, 10 adjectives, 12 nouns and 10 verbs (each in a singular and a plural
  form), 6 adverbs, 6 prepositions: 75 words; 36 states. Determiners agree in number with their
  noun and verbs with their subject, the number being carried in the state;
- sentence = subject NP, verb (transitive: + object NP), optional adverb / prepositional phrase;
  NP = determiner, up to two adjectives, noun;
- within a word class the words have Zipf weights 1 / rank**zipf_a, the ranks shuffled by `seed`.

The emitted strings are "The" (capitalised determiner, first word of a sentence), " word" (any
other word) and the sentence ends ". " and ".\\n". Words are runs of letters, so the character
string splits back into its tokens uniquely (``parse``), and since the source is unifilar the state
sequence is a function of the text too.

Entropy rate
------------
Let P[s, s'] = sum over w with next(s, w) = s' of P(w | s) be the state chain (checked irreducible
and aperiodic) and pi its stationary distribution (pi P = pi, sum pi = 1, solved exactly with a
linear system). Per state, H(s) = -sum_w P(w|s) log P(w|s) nats and L(s) = sum_w P(w|s) len(w)
characters. Because the text determines the tokens and the tokens determine the states, the
entropy of the text is the entropy of the token sequence, and by the ergodic theorem

    entropy rate (nats / character) = (sum_s pi_s H(s)) / (sum_s pi_s L(s)).

``log_loss(text)`` gives the true model's empirical loss, -sum log P(w | s) / len(text), which
tends to the entropy rate on long samples. With the defaults the rate is about 0.507 nats/char
(2.16 nats per token, 4.26 characters per token).

A model that sees only the last T characters cannot reach the rate at the start of its window:
``windowed_loss(T)`` gives the best achievable loss at each window position, and its mean (about
0.543 nats/char for T = 64, 1.07 x the rate) is the floor for a loss averaged over all positions
of random windows; from position ~16 on the floor is the rate itself.
"""

from __future__ import annotations

import bisect
import math
import re

import numpy as np

DETERMINERS = {"sg": ("a", "this", "one"), "pl": ("these", "some", "many"),
               "any": ("the", "my", "our")}
ADJECTIVES = ("big", "small", "red", "tall", "sad", "quiet", "happy", "green", "dark", "soft")
ANIMATE = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("man", "men"),
           ("king", "kings"))
THINGS = (("tree", "trees"), ("house", "houses"), ("river", "rivers"), ("hill", "hills"),
          ("book", "books"), ("boat", "boats"))
TRANSITIVE = (("sees", "see"), ("likes", "like"), ("finds", "find"), ("follows", "follow"),
              ("hears", "hear"), ("helps", "help"))
INTRANSITIVE = (("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("waits", "wait"))
ADVERBS = ("now", "again", "often", "today", "slowly", "quickly")
PREPOSITIONS = ("near", "by", "under", "with", "behind", "over")

P_DET = {"sg": 0.3, "pl": 0.2, "any": 0.5}   # P(determiner group)
P_ADJ = (0.3, 0.15, 0.0)       # P(another adjective | adjectives so far = 0, 1, 2)
P_PLURAL = 0.4                  # P(plural noun) after "the", "my", "our"
P_TRANSITIVE = 0.55
# after the verb / object / adverb: P(adverb), P(prepositional phrase), the rest ends the sentence
P_AFTER = {"verb": (0.3, 0.4), "object": (0.2, 0.3), "adverb": (0.0, 0.3), "pp": (0.0, 0.0)}

_TOKEN_RE = re.compile(r"[A-Za-z]+| [a-z]+|\. |\.\n|.", re.DOTALL)


def check_ergodic(P: np.ndarray) -> None:
    """Raise ValueError unless the stochastic matrix P (S, S) is irreducible and aperiodic."""
    S = P.shape[0]
    edges = P > 0
    # irreducible: every state reaches every state (boolean transitive closure by squaring)
    reach = edges | np.eye(S, dtype=bool)
    for _ in range(max(1, math.ceil(math.log2(S))) + 1):
        reach = reach | ((reach.astype(np.int64) @ reach.astype(np.int64)) > 0)
    if not reach.all():
        i, j = np.argwhere(~reach)[0]
        raise ValueError(f"state chain is not irreducible: state {j} is unreachable from state {i}")
    # aperiodic: the gcd over edges u -> v of level(u) + 1 - level(v), levels by BFS from state 0
    level = np.full(S, -1)
    level[0], frontier = 0, [0]
    while frontier:
        nxt = []
        for u in frontier:
            for v in np.flatnonzero(edges[u]):
                if level[v] < 0:
                    level[v] = level[u] + 1
                    nxt.append(v)
        frontier = nxt
    period = 0
    for u, v in np.argwhere(edges):
        period = math.gcd(period, int(level[u] + 1 - level[v]))
    if period != 1:
        raise ValueError(f"state chain is periodic with period {period}")


def stationary_distribution(P: np.ndarray) -> np.ndarray:
    """pi (S,) with pi P = pi and sum(pi) = 1, from one linear solve."""
    S = P.shape[0]
    A = P.T - np.eye(S)
    A[-1, :] = 1.0                      # replace one (redundant) balance equation by sum(pi) = 1
    b = np.zeros(S)
    b[-1] = 1.0
    pi = np.linalg.solve(A, b)
    if not (np.all(pi > 0) and np.allclose(pi @ P, pi, atol=1e-12)):
        raise ValueError("state chain has no strictly positive stationary distribution")
    return pi


class ToyLanguage:
    """A seeded unifilar Markov source of English-like sentences (see the module docstring).

    Attributes: states (names), start (index of the sentence-start state), and per state s
    tokens[s] (emitted strings), probs[s] (P(token | s)), next_state[s] (next(s, token)).
    """

    def __init__(self, seed: int = 0, zipf_a: float = 1.0, newline_prob: float = 0.15):
        if not 0.0 < newline_prob < 1.0:
            raise ValueError(f"newline_prob must be in (0, 1), got {newline_prob}")
        self.seed, self.zipf_a, self.newline_prob = seed, zipf_a, newline_prob
        rng = np.random.default_rng(seed)

        def zipf(words):    # Zipf weights 1/rank**a with the ranks shuffled by the language seed
            ranks = rng.permutation(len(words)) + 1
            w = 1.0 / ranks ** zipf_a
            return dict(zip(words, (w / w.sum()).tolist()))

        det_w = {n: zipf(d) for n, d in DETERMINERS.items()}
        adj_w = zipf(ADJECTIVES)
        animate_w, things_w = zipf(ANIMATE), zipf(THINGS)
        trans_w, intrans_w = zipf(TRANSITIVE), zipf(INTRANSITIVE)
        adv_w, prep_w = zipf(ADVERBS), zipf(PREPOSITIONS)

        self.states: list = []
        self._index: dict = {}
        rules: dict = {}                 # state name -> list of (word, prob, next state name)

        def state(name):
            if name not in self._index:
                self._index[name] = len(self.states)
                self.states.append(name)
            return name

        def noun_phrase(ctx, nouns_w, after_noun, start, capital):
            # start state emits the determiner; (ctx, number, k) = after det and k adjectives
            rules[state(start)] = []
            for n, dets in det_w.items():
                for d, p in dets.items():
                    word = d.capitalize() if capital else d
                    rules[start].append((word, P_DET[n] * p, state(f"{ctx}/{n}/0")))
                p_pl = {"sg": 0.0, "pl": 1.0, "any": P_PLURAL}[n]     # P(plural noun)
                for k, p_adj in enumerate(P_ADJ):
                    here = state(f"{ctx}/{n}/{k}")
                    out = [(a, p_adj * p, state(f"{ctx}/{n}/{k + 1}")) for a, p in adj_w.items()] \
                        if p_adj > 0 else []
                    for (sg, pl), p in nouns_w.items():
                        if p_pl < 1:
                            out.append((sg, (1 - p_adj) * (1 - p_pl) * p, state(after_noun("sg"))))
                        if p_pl > 0:
                            out.append((pl, (1 - p_adj) * p_pl * p, state(after_noun("pl"))))
                    rules[here] = out

        def tail(name, kind):            # optional adverb / prepositional phrase, then the end
            p_adv, p_pp = P_AFTER[kind]
            out = [(a, p_adv * p, state("after/adverb")) for a, p in adv_w.items()] if p_adv else []
            out += [(w, p_pp * p, state("pp")) for w, p in prep_w.items()] if p_pp else []
            end = 1 - p_adv - p_pp
            out += [(".", end * (1 - newline_prob), state("S")),
                    (".\n", end * newline_prob, state("S"))]
            rules[state(name)] = out

        noun_phrase("subj", animate_w, lambda n: f"verb/{n}", start="S", capital=True)
        for n, i in (("sg", 0), ("pl", 1)):
            rules[state(f"verb/{n}")] = (
                [(v[i], P_TRANSITIVE * p, state("obj")) for v, p in trans_w.items()]
                + [(v[i], (1 - P_TRANSITIVE) * p, state("after/verb")) for v, p in intrans_w.items()])
        objects_w = {k: v / 2 for k, v in [*animate_w.items(), *things_w.items()]}   # half animate
        noun_phrase("obj/np", objects_w, lambda n: "after/object", start="obj", capital=False)
        noun_phrase("pp/np", things_w, lambda n: "after/pp", start="pp", capital=False)
        for kind in ("verb", "object", "adverb", "pp"):
            tail(f"after/{kind}", kind)

        # emitted strings: capitalised words as they are, others with a leading space, ". " ends
        self.start = self._index["S"]
        self.tokens, self.probs, self.next_state, self._lookup = [], [], [], []
        for name in self.states:
            toks = [w + " " if w == "." else (w if w[0].isupper() or w == ".\n" else " " + w)
                    for w, _, _ in rules[name]]
            if len(set(toks)) != len(toks):
                raise ValueError(f"state {name!r} emits a token twice: not unifilar")
            probs = np.array([p for _, p, _ in rules[name]])
            if abs(probs.sum() - 1) > 1e-12 or (probs <= 0).any():
                raise ValueError(f"state {name!r}: token probabilities {probs} do not sum to 1")
            self.tokens.append(toks)
            self.probs.append(probs)
            self.next_state.append([self._index[nxt] for _, _, nxt in rules[name]])
            self._lookup.append({t: j for j, t in enumerate(toks)})
        S = len(self.states)
        self.P = np.zeros((S, S))                            # state chain: P[s, next(s, w)] += P(w|s)
        for s in range(S):
            np.add.at(self.P[s], self.next_state[s], self.probs[s])
        check_ergodic(self.P)

    @property
    def vocabulary(self) -> list:
        """The distinct words (lower case, without punctuation), sorted."""
        return sorted({t.strip().lower() for toks in self.tokens for t in toks} - {"."})

    def stationary(self) -> np.ndarray:
        """pi (S,): the stationary distribution of the state chain."""
        return stationary_distribution(self.P)

    def state_entropies(self):
        """(H, L): per-state token entropy H(s) in nats and expected emitted length L(s) in chars."""
        H = np.array([-(p * np.log(p)).sum() for p in self.probs])
        L = np.array([(p * np.array([len(t) for t in toks])).sum()
                      for p, toks in zip(self.probs, self.tokens)])
        return H, L

    def entropy_rate(self) -> float:
        """Exact entropy rate in nats per character: sum(pi H) / sum(pi L)."""
        pi = self.stationary()
        H, L = self.state_entropies()
        return float(pi @ H / (pi @ L))

    def generate(self, n_chars: int, seed: int = 0) -> str:
        """n_chars characters of text from the sentence-start state, drawn with default_rng(seed)."""
        if n_chars < 0:
            raise ValueError(f"n_chars must be >= 0, got {n_chars}")
        rng = np.random.default_rng(seed)
        cum = [np.cumsum(p).tolist() for p in self.probs]
        out, length, s = [], 0, self.start
        while length < n_chars:
            for u in rng.random(4096).tolist():
                j = min(bisect.bisect_right(cum[s], u), len(cum[s]) - 1)
                tok = self.tokens[s][j]
                out.append(tok)
                length += len(tok)
                s = self.next_state[s][j]
                if length >= n_chars:
                    break
        return "".join(out)[:n_chars]

    def parse(self, text: str):
        """Split text (starting at a sentence start) into tokens; returns (states, token indices).

        A trailing incomplete token is dropped; anything the grammar cannot emit raises ValueError.
        """
        states, picks, s, pos = [], [], self.start, 0
        pieces = _TOKEN_RE.findall(text)
        for i, piece in enumerate(pieces):
            j = self._lookup[s].get(piece)
            if j is None:
                if i == len(pieces) - 1 and any(t.startswith(piece) for t in self.tokens[s]):
                    break                                     # cut off mid-token at the end
                raise ValueError(f"at character {pos}: {piece!r} cannot follow state {self.states[s]!r}")
            states.append(s)
            picks.append(j)
            pos += len(piece)
            s = self.next_state[s][j]
        return np.array(states, dtype=np.int64), np.array(picks, dtype=np.int64)

    def log_loss(self, text: str) -> float:
        """The true model's loss on text: -sum log P(token | state) / characters, in nats/char."""
        states, picks = self.parse(text)
        nats = -sum(math.log(self.probs[s][j]) for s, j in zip(states.tolist(), picks.tolist()))
        n_chars = sum(len(self.tokens[s][j]) for s, j in zip(states.tolist(), picks.tolist()))
        return nats / n_chars

    def windowed_loss(self, block_size: int, n_windows: int = 256, seed: int = 0) -> np.ndarray:
        """(block_size,): the best achievable mean loss at each position t of a random window of
        block_size + 1 characters, predicting character t + 1 from characters 0..t only (nats/char).

        This is the loss floor of a model trained and evaluated nanoGPT-style on random windows
        (x = window[:-1], y = window[1:]): target t has t + 1 characters of context, so the curve
        starts well above entropy_rate() (one character tells little) and falls to it once a few
        words are in view. mean(windowed_loss(T)) is the floor for the loss averaged over all T
        positions. Computed exactly per window by Bayesian filtering of the character-level hidden
        states (s, j, k) = "in state s, emitting token j, at its character k", on n_windows random
        windows of a sample drawn with `seed`.
        """
        hs, hj, hk, char = [], [], [], []
        for s, toks in enumerate(self.tokens):
            for j, t in enumerate(toks):
                for k, c in enumerate(t):
                    hs.append(s), hj.append(j), hk.append(k), char.append(ord(c))
        hs, hj, hk, char = (np.array(a) for a in (hs, hj, hk, char))
        p_tok = np.array([self.probs[s][j] for s, j in zip(hs, hj)])
        is_last = hk == np.array([len(self.tokens[s][j]) for s, j in zip(hs, hj)]) - 1
        inner, last, first = np.flatnonzero(~is_last), np.flatnonzero(is_last), np.flatnonzero(hk == 0)
        to_state = np.zeros((len(last), len(self.states)))     # last char of token j in s -> next(s, j)
        to_state[np.arange(len(last)), [self.next_state[s][j] for s, j in zip(hs[last], hj[last])]] = 1
        b = self.stationary()[hs] * p_tok               # stationary law of the hidden states
        b = np.tile(b / b.sum(), (n_windows, 1))        # beliefs (W, n_hidden)

        text = self.generate(block_size * n_windows * 4 + 1000, seed=seed)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        starts = np.random.default_rng(seed).integers(1000, len(text) - block_size - 1, size=n_windows)
        losses = np.zeros(block_size + 1)        # losses[0]: the first character, with no context
        for t in range(block_size + 1):
            match = char[None, :] == codes[starts + t][:, None]     # (W, n_hidden)
            p_char = (b * match).sum(1)                             # P(observed char | window so far)
            losses[t] = -np.log(p_char).mean()
            b = b * match / p_char[:, None]
            nb = np.zeros_like(b)
            nb[:, inner + 1] = b[:, inner]                          # next character of the same token
            nb[:, first] += (b[:, last] @ to_state)[:, hs[first]] * p_tok[first]   # a new token
            b = nb
        return losses[1:]

    def context_floor(self, block_size: int, exact_positions: int = 256) -> float:
        """mean(windowed_loss(block_size)), the loss floor of a model with block_size characters of
        context, computed in time that does not grow with block_size: positions past
        `exact_positions` are taken at entropy_rate(), which the windowed loss has reached there
        (it is within its Monte-Carlo noise of the rate after about a hundred characters)."""
        n = min(block_size, exact_positions)
        head = self.windowed_loss(n)
        return float((head.sum() + (block_size - n) * self.entropy_rate()) / block_size)

    def token_entropy(self, as_wordpiece: bool = False) -> float:
        """The entropy rate in nats per token, sum(pi H); as_wordpiece: of the tokens as WordPiece sees
        them (lower case, ". " and ".\\n" the one token "."), which loses the choice of line break."""
        H = []
        for toks, probs in zip(self.tokens, self.probs):
            merged = {}
            for tok, p in zip(toks, probs.tolist()):
                key = tok.strip().lower() if as_wordpiece else tok
                merged[key] = merged.get(key, 0.0) + p
            q = np.array(list(merged.values()))
            H.append(-(q * np.log(q)).sum())
        return float(self.stationary() @ np.array(H))

    def masked_floor(self, n_chars: int = 50_000, seed: int = 1) -> float:
        """The best achievable loss (nats/token) of predicting one hidden token from all the others,
        over every token of n_chars of text drawn with `seed`: a lower bound of a masked LM's loss.

        Tokens are counted as WordPiece sees them: lower case, ". " and ".\\n" the one token ".". The
        true posterior of the hidden token t, in state s_t, is P(w | s_t) P(tokens after t | next(s_t, w))
        normalised over the candidates w of s_t; the tokens after t are parsed from each candidate's next
        state up to the end of the sentence after t (the start state, where every candidate's path meets
        again, so the rest of the text cancels). The last sentence, with no end after it, is left out.
        A masked LM sees 15% of its context masked or replaced as well, so its floor lies above this.
        """
        table = []                              # per state: {token as WordPiece sees it: (P, next state)}
        for s in range(len(self.states)):
            merged = {}
            for tok, p, nxt in zip(self.tokens[s], self.probs[s].tolist(), self.next_state[s]):
                key = tok.strip().lower()
                merged[key] = (merged.get(key, (0.0, nxt))[0] + p, nxt)
            table.append(merged)
        states, picks = self.parse(self.generate(n_chars, seed))
        words = [self.tokens[s][j].strip().lower() for s, j in zip(states.tolist(), picks.tolist())]
        ends = [i for i, w in enumerate(words) if w == "."]
        nats, count, e = 0.0, 0, 0
        for t, s in enumerate(states.tolist()):
            while e < len(ends) and ends[e] <= t:
                e += 1
            if e == len(ends):
                break
            rest = words[t + 1:ends[e] + 1]     # to the end of the sentence after t
            like = {}
            for w, (p, nxt) in table[s].items():
                for r in rest:
                    hit = table[nxt].get(r)
                    if hit is None:
                        p = 0.0
                        break
                    p, nxt = p * hit[0], hit[1]
                like[w] = p
            nats -= math.log(like[words[t]] / sum(like.values()))
            count += 1
        return nats / count


def default_corpus(n_train: int = 1_000_000, n_val: int = 100_000) -> tuple:
    """(train, val) texts for `npformer pretrain`: ToyLanguage(seed=0) sampled with seeds 1 and 2.

    The loss floor for a model trained on them is ToyLanguage(seed=0).entropy_rate().
    """
    lang = ToyLanguage(seed=0)
    return lang.generate(n_train, seed=1), lang.generate(n_val, seed=2)

