"""Text classification tasks built from real human-labelled lexicons shipped in PyPI packages.

Each task maps an input text (a word, a WordNet gloss, or a short phrase composed from lexicon
words with a fixed seed) to an integer label. Several tasks share their inputs or their labels and
disagree (the same VADER words are labelled by valence sign, intensity and rater agreement, and
their signs flipped by "not" or chosen by "but"; the same glosses by polarity and subjectivity),
so fusing their adapters involves real conflicts.

A task's *pool* is every usable ``(text, label)`` pair, texts unique; :func:`split_examples`
draws class-balanced, disjoint train / support / eval splits from it with a seeded RNG.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.lab import sources
from benchmarks.lab.sources import WORD_RE

Pool = list[tuple[str, int]]


@dataclass(frozen=True)
class EncoderTask:
    """A classification task: ``labels[i]`` names class ``i``; ``pool()`` yields its examples."""

    name: str
    labels: tuple[str, ...]
    source: str  # package and file the labels come from
    description: str
    pool: Callable[[], Pool]

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _tertiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 3], ordered[2 * len(ordered) // 3]


def _vader_words() -> list[sources.VaderEntry]:
    return [e for e in sources.vader_lexicon() if WORD_RE.match(e.token) and e.mean != 0]


def vader_sign() -> Pool:
    return [(e.token, int(e.mean > 0)) for e in _vader_words()]


def vader_intensity() -> Pool:
    words = _vader_words()
    low, high = _tertiles([abs(e.mean) for e in words])
    return [(e.token, 0 if abs(e.mean) < low else 1 if abs(e.mean) < high else 2) for e in words]


def vader_agreement() -> Pool:
    words = _vader_words()
    median = statistics.median(e.std for e in words)
    return [(e.token, int(e.std > median)) for e in words if e.std != median]


def word_subjectivity() -> Pool:
    by_word: dict[str, list[float]] = defaultdict(list)
    for s in sources.textblob_sentiment():
        if WORD_RE.match(s.word):
            by_word[s.word].append(s.subjectivity)
    pool = []
    for word in sorted(by_word):
        value = statistics.mean(by_word[word])
        if value < 0.35 or value > 0.65:  # the ambiguous middle is left out
            pool.append((word, int(value > 0.65)))
    return pool


def _by_gloss(attr: str) -> dict[str, float]:
    values: dict[str, list[float]] = defaultdict(list)
    for s in sources.textblob_sentiment():
        if s.gloss:
            values[s.gloss].append(getattr(s, attr))
    return {gloss: statistics.mean(v) for gloss, v in sorted(values.items())}


def gloss_polarity() -> Pool:
    return [(g, 0 if p < -0.1 else 2 if p > 0.1 else 1) for g, p in _by_gloss("polarity").items()]


def gloss_subjectivity() -> Pool:
    return [(g, int(s >= 0.6)) for g, s in _by_gloss("subjectivity").items() if s < 0.4 or s >= 0.6]


_POS_CLASSES = {
    "NN": 0,
    "NNS": 0,
    "VB": 1,
    "VBD": 1,
    "VBG": 1,
    "VBN": 1,
    "VBP": 1,
    "VBZ": 1,
    "JJ": 2,
    "JJR": 2,
    "JJS": 2,
    "RB": 3,
    "RBR": 3,
    "RBS": 3,
}


def word_pos() -> Pool:
    return [
        (w, _POS_CLASSES[t])
        for w, t in sources.brill_lexicon()
        if t in _POS_CLASSES and WORD_RE.match(w) and len(w) >= 3
    ]


_VERB_FORMS = {"VB": 0, "VBD": 1, "VBG": 2, "VBN": 3, "VBZ": 4}


def word_verb_form() -> Pool:
    return [
        (w, _VERB_FORMS[t])
        for w, t in sources.brill_lexicon()
        if t in _VERB_FORMS and WORD_RE.match(w) and len(w) >= 3
    ]


LANGUAGES = ("en", "de", "fr", "es", "it", "nl")


def word_language(per_language: int = 20_000, exclusion: int = 50_000) -> Pool:
    """Frequent words of each language that are absent from every other language's long list."""
    lists = {lang: sources.top_words(lang, exclusion) for lang in LANGUAGES}
    seen: dict[str, int] = defaultdict(int)
    for words in lists.values():
        for w in set(words):
            seen[w] += 1
    pool = []
    for label, lang in enumerate(LANGUAGES):
        for w in lists[lang][:per_language]:
            if seen[w] == 1 and len(w) >= 4 and w.isalpha():
                pool.append((w, label))
    return sorted(pool)


def word_frequency(n: int = 120_000) -> Pool:
    """English words by Zipf frequency band: rare (< 2.5), medium ([2.5, 3.5)), common (>= 3.5)."""
    zipf = sources.zipf_frequencies("en", "large")
    pool = []
    for w in sources.top_words("en", n, wordlist="large"):
        if WORD_RE.match(w) and len(w) >= 3 and w in zipf:
            z = zipf[w]
            pool.append((w, 0 if z < 2.5 else 1 if z < 3.5 else 2))
    return sorted(pool)


# Phrases composed from the lexicons: the answer depends on word order, negation or a comparison,
# which a linear head on the frozen pooled sentence embedding reads poorly and a LoRA can learn.
_COMPOSED_SEED = 0  # the pairs are part of the task's definition, not of a lab build


def vader_negation() -> Pool:
    """Each VADER word as "it was {w}" (its sign) and "it was not {w}" (the opposite sign)."""
    pool = []
    for e in _vader_words():
        positive = int(e.mean > 0)
        pool.append((f"it was {e.token}", positive))
        pool.append((f"it was not {e.token}", 1 - positive))
    return pool


def vader_contrast(pairs: int = 12_000) -> Pool:
    """ "{a} but {b}" for VADER words of opposite signs -> the sign of ``b`` (what follows "but")."""
    words = _vader_words()
    positive = [e.token for e in words if e.mean > 0]
    negative = [e.token for e in words if e.mean < 0]
    rng = random.Random(_COMPOSED_SEED)
    pool = []
    for i in range(pairs):
        first, second = (positive, negative) if i % 2 else (negative, positive)
        pool.append((f"{rng.choice(first)} but {rng.choice(second)}", int(second is positive)))
    return pool


def pair_pos(pairs: int = 12_000) -> Pool:
    """ "{a} {b}" for two words of Brill's lexicon -> the coarse class of ``a`` (as ``word-pos``)."""
    words = sorted(word_pos())
    rng = random.Random(_COMPOSED_SEED)
    pool = []
    for _ in range(pairs):
        (first, label), (second, _) = rng.choice(words), rng.choice(words)
        pool.append((f"{first} {second}", label))
    return pool


def frequency_comparison(pairs: int = 12_000, n: int = 60_000) -> Pool:
    """ "{a} or {b}" for two English words at least 1 Zipf unit apart -> whether ``b`` is the commoner."""
    zipf = sources.zipf_frequencies("en", "large")
    words = [w for w in sources.top_words("en", n) if WORD_RE.match(w) and len(w) >= 3 and w in zipf]
    rng = random.Random(_COMPOSED_SEED)
    pool = []
    while len(pool) < pairs:
        a, b = rng.choice(words), rng.choice(words)
        if abs(zipf[a] - zipf[b]) >= 1.0:
            pool.append((f"{a} or {b}", int(zipf[b] > zipf[a])))
    return pool


def word_length(n: int = 60_000) -> Pool:
    """Frequent English words -> letter count band: <= 4, 5-6, 7-8, >= 9."""
    pool = []
    for w in sources.top_words("en", n):
        if WORD_RE.match(w) and len(w) >= 2:
            pool.append((w, 0 if len(w) <= 4 else 1 if len(w) <= 6 else 2 if len(w) <= 8 else 3))
    return sorted(pool)


def noun_number() -> Pool:
    """Nouns of Brill's lexicon -> singular (NN) or plural (NNS), by their most frequent tag."""
    number = {"NN": 0, "NNS": 1}
    return [
        (w, number[t]) for w, t in sources.brill_lexicon() if t in number and WORD_RE.match(w) and len(w) >= 3
    ]


TASKS: dict[str, EncoderTask] = {
    t.name: t
    for t in (
        EncoderTask(
            "vader-sign",
            ("negative", "positive"),
            "vaderSentiment/vader_lexicon.txt",
            "word -> sign of its mean human valence rating",
            vader_sign,
        ),
        EncoderTask(
            "vader-intensity",
            ("mild", "moderate", "strong"),
            "vaderSentiment/vader_lexicon.txt",
            "word -> tertile of |mean valence| (sign ignored)",
            vader_intensity,
        ),
        EncoderTask(
            "vader-agreement",
            ("raters-agree", "raters-disagree"),
            "vaderSentiment/vader_lexicon.txt",
            "word -> whether the 10 raters' standard deviation is above the median",
            vader_agreement,
        ),
        EncoderTask(
            "word-subjectivity",
            ("objective", "subjective"),
            "textblob/en/en-sentiment.xml",
            "word -> mean subjectivity of its senses < 0.35 or > 0.65",
            word_subjectivity,
        ),
        EncoderTask(
            "gloss-polarity",
            ("negative", "neutral", "positive"),
            "textblob/en/en-sentiment.xml",
            "WordNet gloss -> polarity < -0.1, in [-0.1, 0.1], > 0.1",
            gloss_polarity,
        ),
        EncoderTask(
            "gloss-subjectivity",
            ("objective", "subjective"),
            "textblob/en/en-sentiment.xml",
            "WordNet gloss -> subjectivity < 0.4 or >= 0.6",
            gloss_subjectivity,
        ),
        EncoderTask(
            "word-pos",
            ("noun", "verb", "adjective", "adverb"),
            "textblob/en/en-lexicon.txt (Brill)",
            "word -> coarse class of its Brill lexicon Penn Treebank tag",
            word_pos,
        ),
        EncoderTask(
            "word-verb-form",
            ("base", "past", "gerund", "past-participle", "3rd-singular"),
            "textblob/en/en-lexicon.txt (Brill)",
            "verb -> its Brill lexicon tag VB / VBD / VBG / VBN / VBZ (the most frequent use)",
            word_verb_form,
        ),
        EncoderTask(
            "word-language",
            LANGUAGES,
            "wordfreq word lists",
            "frequent word -> language, words shared with another language's top 50k removed",
            word_language,
        ),
        EncoderTask(
            "word-frequency",
            ("rare", "medium", "common"),
            "wordfreq (en, large list)",
            "English word -> Zipf frequency band (< 2.5, [2.5, 3.5), >= 3.5)",
            word_frequency,
        ),
        EncoderTask(
            "vader-negation",
            ("negative", "positive"),
            "vaderSentiment/vader_lexicon.txt",
            '"it was [not] {word}" -> the valence sign of the word, flipped by "not"',
            vader_negation,
        ),
        EncoderTask(
            "vader-contrast",
            ("negative", "positive"),
            "vaderSentiment/vader_lexicon.txt",
            '"{a} but {b}" (a, b of opposite valence) -> the valence sign of b',
            vader_contrast,
        ),
        EncoderTask(
            "pair-pos",
            ("noun", "verb", "adjective", "adverb"),
            "textblob/en/en-lexicon.txt (Brill)",
            '"{a} {b}" (two lexicon words) -> the coarse class of a',
            pair_pos,
        ),
        EncoderTask(
            "frequency-comparison",
            ("first-commoner", "second-commoner"),
            "wordfreq (en, large list)",
            '"{a} or {b}" (Zipf frequencies >= 1 apart) -> which of the two words is the commoner',
            frequency_comparison,
        ),
        EncoderTask(
            "word-length",
            ("short", "medium", "long", "very-long"),
            "wordfreq (en, best list)",
            "frequent English word -> letter count <= 4, 5-6, 7-8, >= 9",
            word_length,
        ),
        EncoderTask(
            "noun-number",
            ("singular", "plural"),
            "textblob/en/en-lexicon.txt (Brill)",
            "noun -> its Brill lexicon tag NN or NNS (the most frequent use)",
            noun_number,
        ),
    )
}


def split_examples(
    pool: Pool, num_classes: int, sizes: dict[str, int], rng: random.Random
) -> dict[str, list[tuple[str, int]]]:
    """Class-balanced, disjoint splits drawn from ``pool``.

    Args:
        pool: ``(text, label)`` pairs; a text appearing twice is kept once (its first label).
        num_classes: labels are ``0 .. num_classes - 1``.
        sizes: wanted split sizes, e.g. ``{"train": 1024, "support": 64, "eval": 384}``; when the
            pool is too small, ``train`` (last to be filled) absorbs the shortfall.
        rng: the only source of randomness.

    Returns:
        split name -> shuffled ``(text, label)`` list; no text is in two splits.
    """
    unique: dict[str, int] = {}
    for text, label in pool:
        unique.setdefault(text, label)
    by_class: dict[int, list[str]] = {c: [] for c in range(num_classes)}
    for text in sorted(unique):
        by_class[unique[text]].append(text)
    for texts in by_class.values():
        rng.shuffle(texts)
    wanted = sum(sizes.values())
    # Water-fill a balanced quota: small classes give all they have, large ones share the rest.
    quota = dict.fromkeys(by_class, 0)
    remaining, open_classes = wanted, sorted(by_class, key=lambda c: len(by_class[c]))
    while open_classes and remaining > 0:
        share = remaining // len(open_classes) or 1
        c = open_classes.pop(0)
        take = min(share, len(by_class[c]))
        quota[c], remaining = take, remaining - take
    names = list(sizes)
    taken = max(sum(quota.values()), 1)
    # Support and eval keep their sizes (split across classes like the quota); train takes the
    # rest, so a small pool shortens only the training split.
    order = [n for n in names if n != "train"] + [n for n in names if n == "train"]
    out: dict[str, list[tuple[str, int]]] = {n: [] for n in names}
    for c, texts in by_class.items():
        chosen = texts[: quota[c]]
        start = 0
        for n in order:
            last = n == order[-1]
            count = len(chosen) - start if last else round(sizes[n] * quota[c] / taken)
            out[n].extend((t, c) for t in chosen[start : start + count])
            start += count
    for n in names:
        rng.shuffle(out[n])
    return out
