"""Readers for the real, human-labelled data that ships inside PyPI packages (no network).

Every reader returns plain Python data sorted in a fixed order, so what the lab derives from it
depends only on the package version and the lab's seed, never on set or dict iteration order.

- VADER (``vaderSentiment``): ``vader_lexicon.txt``, ~7.5k tokens each rated for valence by 10
  human raters on [-4, 4] (mean, standard deviation, the 10 raw ratings).
- TextBlob (``textblob``): ``en/en-sentiment.xml``, ~2.9k word senses (mostly adjectives) with
  polarity [-1, 1], subjectivity [0, 1] and the WordNet gloss of the sense; ``en/en-lexicon.txt``,
  Brill's POS lexicon (word → most frequent Penn Treebank tag, ~94k entries). Both ship in the
  wheel; TextBlob's NLTK-based tagger and ``python -m textblob.download_corpora`` are not needed.
- wordfreq (``wordfreq``): frequency-ranked word lists for many languages and Zipf frequencies.
- ``sklearn.datasets`` bundles no text data set (20 Newsgroups, RCV1 … download at first use),
  so scikit-learn is not a source.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


def package_dir(name: str) -> Path:
    """The installed directory of package ``name``, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package {name!r} is not installed; install the lab's extra: pip install -e '.[lab]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------ VADER
@dataclass(frozen=True)
class VaderEntry:
    token: str
    mean: float  # mean valence over raters, [-4, 4]
    std: float  # standard deviation of the raters
    ratings: tuple[int, ...]  # the raw human ratings


@lru_cache(maxsize=1)
def vader_lexicon() -> tuple[VaderEntry, ...]:
    path = package_dir("vaderSentiment") / "vader_lexicon.txt"
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 4:
            continue
        token, mean, std, ratings = parts
        entries.append(VaderEntry(token, float(mean), float(std), tuple(ast.literal_eval(ratings))))
    return tuple(sorted(entries, key=lambda e: e.token))


# ------------------------------------------------------------------ TextBlob
@dataclass(frozen=True)
class SentimentSense:
    word: str
    pos: str
    gloss: str  # WordNet gloss of the sense
    polarity: float  # [-1, 1]
    subjectivity: float  # [0, 1]


@lru_cache(maxsize=1)
def textblob_sentiment() -> tuple[SentimentSense, ...]:
    path = package_dir("textblob") / "en" / "en-sentiment.xml"
    senses = []
    for node in ET.parse(path).getroot().iter("word"):
        a = node.attrib
        senses.append(
            SentimentSense(
                word=a.get("form", "").strip(),
                pos=a.get("pos", ""),
                gloss=a.get("sense", "").strip(),
                polarity=float(a.get("polarity", 0)),
                subjectivity=float(a.get("subjectivity", 0)),
            )
        )
    return tuple(sorted(senses, key=lambda s: (s.word, s.gloss, s.polarity, s.subjectivity)))


@lru_cache(maxsize=1)
def brill_lexicon() -> tuple[tuple[str, str], ...]:
    """``(word, Penn Treebank tag)`` pairs of Brill's lexicon (one tag per word)."""
    path = package_dir("textblob") / "en" / "en-lexicon.txt"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(";;;"):
            continue
        parts = line.split()
        if len(parts) == 2:
            pairs.append((parts[0], parts[1]))
    return tuple(sorted(pairs))


def textblob_glosses() -> list[str]:
    """Distinct WordNet glosses of the sentiment lexicon: short natural English sentences."""
    return sorted({s.gloss for s in textblob_sentiment() if s.gloss})


# ------------------------------------------------------------------ wordfreq
def top_words(lang: str, n: int, wordlist: str = "best") -> list[str]:
    import wordfreq

    return list(wordfreq.top_n_list(lang, n, wordlist=wordlist))


def zipf_frequencies(lang: str = "en", wordlist: str = "large") -> dict[str, float]:
    """Word -> Zipf frequency (log10 of occurrences per billion words), rounded like wordfreq."""
    import math

    import wordfreq

    freqs = wordfreq.get_frequency_dict(lang, wordlist=wordlist)
    return {w: round(math.log10(f * 1e9), 2) for w, f in freqs.items() if f > 0}


WORD_RE = re.compile(r"^[a-z]+$")
