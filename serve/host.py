"""The base model with LoRA adapters attached **unmerged** (pure torch, no Ray).

Each linear module an adapter targets is wrapped once in :class:`LoraLinear`, which keeps the
base layer as it is and adds ``(x Aᵀ)(s·B)ᵀ`` for the adapter each sample asks for. Adapters
are added and removed by name; a batch may mix adapters (``"__base__"`` = the bare base). The
base weights are never written: merging would move d/r times more bytes per swap and drift in
half precision (docs/design.md §6); :meth:`MultiLoraHost.base_fingerprint` lets tests prove it.

Why not PEFT's ``PeftModel`` here: its per-sample ``adapter_names`` path registers hooks on every
LoRA layer and splits the batch on every call, and ``add_adapter`` builds and initialises new
modules per swap; on small models that costs more than the LoRA arithmetic (measured in
``benchmarks/serve_latency``). Multi-LoRA servers (vLLM, LoRAX) route per sample the same way.
Adapters are read with the engine's PEFT loaders and outputs are tested against stock PEFT.
"""

from __future__ import annotations

import hashlib
import inspect
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from engine.adapters.lora import LoraAdapter

BASE_ADAPTER = "__base__"  # the bare base in a batch's adapter names (PEFT's spelling too)


def load_causal_lm(path: str | Path):
    """The base model from a ``save_pretrained`` directory, frozen and in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@dataclass
class _Route:
    """Which adapter each sample of the next forward uses, computed once for all layers.

    ``single``: the one adapter of a batch that uses one; else ``groups``: (name, sample rows).
    """

    single: str | None = None
    groups: tuple[tuple[str, torch.Tensor], ...] = ()


@dataclass
class Sampler:
    """Temperature / nucleus sampling of one sample's next token, from its own seeded generator
    (so its draws depend on neither the batch it shares nor other requests).

    Args:
        temperature: > 0 (``0`` means greedy: use no sampler).
        top_p: keep the smallest set of most likely tokens whose mass reaches ``top_p`` (0, 1].
        seed: seeds the generator; ``None`` draws a fresh seed.
    """

    temperature: float
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(
            self.seed if self.seed is not None else secrets.randbits(63)
        )

    @classmethod
    def from_params(cls, params: dict | None) -> Sampler | None:
        """A sampler for ``{"temperature", "top_p"?, "seed"?}``; ``None`` for greedy decoding."""
        if not params or not params.get("temperature"):
            return None
        return cls(float(params["temperature"]), float(params.get("top_p") or 1.0), params.get("seed"))

    def draw(self, logits: torch.Tensor) -> int:
        """``logits``: ``[V]`` -> one token id."""
        probs = torch.softmax(logits.double() / self.temperature, -1)  # [V]
        if not torch.isfinite(probs).all():  # a degenerate adapter's logits: fall back to greedy
            return int(torch.nan_to_num(logits, nan=-torch.inf).argmax())
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep a token while the mass before it is under top_p (the first is always kept)
            keep = (sorted_probs.cumsum(0) - sorted_probs) < self.top_p
            choice = torch.multinomial(sorted_probs * keep, 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, samplers: list[Sampler | None]) -> torch.Tensor:
    """``logits``: ``[n, V]`` -> ``[n]`` next tokens: argmax, or each sampler's draw."""
    tokens = logits.argmax(-1)
    for i, sampler in enumerate(samplers):
        if sampler is not None:
            tokens[i] = sampler.draw(logits[i])
    return tokens


class LoraLinear(nn.Module):
    """``base_layer(x)`` plus, per sample, the LoRA delta of that sample's adapter.

    Args:
        base_layer: the wrapped ``nn.Linear`` (kept as is; its weights are never written).
        route: a one-element list holding the current :class:`_Route` (shared by every layer of
            a host, so routing a batch is one assignment, not one per layer).
    """

    def __init__(self, base_layer: nn.Linear, route: list[_Route | None]):
        super().__init__()
        self.base_layer = base_layer
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (A [r, in], sB [out, r])
        self._route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[n, T, in]`` -> ``[n, T, out]``."""
        y = self.base_layer(x)
        route = self._route[0]
        if route is None:
            return y
        # F.linear(x, a) is x @ a.T without dispatching a transposed view first: on small models
        # the LoRA delta costs in op dispatches, not arithmetic (same bits as the matmuls).
        if route.single is not None:
            factors = self.factors.get(route.single)
            if factors is None:  # this adapter does not target this module
                return y
            a, b = factors
            return y + F.linear(F.linear(x, a), b)
        for name, rows in route.groups:
            factors = self.factors.get(name)
            if factors is not None:
                a, b = factors
                y = y.index_add(0, rows, F.linear(F.linear(x[rows], a), b))
        return y


class MultiLoraHost:
    """A base causal LM hosting many named LoRA adapters for generation, routed per sample.

    (The few-shot objective's :class:`engine.tasks.functional.LoraHost` is another thing: it
    substitutes differentiable factors per call into one PEFT model and never generates.)

    Args:
        base: a ``PreTrainedModel`` (e.g. from :func:`load_causal_lm`); its targeted linear
            modules are wrapped in :class:`LoraLinear` as adapters arrive, its weights never written.
        eos_token_id / pad_token_id: generation stops at ``eos``; prompts are left-padded with ``pad``.
    """

    def __init__(self, base, eos_token_id: int, pad_token_id: int):
        self.model = base
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_positions = int(getattr(base.config, "max_position_embeddings", 2048))
        # transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output field)
        accepted = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._route: list[_Route | None] = [None]
        self._device = next(base.parameters()).device
        self._layers: dict[str, LoraLinear] = {}  # module name -> its wrapper
        self.names: set[str] = set()

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, adapter: LoraAdapter) -> None:
        """Attach ``adapter`` as ``name`` (unmerged; base weights untouched), replacing any
        adapter of that name. All or nothing: a misfit adapter raises and changes nothing.

        Raises:
            ValueError: ``name`` is reserved, the adapter carries ``modules_to_save`` weights, or
                a module is not a linear layer of this base model or has other dimensions.
        """
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} names the bare base model, not an adapter")
        if adapter.extras:
            raise ValueError(
                f"adapter {name!r} carries modules_to_save weights ({sorted(adapter.extras)[:3]}); "
                "only LoRA factors can be swapped per request"
            )
        targets = {
            module_name: self._linear(name, module_name, module)
            for module_name, module in adapter.modules.items()
        }
        self.remove(name)
        for module_name, linear in targets.items():
            layer = self._layers.get(module_name) or self._wrap(module_name, linear)
            module = adapter.modules[module_name]
            weight = linear.weight
            a = module.A.to(device=weight.device, dtype=weight.dtype).contiguous()
            b = (module.B.double() * module.scaling).to(device=weight.device, dtype=weight.dtype).contiguous()
            layer.factors[name] = (a, b)
        self.names.add(name)

    def _linear(self, name: str, module_name: str, module) -> nn.Linear:
        """The base model's linear layer ``module_name``, checked against the adapter's shapes."""
        if module_name in self._layers:
            linear = self._layers[module_name].base_layer
        else:
            try:
                linear = self.model.get_submodule(module_name)
            except AttributeError:
                raise ValueError(
                    f"adapter {name!r} targets {module_name!r}, which the base model lacks"
                ) from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"adapter {name!r} targets {module_name!r}, a {type(linear).__name__}; "
                "only LoRA on linear layers is served"
            )
        if (module.d_in, module.d_out) != (linear.in_features, linear.out_features):
            raise ValueError(
                f"adapter {name!r} does not fit the base model at {module_name!r}: "
                f"LoRA maps {module.d_in}->{module.d_out}, the layer {linear.in_features}->{linear.out_features}"
            )
        return linear

    def _wrap(self, module_name: str, linear: nn.Linear) -> LoraLinear:
        parent_name, _, child = module_name.rpartition(".")
        layer = LoraLinear(linear, self._route)
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer)
        self._layers[module_name] = layer
        return layer

    def remove(self, name: str) -> None:
        """Detach ``name`` (a no-op if it is not attached); the wrappers stay, empty."""
        for layer in self._layers.values():
            layer.factors.pop(name, None)
        self.names.discard(name)

    def base_fingerprint(self) -> str:
        """sha256 over every parameter and buffer of the base model (LoRA factors are neither)."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            # A wrapped module's weights live one level down (``x.weight`` -> ``x.base_layer.weight``).
            digest.update(key.replace(".base_layer", "").encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ generation
    def forward(self, adapter_names: list[str], **inputs):
        """One forward of the base model with per-sample adapters (``"__base__"``: none).

        ``inputs`` are the model's own keyword arguments (``input_ids``, ``attention_mask``, ...).
        The route is set for each forward, not once per generation: streams interleave their
        steps with other batches on the model thread.
        """
        self._route[0] = self._routing(adapter_names)
        try:
            return self.model(**inputs)
        finally:
            self._route[0] = None

    def _routing(self, names: list[str]) -> _Route | None:
        unknown = set(names) - self.names - {BASE_ADAPTER}
        if unknown:
            raise KeyError(f"adapter(s) not attached: {sorted(unknown)}")
        distinct = list(dict.fromkeys(names))
        if distinct == [BASE_ADAPTER]:
            return None
        if len(distinct) == 1:
            return _Route(single=distinct[0])
        groups = tuple(
            (name, torch.tensor([i for i, n in enumerate(names) if n == name], device=self._device))
            for name in distinct
            if name != BASE_ADAPTER
        )
        return _Route(groups=groups)

    @torch.inference_mode()
    def steps(
        self,
        prompts: list[list[int]],
        adapter_names: list[str],
        max_new_tokens: list[int],
        ignore_eos: list[bool] | None = None,
        sampling: list[dict | None] | None = None,
    ) -> Iterator[list[int | None]]:
        """Decoding of a batch with a KV cache (greedy unless sampled), one yield per step.

        Args:
            prompts: token ids per sample (lengths may differ; left-padded internally).
            adapter_names: adapter per sample (``"__base__"`` for the bare base).
            max_new_tokens: token budget per sample.
            ignore_eos: per sample, keep generating past ``eos`` (benchmarks: fixed lengths).
            sampling: per sample ``None`` (greedy) or ``{"temperature", "top_p"?, "seed"?}``
                (see :class:`Sampler`).

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
        samplers = [Sampler.from_params(p) for p in (sampling or [None] * n)]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [n, T]
        cache = None
        while not all(done):
            output = self.forward(
                names,
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **({self._cache_arg: cache} if cache is not None else {}),
            )
            cache = getattr(output, self._cache_arg)
            nxt = choose_tokens(output.logits[:, -1], samplers)  # [n]
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
        sampling: list[dict | None] | None = None,
    ) -> list[list[int]]:
        """Completions (token ids, without ``eos``) of a batch; see :meth:`steps`."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.steps(prompts, adapter_names, max_new_tokens, ignore_eos, sampling):
            for i, token in enumerate(step):
                if token is not None:
                    outputs[i].append(token)
        return outputs
