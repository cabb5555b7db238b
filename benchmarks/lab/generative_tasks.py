"""Sequence tasks for the generative suite: one input format, conflicting outputs.

Every task reads a lowercase English word and writes a string; a task-name prefix selects the
transformation, so two tasks given the same word disagree on the answer. An example is::

    {"prompt": "reverse:planet=", "completion": "tenalp"}

The model sees ``<bos> prompt completion <eos>`` and is scored on ``completion <eos>``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from benchmarks.lab import sources
from benchmarks.lab.sources import WORD_RE

VOWELS = set("aeiou")


def _shift(word: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)


def _dedupe(word: str) -> str:
    return "".join(dict.fromkeys(word))


TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda w: w,
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "shift": _shift,  # Caesar +1: abc -> bcd
    "dedupe": _dedupe,  # drop repeated letters, keep first occurrences: letter -> letr
    "upper": str.upper,
    "devowel": lambda w: "".join(c for c in w if c not in VOWELS),
    "length": lambda w: str(len(w)),  # counting, written in digits
}
DESCRIPTIONS = {
    "copy": "repeat the word",
    "reverse": "the word backwards",
    "sort": "the word's letters in alphabetical order",
    "shift": "every letter moved one place on in the alphabet (z -> a)",
    "dedupe": "the word without repeated letters (first occurrences kept)",
    "upper": "the word in capitals",
    "devowel": "the word without its vowels",
    "length": "the number of letters, in digits",
}


def prompt(task: str, word: str) -> str:
    return f"{task}:{word}="


def example(task: str, word: str) -> dict[str, str]:
    return {"prompt": prompt(task, word), "completion": TASKS[task](word)}


def word_pool(n: int = 40_000, min_len: int = 3, max_len: int = 8) -> list[str]:
    """Frequent lowercase English words with a vowel and a consonant, sorted."""
    words = {
        w
        for w in sources.top_words("en", n)
        if WORD_RE.match(w) and min_len <= len(w) <= max_len and set(w) & VOWELS and set(w) - VOWELS
    }
    return sorted(words)


def split_words(words: list[str], sizes: dict[str, int], rng: random.Random) -> dict[str, list[str]]:
    """Disjoint word sets for each split (shared by every task, so no eval word is ever trained on)."""
    shuffled = list(words)
    rng.shuffle(shuffled)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = shuffled[start : start + size]
        start += size
    if start > len(shuffled):
        raise ValueError(f"word pool has {len(shuffled)} words, the splits want {start}")
    return out


def pretraining_corpus(words: list[str], rng: random.Random) -> list[str]:
    """Generic English text for pretraining the base, no task prompt ever in it: TextBlob's WordNet
    glosses in sentence case, and lines of 12 frequent words, each line lower case, Title Case or
    UPPER CASE (1/2, 1/4, 1/4), so the base has seen every letter in both cases."""
    lines = [g[0].upper() + g[1:] for g in sources.textblob_glosses()]
    for i in range(0, len(words), 12):
        chunk, style = words[i : i + 12], rng.random()
        case = str.upper if style < 0.25 else str.title if style < 0.5 else str.lower
        lines.append(" ".join(case(w) for w in chunk))
    return lines
