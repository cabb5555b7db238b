"""The character tokenizer file format ``icmf-lab-char-tokenizer/1``: its one reader and writer.

Ids ``0..3`` are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; then one id per character (by default
``\\n`` and the 95 printable ASCII characters). Text is NFKD-normalised and accents are dropped
before encoding, so ``"café"`` becomes ``"cafe"``; any other character maps to ``<unk>``. Saved as
a small JSON file. The lab trains with it, task models (``tokenizer: {kind: char, path: FILE}``)
score with it and the server encodes prompts with it, so a prompt gets the same ids everywhere.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

FORMAT = "icmf-lab-char-tokenizer/1"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
DEFAULT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
FILE_NAME = "char_tokenizer.json"


class CharTokenizer:
    """Encodes strings to ids and back.

    Example::

        tok = CharTokenizer()
        ids = tok.encode("rev:abc=", add_bos=True)
        tok.decode(ids)                     # 'rev:abc='
        batch = tok(["ab", "abc"], return_tensors="pt")   # input_ids / attention_mask [2, 3]
    """

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: chars must be distinct")
        self.chars = chars
        self._to_id = {c: i + len(SPECIALS) for i, c in enumerate(chars)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)
        self.padding_side = "right"
        self.chat_template = None  # no chat format: chat completions are not served

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    @staticmethod
    def normalize(text: str) -> str:
        decomposed = unicodedata.normalize("NFKD", text)
        return "".join(c for c in decomposed if not unicodedata.combining(c))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self._to_id.get(c, self.unk_token_id) for c in self.normalize(text)]
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def encode_with_specials(self, text: str) -> list[int]:
        """A prompt as the model was trained on it: ``<bos>`` then the text's ids."""
        return self.encode(text, add_bos=True)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i >= len(SPECIALS):
                out.append(self.chars[i - len(SPECIALS)])
            elif not skip_special_tokens:
                out.append(SPECIALS[i])
        return "".join(out)

    def __call__(
        self,
        texts: str | Sequence[str],
        add_bos: bool = True,
        add_eos: bool = False,
        padding_side: str | None = None,
        return_tensors: str | None = None,
    ):
        """Encode a batch, padded to its longest member: ``{"input_ids", "attention_mask"}``."""
        single = isinstance(texts, str)
        encoded = [self.encode(t, add_bos, add_eos) for t in ([texts] if single else texts)]
        side = padding_side or self.padding_side
        width = max(map(len, encoded), default=0)
        ids, mask = [], []
        for e in encoded:
            pad = [self.pad_token_id] * (width - len(e))
            ids.append(pad + e if side == "left" else e + pad)
            mask.append([0] * len(pad) + [1] * len(e) if side == "left" else [1] * len(e) + [0] * len(pad))
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if single:
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {"format": FORMAT, "specials": list(SPECIALS), "chars": self.chars}

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON; ``path`` may be a file or a directory."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / FILE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    save_pretrained = save

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or tuple(data.get("specials", ())) != SPECIALS:
            raise ValueError(f"{path}: not a lab character tokenizer (format {data.get('format')!r})")
        return cls(data["chars"])

    from_pretrained = load

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
