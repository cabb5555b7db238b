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
import inspect
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.adapters.io import peft_state
from engine.adapters.lora import LoraAdapter

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names
_PLACEHOLDER = "_icmf_placeholder"  # PeftModel needs one adapter to exist; it is never used
_UNKNOWN = "\0unknown"  # no adapter has this name: the next selection always applies


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
        # transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output field)
        accepted = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        placeholder = LoraConfig(r=1, target_modules=_first_linear_names(base), init_lora_weights=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = get_peft_model(base, placeholder, adapter_name=_PLACEHOLDER).eval()
        self.names: set[str] = set()
        self._selected: str | None = _UNKNOWN  # what _select last set up

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, adapter: LoraAdapter) -> None:
        """Attach ``adapter`` as ``name`` (unmerged; base weights untouched), replacing any
        adapter of that name."""
        from peft import set_peft_model_state_dict

        if name in self.model.peft_config:
            self.model.delete_adapter(name)
        self._selected = _UNKNOWN  # adding or deleting may move PEFT's active adapter

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
            self.model.delete_adapter(name)  # PEFT picks another active adapter if it was
            self.names.discard(name)
            self._selected = _UNKNOWN

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
    def _forward(self, names: list[str], **inputs):
        """One forward with per-sample adapters ``names``.

        A batch that uses one adapter (or only the base) runs PEFT's plain path: that adapter
        active, or the adapter layers disabled. PEFT's per-sample ``adapter_names`` path registers
        hooks on every LoRA layer and splits the batch per adapter on every call, which costs more
        than the LoRA arithmetic on small models; only batches that really mix adapters take it.
        The selection is made before each forward, not once per generation: streams interleave
        their steps with other batches on the model thread.
        """
        distinct = set(names)
        if len(distinct) > 1:
            self._select(None)
            return self.model(**inputs, adapter_names=names)
        self._select(distinct.pop())
        return self.model(**inputs)

    def _select(self, name: str | None) -> None:
        """Make ``name`` the active adapter (``"__base__"``: none; ``None``: all enabled for a
        mixed batch). PEFT's switches loop over every layer and adapter, so skip repeats."""
        if name == self._selected:
            return
        lora = self.model.base_model
        if name == BASE_ADAPTER:
            lora.disable_adapter_layers()
        else:
            lora.enable_adapter_layers()
            if name is not None:
                lora.set_adapter(name, inference_mode=True)
        self._selected = name

    @torch.inference_mode()
    def steps(
        self,
        prompts: list[list[int]],
        adapter_names: list[str],
        max_new_tokens: list[int],
        ignore_eos: list[bool] | None = None,
    ) -> Iterator[list[int | None]]:
        """Greedy decoding of a batch with a KV cache, one yield per step.

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
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [n, T]
        cache = None
        while not all(done):
            output = self._forward(
                names,
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **({self._cache_arg: cache} if cache is not None else {}),
            )
            cache = getattr(output, self._cache_arg)
            nxt = output.logits[:, -1].argmax(-1)  # [n]
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
            # Only the new token goes in next; finished samples feed a masked-out token.
            ids = nxt[:, None]  # [n, 1]
            positions = positions[:, -1:] + 1  # [n, 1]
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
