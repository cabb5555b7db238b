"""The base model with LoRA adapters attached **unmerged** (pure torch + PEFT, no Ray).

One ``PeftModel`` wraps the base once; adapters are added and deleted by name and chosen per
sample with PEFT's ``adapter_names`` (``"__base__"`` = the bare base), so one forward serves a
batch that mixes adapters. The base weights are never written: merging would move d/r times more
bytes per swap and drift in half precision (DESIGN.md §6); :meth:`LoraHost.base_fingerprint`
lets tests prove it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.adapters.io import peft_state
from engine.adapters.lora import LoraAdapter

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names
_PLACEHOLDER = "_icmf_placeholder"  # PeftModel needs one adapter to exist; it is never used


class CharTokenizer:
    """The lab's character tokenizer read from its JSON file (``icmf-lab-char-tokenizer/1``):
    ids 0..3 are ``<pad> <bos> <eos> <unk>``, then one id per character."""

    FORMAT = "icmf-lab-char-tokenizer/1"

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "char_tokenizer.json"
        data = json.loads(path.read_text())
        if data.get("format") != self.FORMAT:
            raise ValueError(f"{path}: not a lab char tokenizer (format {data.get('format')!r})")
        self.chars = data["chars"]
        self._ids = {c: i + 4 for i, c in enumerate(self.chars)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)

    def encode(self, text: str) -> list[int]:
        """``<bos>`` followed by one id per character (unknown characters -> ``<unk>``)."""
        return [self.bos_token_id] + [self._ids.get(c, self.unk_token_id) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 4] for i in ids if i >= 4)


class HFTokenizer:
    """A transformers tokenizer with the same small interface as :class:`CharTokenizer`."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))
        self.eos_token_id = self._tok.eos_token_id
        self.pad_token_id = (
            self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_token_id
        )

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path, kind: str):
    return CharTokenizer(path) if kind == "char" else HFTokenizer(path)


def load_causal_lm(path: str | Path):
    """The base model from a ``save_pretrained`` directory, frozen and in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def peft_config_of(adapter: LoraAdapter):
    """A ``LoraConfig`` equal to the one :func:`engine.adapters.io.save_adapter` would write."""
    from peft import LoraConfig

    _, config = peft_state(adapter)
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in config.items() if k in fields and k != "peft_type"})


class LoraHost:
    """A base causal LM hosting named LoRA adapters.

    Args:
        base: a ``PreTrainedModel`` (e.g. from :func:`load_causal_lm`); wrapped, never modified.
        eos_token_id / pad_token_id: generation stops at ``eos``; prompts are left-padded with ``pad``.
    """

    def __init__(self, base, eos_token_id: int, pad_token_id: int):
        from peft import LoraConfig, get_peft_model

        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_positions = int(getattr(base.config, "max_position_embeddings", 2048))
        placeholder = LoraConfig(r=1, target_modules=_first_linear_names(base), init_lora_weights=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = get_peft_model(base, placeholder, adapter_name=_PLACEHOLDER).eval()
        self.names: set[str] = set()

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, adapter: LoraAdapter) -> None:
        """Attach ``adapter`` as ``name`` (unmerged; base weights untouched), replacing any
        adapter of that name."""
        from peft import set_peft_model_state_dict

        if name in self.model.peft_config:
            self.model.delete_adapter(name)

        tensors, _ = peft_state(adapter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.add_adapter(name, peft_config_of(adapter))
            result = set_peft_model_state_dict(self.model, tensors, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            self.model.delete_adapter(name)
            raise ValueError(f"adapter {name!r} does not fit the base model: {unexpected[:3]}")
        self.names.add(name)

    def remove(self, name: str) -> None:
        if name in self.names:
            self.model.delete_adapter(name)
            self.names.discard(name)

    def base_fingerprint(self) -> str:
        """sha256 over every non-LoRA parameter and buffer (the base's weights)."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            if "lora_" not in key:
                # A module that gets its first adapter is wrapped (``x.weight`` -> ``x.base_layer.weight``).
                digest.update(key.replace(".base_layer", "").encode())
                digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def steps(
        self,
        prompts: list[list[int]],
        adapter_names: list[str],
        max_new_tokens: list[int],
        ignore_eos: list[bool] | None = None,
    ) -> Iterator[list[int | None]]:
        """Greedy decoding of a batch, one yield per step.

        Args:
            prompts: token ids per sample (lengths may differ; left-padded internally).
            adapter_names: adapter per sample (``"__base__"`` for the bare base).
            max_new_tokens: token budget per sample.
            ignore_eos: per sample, keep generating past ``eos`` (benchmarks: fixed lengths).

        Yields:
            per sample the next token id, or ``None`` once that sample has finished (``eos`` or
            budget). The ``eos`` token itself is not yielded.
        """
        n = len(prompts)
        width = max(map(len, prompts))
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)  # [n, T]
        mask = torch.zeros((n, width), dtype=torch.long)  # [n, T]
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        done = [budget <= 0 for budget in max_new_tokens]
        produced = [0] * n
        names = list(adapter_names)
        ignore = list(ignore_eos or [False] * n)
        while not all(done):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [n, T]
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=names
            ).logits[:, -1]  # [n, V]
            nxt = logits.argmax(-1)  # [n]
            out: list[int | None] = []
            for i in range(n):
                token = int(nxt[i])
                if done[i] or (token == self.eos_token_id and not ignore[i]):
                    done[i] = True
                    out.append(None)
                    continue
                produced[i] += 1
                done[i] = produced[i] >= max_new_tokens[i]
                out.append(token)
            yield out
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.tensor([[0 if t is None else 1] for t in out])], dim=1)

    def generate(
        self,
        prompts: list[list[int]],
        adapter_names: list[str],
        max_new_tokens: list[int],
        ignore_eos: list[bool] | None = None,
    ) -> list[list[int]]:
        """Greedy completions (token ids, without ``eos``) of a batch; see :meth:`steps`."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.steps(prompts, adapter_names, max_new_tokens, ignore_eos):
            for i, token in enumerate(step):
                if token is not None:
                    outputs[i].append(token)
        return outputs


def _first_linear_names(model) -> list[str]:
    """The leaf name of one ``nn.Linear`` in ``model`` (the placeholder adapter's target)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            return [name.rsplit(".", 1)[-1]]
    raise ValueError("the base model has no linear layer to attach LoRA adapters to")
