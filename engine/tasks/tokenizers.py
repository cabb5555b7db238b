"""Text -> token ids: built-in character / whitespace tokenizers, the character tokenizer file
(:mod:`engine.tasks.chartok`), and transformers tokenizers.

The built-in tokenizers need no files and no hub, so tests and the tiny lab model run anywhere;
a transformers tokenizer is loaded from a local directory only (``local_files_only=True``).
Task models and the server load tokenizers here, so both turn a text into the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from engine.tasks.chartok import CharTokenizer
from engine.tasks.errors import TaskError
from engine.tasks.spec import DEFAULT_CHAR_SPECIALS, TokenizerSpec

# Default ``char`` vocab: the four specials, printable ASCII, newline and tab.
DEFAULT_CHAR_VOCAB = [*DEFAULT_CHAR_SPECIALS.values(), *(chr(i) for i in range(32, 127)), "\n", "\t"]


class Tokenizer(Protocol):
    """What task models need from a tokenizer."""

    vocab_size: int
    pad_token_id: int
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        ...


class VocabTokenizer:
    """A fixed vocabulary split by characters (``char``) or by whitespace (``whitespace``).

    Args:
        vocab: token strings in id order.
        kind: ``char`` or ``whitespace``.
        pad_token, bos_token, eos_token, unk_token: special tokens (entries of ``vocab``).
    """

    def __init__(
        self,
        vocab: list[str],
        kind: str,
        pad_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
    ):
        self.kind = kind
        self.vocab = list(vocab)
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        self.vocab_size = len(self.vocab)
        self.pad_token_id = self.ids[pad_token] if pad_token else 0
        self.bos_token_id = self.ids[bos_token] if bos_token else None
        self.eos_token_id = self.ids[eos_token] if eos_token else None
        self.unk_token_id = self.ids[unk_token] if unk_token else None

    def pieces(self, text: str) -> list[str]:
        return list(text) if self.kind == "char" else text.split()

    def encode(self, text: str) -> list[int]:
        ids, unknown = [], []
        for piece in self.pieces(text):
            token_id = self.ids.get(piece, self.unk_token_id)
            if token_id is None:
                unknown.append(piece)
            ids.append(token_id)
        if unknown:
            unit = "character" if self.kind == "char" else "word"
            raise TaskError(
                f"tokenizer ({self.kind}): unknown {unit}(s) {sorted(set(unknown))[:10]} in {text[:60]!r}; "
                "add them to tokenizer.vocab or set tokenizer.unk_token"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        sep = "" if self.kind == "char" else " "
        return sep.join(self.vocab[i] for i in ids)


class HFTokenizer:
    """A transformers tokenizer from a local directory (never downloaded)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TaskError(
                f"tokenizer.path {path!r}: cannot load a transformers tokenizer from it ({exc}); "
                "give a local directory written by tokenizer.save_pretrained"
            ) from None
        tok = self.tokenizer
        self.vocab_size = len(tok)
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = pad if pad is not None else 0  # padding is masked; any id works
        self.chat_template = getattr(tok, "chat_template", None)  # None: chat is not served

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A chat rendered by the tokenizer's template, ready for the assistant's reply."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids with the tokenizer's own special tokens (e.g. ``[CLS] ... [SEP]``)."""
        return list(self.tokenizer(text)["input_ids"])

    def adds_bos_by_default(self) -> bool:
        if self.bos_token_id is None:
            return False
        with_specials = self.encode_with_specials("a")
        return with_specials[:1] == [self.bos_token_id] and self.encode("a")[:1] != [self.bos_token_id]


@dataclass
class TextEncoder:
    """A tokenizer plus the policy for special tokens around prompts, completions and texts.

    Attributes:
        tokenizer: the tokenizer.
        add_bos: prepend BOS to prompts and texts.
        add_eos: append EOS to completions and texts.
    """

    tokenizer: VocabTokenizer | CharTokenizer | HFTokenizer
    add_bos: bool
    add_eos: bool

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def prompt(self, text: str) -> list[int]:
        """Prompt ids: ``[BOS] + encode(text)``."""
        return self._bos() + self.tokenizer.encode(text)

    def completion(self, text: str) -> list[int]:
        """Completion ids: ``encode(text) + [EOS]``."""
        return self.tokenizer.encode(text) + self._eos()

    def sequence(self, text: str) -> list[int]:
        """A whole text for an encoder (a transformers tokenizer adds its own specials)."""
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.encode_with_specials(text)
        return self._bos() + self.tokenizer.encode(text) + self._eos()

    def _bos(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.add_bos else []

    def _eos(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.add_eos else []


def build_text_encoder(spec: TokenizerSpec) -> TextEncoder:
    """Build the tokenizer a :class:`TokenizerSpec` describes.

    Raises:
        TaskError: if an ``hf`` tokenizer cannot be loaded, or lacks a BOS/EOS that is asked for.
    """
    if spec.kind == "hf":
        tokenizer = HFTokenizer(spec.path)
        add_bos = tokenizer.adds_bos_by_default() if spec.add_bos is None else spec.add_bos
    elif spec.path is not None:  # kind char, from a character tokenizer file
        tokenizer = _char_tokenizer_file(spec.path)
        add_bos = True if spec.add_bos is None else spec.add_bos
    else:
        if spec.vocab is None:  # default char vocab and its specials
            specials = {k: getattr(spec, k) or v for k, v in DEFAULT_CHAR_SPECIALS.items()}
            vocab = DEFAULT_CHAR_VOCAB
        else:
            specials = {k: getattr(spec, k) for k in DEFAULT_CHAR_SPECIALS}
            vocab = spec.vocab
        tokenizer = VocabTokenizer(vocab, spec.kind, **specials)
        add_bos = tokenizer.bos_token_id is not None if spec.add_bos is None else spec.add_bos
    for flag, value, token_id in (
        ("add_bos", add_bos, tokenizer.bos_token_id),
        ("add_eos", spec.add_eos, tokenizer.eos_token_id),
    ):
        if value and token_id is None:
            raise TaskError(f"tokenizer.{flag} is true but the tokenizer has no such token; set it false")
    return TextEncoder(tokenizer=tokenizer, add_bos=add_bos, add_eos=spec.add_eos)


def _char_tokenizer_file(path: str) -> CharTokenizer:
    try:
        return CharTokenizer.load(path)
    except (OSError, ValueError, KeyError) as exc:
        raise TaskError(
            f"tokenizer.path {path!r}: cannot load a character tokenizer from it ({exc}); "
            "give a char_tokenizer.json file (or its directory) written by CharTokenizer.save"
        ) from None


def load_tokenizer(path: str | Path, kind: str) -> CharTokenizer | HFTokenizer:
    """The tokenizer the server encodes prompts and decodes outputs with: a character tokenizer
    file (``kind="char"``) or a transformers tokenizer directory (``"hf"``).

    Raises:
        TaskError: the file or directory cannot be loaded as ``kind``.
    """
    return _char_tokenizer_file(str(path)) if kind == "char" else HFTokenizer(str(path))
