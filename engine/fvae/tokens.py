"""The module-token F-VAE (``arch: tokens``): one token per rank component of every module.

Built the way Text-to-LoRA (Sakana AI, 2025) emits the LoRAs of 7-8 B models from one
hypernetwork: the layer and the module type are *inputs* (embeddings), and only the input
projections and output heads depend on a module type's shape. Parameters therefore grow with the
number of module types and their widths, never with the number of layers or ``N``.

Tokens: in the catalog's canonical gauge a module's flat slots are ``A`` (``[r_max, d_in]``)
then ``B^T`` (``[r_max, d_out]``), so rank component ``i`` is the pair ``(a_i, b_i)`` — one token.
Zero tokens (absent modules, zero-padded ranks) are masked out of the encoder; that needs a
normaliser that keeps zero at zero (:meth:`engine.fvae.normalize.SlotNormalizer.per_token_scale`).

Encoder: per module type, ``a_i -> hidden`` and ``b_i -> hidden`` projections, plus the module
type's, the depth's and the rank index's embeddings; a shared residual MLP per token; attention
pooling over the present tokens with a few learned queries; with the task vector, an MLP to
``(mu, logvar)``.

Decoder (hypernetwork, T2L's per-rank output variant): a context from ``[z; v]``, added to each
(layer, module type, rank) query embedding, a shared MLP, then the module type's heads
``hidden -> a_i`` and ``hidden -> b_i``. Its output is the flat ``[B, N]`` vector the other
architectures emit, so anchored decode, familiarity and refinement use it unchanged.

With ``recon_space: delta`` the F-VAE works on what a module *does*, ``dW = B A``, not on how its
factors are written: two LoRAs of one task trained from different seeds share much of ``dW`` and
almost nothing of their factors (each run's rank components live where its initialisation put
them). The encoder's tokens are then the module's action on fixed random orthonormal probe
directions, ``dW p_j`` and ``dW^T q_j`` (``j < r_max``; a two-sided sketch that determines a
rank-``r_max`` ``dW``), which no change of the factors' gauge alters; the decoder still emits factors, and the
reconstruction term compares the updates (:func:`delta_inner`).

Depth enters as Fourier features of the layer's relative depth (``layer / (layers - 1)``) through
a learned map: a learned layer embedding whose size does not depend on the number of layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from torch.nn import functional as F

from engine.adapters.layout import Layout

DEPTH_FREQUENCIES = 8  # Fourier features of relative depth: 2 x 8 inputs to the learned depth map
PROBE_SEED = 0  # the probe directions are a fixed function of the layout, not learned


def delta_inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Frobenius inner products ``<B1 A1, B2 A2>`` of two batches of one module's updates, from
    their factor rows alone (``a [B, r, d_in]`` rows of ``A``, ``b [B, r, d_out]`` rows of ``B^T``):
    ``sum_ij (b1_i . b2_j)(a1_i . a2_j)``, two ``r x r`` Gram matrices per adapter, never a
    ``d_out x d_in`` matrix. Returns ``[B]``."""
    return (torch.einsum("bid,bjd->bij", b1, b2) * torch.einsum("bid,bjd->bij", a1, a2)).sum(dim=(1, 2))


def delta_measures(a_hat, b_hat, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's reconstruction of its update ``dW = B A`` for a batch of adapters (factor
    rows as :func:`delta_inner`): the relative error ``||dW_hat - dW||^2 / ||dW||^2`` and the
    explained fraction ``cos^2(dW_hat, dW)``, each ``[B]``."""
    hat, cross, target = (
        delta_inner(a_hat, b_hat, a_hat, b_hat),
        delta_inner(a_hat, b_hat, a, b),
        delta_inner(a, b, a, b),
    )
    target = target.clamp_min(1e-12)
    error = (hat - 2 * cross + target).clamp_min(0.0) / target
    return error, cross.square() / (hat.clamp_min(1e-12) * target)


def _probes(d: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[d, count]`` orthonormal columns (fewer when ``d < count``, zero-padded to ``count``)."""
    q, _ = torch.linalg.qr(torch.randn(d, min(d, count), generator=generator))
    return F.pad(q, (0, count - q.shape[1]))


@dataclass(frozen=True)
class ModuleTokens:
    """Where each module of a layout sits in the token view.

    Attributes:
        layout: the layout.
        types: per module type, ``(name pattern, d_out, d_in)``; the pattern is the module name
            with its layer number replaced by ``*`` (``model.layers.*.self_attn.q_proj``).
        type_of: per module, its type's index.
        layer_of: per module, its layer number (the first number in its name; 0 when none).
    """

    layout: Layout
    types: tuple[tuple[str, int, int], ...]
    type_of: tuple[int, ...]
    layer_of: tuple[int, ...]

    @classmethod
    def from_layout(cls, layout: Layout) -> ModuleTokens:
        types: dict[tuple[str, int, int], int] = {}
        type_of, layer_of = [], []
        for module in layout.modules:
            number = re.search(r"\d+", module.name)
            pattern = re.sub(r"\d+", "*", module.name, count=1)
            key = (pattern, module.d_out, module.d_in)
            type_of.append(types.setdefault(key, len(types)))
            layer_of.append(int(number.group()) if number else 0)
        return cls(layout, tuple(types), tuple(type_of), tuple(layer_of))

    @property
    def num_layers(self) -> int:
        return max(self.layer_of) + 1

    @cached_property
    def relative_depth(self) -> torch.Tensor:
        """``[M]`` each module's layer over the deepest layer, in ``[0, 1]``."""
        return torch.tensor(self.layer_of, dtype=torch.float32) / max(1, self.num_layers - 1)

    def blocks(self, x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Module ``m``'s tokens in ``x [B, N]``: views ``A [B, r_max, d_in]``, ``B^T [B, r_max, d_out]``."""
        start, end = int(self.layout.offsets[m]), int(self.layout.offsets[m + 1])
        return self.rows(x[:, start:end], m)

    def rows(self, slots: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Module ``m``'s own slots ``[B, r_max x (d_in + d_out)]`` as views ``A [B, r_max, d_in]``,
        ``B^T [B, r_max, d_out]``."""
        spec, r = self.layout.modules[m], self.layout.r_max
        middle = r * spec.d_in
        a = slots[:, :middle].view(slots.shape[0], r, spec.d_in)
        b = slots[:, middle:].view(slots.shape[0], r, spec.d_out)
        return a, b


def _depth_features(depth: torch.Tensor) -> torch.Tensor:
    """``[M]`` relative depths -> ``[M, 2 x DEPTH_FREQUENCIES]`` sin/cos features."""
    angles = depth[:, None] * math.pi * 2.0 ** torch.arange(DEPTH_FREQUENCIES, dtype=depth.dtype)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _Embeddings(nn.Module):
    """Type, depth and rank-index embeddings of every token: ``[M, r_max, hidden]``."""

    def __init__(self, tokens: ModuleTokens, hidden: int):
        super().__init__()
        self.type_embedding = nn.Embedding(len(tokens.types), hidden)
        self.depth_map = nn.Sequential(
            nn.Linear(2 * DEPTH_FREQUENCIES, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.rank_embedding = nn.Embedding(tokens.layout.r_max, hidden)
        self.register_buffer("type_of", torch.tensor(tokens.type_of), persistent=False)
        self.register_buffer("depth", _depth_features(tokens.relative_depth), persistent=False)

    def forward(self) -> torch.Tensor:
        per_module = self.type_embedding(self.type_of) + self.depth_map(self.depth)  # [M, h]
        return per_module[:, None, :] + self.rank_embedding.weight[None, :, :]


class _Residual(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class TokenFVAE(nn.Module):
    """The module-token F-VAE (see the module docstring); ``config.layout`` is required."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tokens = ModuleTokens.from_layout(Layout.from_dict(config.layout))
        h, types = config.hidden, self.tokens.types
        # Per module type: input projections and output heads, the only shape-dependent weights.
        self.project_a = nn.ModuleList(nn.Linear(d_in, h) for _, _, d_in in types)
        self.project_b = nn.ModuleList(nn.Linear(d_out, h, bias=False) for _, d_out, _ in types)
        self.head_a = nn.ModuleList(nn.Linear(h, d_in) for _, _, d_in in types)
        self.head_b = nn.ModuleList(nn.Linear(h, d_out) for _, d_out, _ in types)
        self.encoder_embeddings = _Embeddings(self.tokens, h)
        self.decoder_embeddings = _Embeddings(self.tokens, h)
        self.token_encoder = _Residual(h)
        self.pool_queries = nn.Parameter(torch.randn(config.token_queries, h) / math.sqrt(h))
        self.to_stats = nn.Sequential(
            nn.LayerNorm(config.token_queries * h + config.cond_dim),
            nn.Linear(config.token_queries * h + config.cond_dim, h),
            nn.GELU(),
            nn.Linear(h, 2 * config.latent_dim),
        )
        self.context = nn.Sequential(
            nn.Linear(config.latent_dim + config.cond_dim, h), nn.GELU(), nn.Linear(h, h)
        )
        self.token_decoder = nn.Sequential(_Residual(h), _Residual(h), nn.LayerNorm(h))
        if config.recon_space == "delta":
            # Per module type, input probes [d_in, r_max] and output probes [d_out, r_max]: saved
            # with the weights so an artifact reads adapters exactly as it was trained to.
            generator = torch.Generator().manual_seed(PROBE_SEED)
            r = self.tokens.layout.r_max
            for t, (_, d_out, d_in) in enumerate(types):
                self.register_buffer(f"probe_in_{t}", _probes(d_in, r, generator))
                self.register_buffer(f"probe_out_{t}", _probes(d_out, r, generator))

    def token_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, M, r_max]`` bool: the tokens of ``x [B, N]`` that are not all zero (``delta``: every
        probe token of a module that is present)."""
        masks = []
        for m in range(self.tokens.layout.num_modules):
            a, b = self.tokens.blocks(x, m)
            present = (a != 0).any(dim=2) | (b != 0).any(dim=2)
            masks.append(present.any(dim=1, keepdim=True).expand_as(present) if self.delta else present)
        return torch.stack(masks, dim=1)

    @property
    def delta(self) -> bool:
        return self.config.recon_space == "delta"

    def _module_tokens(self, a: torch.Tensor, b: torch.Tensor, t: int) -> torch.Tensor:
        """One adapter's module of type ``t``, factor rows ``a [r, d_in]`` and ``b [r, d_out]``, as the
        encoder's tokens ``[r, hidden]``: the projected rows (``factors``), or (``delta``) the
        projected probe actions ``dW^T q_j`` and ``dW p_j``, scaled by ``1 / sqrt(r_max)`` to keep
        the factor rows' magnitude."""
        project_a, project_b = self.project_a[t], self.project_b[t]
        if not self.delta:
            return project_a(a) + project_b(b)
        scale = self.tokens.layout.r_max**-0.5
        # dW = b^T a, so the probe actions are [r, r] mixes of the rows: dW^T q_j = a^T (b q_j),
        # dW p_j = b^T (a p_j). Mixing after the (linear) projection leaves autograd the rows
        # themselves (views of the input) to keep, not new r x d tensors.
        mix_a = (b @ getattr(self, f"probe_out_{t}")).T * scale
        mix_b = (a @ getattr(self, f"probe_in_{t}")).T * scale
        return mix_a @ F.linear(a, project_a.weight) + project_a.bias + mix_b @ F.linear(b, project_b.weight)

    def delta_errors(self, x_hat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``recon_space: delta``: :func:`delta_measures` of every module of ``x_hat [B, N]`` against
        ``x [B, N]``: relative errors and explained fractions, each ``[B, M]`` (absent modules
        included: the caller masks them)."""
        errors, explained = [], []
        for m in range(self.tokens.layout.num_modules):
            error, share = delta_measures(*self.tokens.blocks(x_hat, m), *self.tokens.blocks(x, m))
            errors.append(error)
            explained.append(share)
        return torch.stack(errors, dim=1), torch.stack(explained, dim=1)

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.encoder_embeddings()  # [M, r, h]
        tokens = []
        for m, t in enumerate(self.tokens.type_of):
            a, b = self.tokens.blocks(x, m)
            # One adapter at a time: a module's block is contiguous within a row of x but not across
            # rows, so a batched Linear would first copy (and keep for backward) all of x.
            per_adapter = [self._module_tokens(a[i], b[i], t) for i in range(x.shape[0])]
            tokens.append(torch.stack(per_adapter))  # [B, r, h]
        h = self.token_encoder(torch.stack(tokens, dim=1) + embeddings)  # [B, M, r, h]
        h = h.flatten(1, 2)  # [B, T, h]
        mask = self.token_mask(x).flatten(1)  # [B, T]
        scores = torch.einsum("bth,qh->bqt", h, self.pool_queries) / math.sqrt(h.shape[-1])
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        # An adapter with no token at all (all zero) pools to zero instead of NaN.
        weights = torch.nan_to_num(F.softmax(scores, dim=2), nan=0.0)
        pooled = torch.einsum("bqt,bth->bqh", weights, h).flatten(1)  # [B, Q x h]
        mu, logvar = self.to_stats(torch.cat([pooled, cond], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.decoder_states(z, cond)
        # Each module's slots are written into one preallocated [B, N] output as they are made:
        # a concatenation would hold every piece and the result at once.
        out = h.new_empty(h.shape[0], self.tokens.layout.size)
        offsets = self.tokens.layout.offsets
        for m in range(self.tokens.layout.num_modules):
            a, b = self._module_heads(h, m)
            middle = int(offsets[m]) + a.shape[1]
            out[:, int(offsets[m]) : middle] = a
            out[:, middle : int(offsets[m + 1])] = b
        return out

    def decoder_states(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The decoder's token states ``[B, M, r_max, hidden]`` for ``z [B, latent]``, ``cond [B, d]``:
        everything of a decode but the per-module heads (:meth:`decode_module`)."""
        context = self.context(torch.cat([z, cond], dim=1))  # [B, h]
        return self.token_decoder(context[:, None, None, :] + self.decoder_embeddings())

    def decode_module(self, states: torch.Tensor, m: int) -> torch.Tensor:
        """Module ``m``'s flat slots ``[B, r_max x (d_in + d_out)]`` (``A`` then ``B^T``, as in the
        flat vector) from :meth:`decoder_states`: a decode one module at a time."""
        return torch.cat(self._module_heads(states, m), dim=1)

    def _module_heads(self, states: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Module ``m``'s flat ``A`` slots ``[B, r_max x d_in]`` and ``B^T`` slots ``[B, r_max x d_out]``."""
        t = self.tokens.type_of[m]
        return self.head_a[t](states[:, m]).flatten(1), self.head_b[t](states[:, m]).flatten(1)
