"""The one place where model families differ: encoding prompts, prefilling, stepping rows of a KV cache.

SafeCoDe's loop needs a few things from a model: encode a prompt with its
images, prefill it, feed one more token per row, drop rows from the KV cache,
and (for continuous batching) line up the rows of many requests in one cache.
Hugging Face models already describe their per-family needs to `generate`
through `prepare_inputs_for_generation`, `_prepare_position_ids_for_generation`
and `_update_model_kwargs_for_generation` (M-RoPE positions for Qwen-VL,
`token_type_ids` for PaliGemma and Gemma3, ...), so `Decoder` drives those
same hooks instead of re-implementing them.

Rows of different requests live in one `RowBatch` (`kv_rows.py`, the KV-cache
mechanics): right-aligned, shorter ones left-padded, each with its own positions.

Prompts are prefilled as a `Prefill`: the rows of one or more requests
(one `PromptRow` per view), left-padded to one length as `generate` pads a
batch of prompts, and run a chunk of columns at a time so that a long prompt
never holds the model for long. The vision tower runs before, once per row
(`Decoder.encode_images`), and its features are fed to the chunk that holds
their placeholder tokens, as `generate` feeds pre-encoded features
(`mm_encoder_outputs`); so features can be reused across prompts that show
the same images (a self judge's prompt and the answer's real view).

What the generation hooks do not cover lives in `Quirks`, detected once per model:

- models whose forward cannot take pre-encoded image features: a forward
  without `mm_encoder_outputs` (the test `generate` itself makes before it
  pre-encodes; e.g. Mllama, whose images reach the text through cross-attention
  layers rather than placeholder embeddings), or one whose encoded output has
  no pooled, per-placeholder features to slice into chunks (Llama 4 keeps its
  features before the projector, in `last_hidden_state`; found by the first
  encoding, a probe). Their prompts with images are prefilled whole from the
  processor's raw inputs, as `generate` does without pre-encoding: still
  several rows together, left-padded, when their image inputs stack (the same
  keys and shapes but the first), else alone; the vision tower then runs in
  every prefill, with no features kept for reuse;

- composite models whose top-level forward insists on `pixel_values` on every
  call (InstructBLIP): decode steps go through their `language_model`, with
  positions we keep ourselves (the language model would otherwise count them
  from the cache length, which is wrong for a left-padded row);
- KV-cache layer kinds that cannot be realigned (anything but full-attention
  and sliding-window layers): such models decode one request at a time;
- attention that is not causal within the prompt: Gemma3's image tokens attend
  to each other both ways, so a chunk boundary never splits an image;
  PaliGemma's whole prompt (image and prefix text) is one bidirectional block,
  so its prompts are prefilled in one piece.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from ..errors import UnsupportedContentError
from .kv_rows import PER_TOKEN_KEYS, RowBatch, give_room

__all__ = [
    "Decoder",
    "FeatureCache",
    "ImageFeatures",
    "Prefill",
    "PromptRow",
    "Quirks",
    "detect_quirks",
    "encode_rows",
    "encode_views",
]


@dataclass(frozen=True)
class Quirks:
    requires_image: bool
    """The top-level forward has no text-only path (`pixel_values` is required)."""
    step_through_language_model: bool
    """Decode steps must call `model.language_model` (top-level forward needs pixels)."""
    prompt_blocks: Literal["none", "images", "prompt"] = "none"
    """Spans of the prompt that attend both ways, so a prefill chunk must not split them:
    "images" (each image's tokens, Gemma3), "prompt" (the whole prompt, PaliGemma)."""
    image_inputs: Literal["features", "pixels"] = "features"
    """How images reach the forward: "features", pre-encoded once per view and fed to the chunk
    that holds their placeholders (the forward takes `mm_encoder_outputs`); "pixels", the
    processor's raw inputs with the whole prompt (Mllama's cross-attention, Llama 4 as wrapped
    for Llama Guard 4)."""


# Families whose prompt attention is not causal throughout (see the module docstring).
_PROMPT_BLOCKS: dict[str, Literal["images", "prompt"]] = {"gemma3": "images", "paligemma": "prompt"}


def detect_quirks(model: Any) -> Quirks:
    params = inspect.signature(model.forward).parameters
    pixel_param = params.get("pixel_values")
    needs_pixels = pixel_param is not None and pixel_param.default is inspect.Parameter.empty
    return Quirks(
        requires_image=needs_pixels,
        step_through_language_model=needs_pixels and hasattr(model, "language_model"),
        prompt_blocks=_PROMPT_BLOCKS.get(getattr(model.config, "model_type", ""), "none"),
        # what `generate` asks (`_supports_mm_encoder_outputs`) before it pre-encodes images
        image_inputs="features" if "mm_encoder_outputs" in params else "pixels",
    )


def _find_cache(output: Any) -> Any:
    cache = output.get("cache") if hasattr(output, "get") else None
    if cache is None:
        # composite models keep the language model's own output nested
        inner = getattr(output, "language_model_outputs", None)
        cache = getattr(inner, "cache", None) if inner is not None else None
    if cache is None:
        raise RuntimeError(
            f"{type(output).__name__} carries no KV cache; SafeCoDe needs a model that returns one with use_cache=True."
        )
    return cache


# --------------------------------------------------------------------------- prompts to prefill


@dataclass(frozen=True, eq=False)
class PromptRow:
    """One row to prefill: the processor's output for one prompt with one view of its images."""

    inputs: Mapping[str, Any]
    """The processor's output for this row alone (batch dimension 1), on the CPU."""
    image_key: str | None
    """A digest of everything the vision tower reads for this row (pixels, sizes, grids, and the
    Q-Former's prompt for InstructBLIP); None without images. Equal keys, equal image features."""

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


# Per-token tensors that only a prefill from raw pixel inputs reads, with the sequence in dim 1:
# Mllama's cross-attention mask `(B, L, images, tiles)` (which tiles each token attends to).
_PIXEL_TOKEN_KEYS = ("cross_attention_mask",)


def _image_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What the vision tower reads: everything but the token ids and the per-token tensors."""
    return {k: v for k, v in inputs.items() if k not in (*PER_TOKEN_KEYS, *_PIXEL_TOKEN_KEYS, "input_ids", "labels")}


def _stack_signature(inputs: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """What must agree for rows' raw image inputs to stack into one batch: their keys and each
    tensor's shape past the first dimension (images or tiles); None when something is not a tensor."""
    images = _image_inputs(inputs)
    if not all(isinstance(v, torch.Tensor) for v in images.values()):
        return None
    return tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in images.items()))


def _stack_images(rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Rows' raw image inputs as one batch: each tensor concatenated along its first dimension
    (per row for Mllama's `(1, images, tiles, ...)`, per tile for Llama 4's `(tiles, ...)`)."""
    images = [_image_inputs(r) for r in rows]
    return {key: torch.cat([i[key] for i in images]) for key in images[0]}


def image_key(inputs: Mapping[str, Any]) -> str | None:
    """A digest of a row's image inputs, or None for a text-only row."""
    images = _image_inputs(inputs)
    if not any(k.startswith("pixel_values") for k in images):
        return None
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(images):
        value = images[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def encode_rows(processor: Any, prompt: str, views: list[list[Image.Image]]) -> list[PromptRow]:
    """`encode_views`, one processor call per view: each row's images can then be encoded (and reused) alone.

    Both views of a request have images of equal sizes, so their rows have one length.
    """
    batches = [encode_views(processor, prompt, [view]) for view in views] if views and views[0] else [
        encode_views(processor, prompt, [])
    ]
    return [PromptRow(dict(b), image_key(b)) for b in batches]


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """One row's image features as its language model reads them: one vector per placeholder token."""

    pooled: torch.Tensor
    """`(N, D)`: the features of the row's N image placeholder tokens, in order."""
    deepstack: tuple[torch.Tensor, ...]
    """`(N, D)` per layer that adds features again deeper in (Qwen3-VL's deepstack); else empty."""
    output_type: type
    """The model's own container class for pre-encoded features."""
    as_tensor: bool
    """Whether the model takes the features as a `(1, N, D)` tensor (else as a one-item list)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pooled, *self.deepstack))


class FeatureCache:
    """Image features by `PromptRow.image_key`, least recently used out first, within a byte budget.

    Only the scheduler's worker thread touches it.
    """

    def __init__(self, budget_mb: float) -> None:
        self.budget = int(budget_mb * 2**20)
        self.nbytes = 0
        self._items: collections.OrderedDict[str, ImageFeatures] = collections.OrderedDict()

    def get(self, key: str) -> ImageFeatures | None:
        features = self._items.get(key)
        if features is not None:
            self._items.move_to_end(key)
        return features

    def put(self, key: str, features: ImageFeatures) -> None:
        if features.nbytes > self.budget:
            return
        old = self._items.pop(key, None)
        self.nbytes += features.nbytes - (old.nbytes if old is not None else 0)
        self._items[key] = features
        while self.nbytes > self.budget:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes


def _flat(features: Any) -> torch.Tensor:
    """Per-image features (a tensor `(images, tokens, D)` or a sequence of `(tokens, D)`) as `(N, D)`."""
    parts = [features] if isinstance(features, torch.Tensor) else list(features)
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in parts])


def _left_pad(t: torch.Tensor, n: int, value: int = 0) -> torch.Tensor:
    if n <= 0:
        return t
    return torch.cat([t.new_full((*t.shape[:-1], n), value), t], dim=-1)


def _left_pad_seq(t: torch.Tensor, n: int) -> torch.Tensor:
    """Left-pad dim 1 (the sequence of a `(B, L, ...)` tensor) with `n` zeros."""
    return torch.cat([t.new_zeros((t.shape[0], n, *t.shape[2:])), t], dim=1) if n > 0 else t


def _to_model(inputs: Mapping[str, Any], model: Any) -> dict[str, Any]:
    out = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}
    # pixel values follow the model's dtype (e.g. bf16); integer tensors stay as they are
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            out[key] = value.to(model.dtype)
    return out


def attention_span(text_config: Any) -> float:
    """Context length at which a prompt token's attention costs as much as its weights do.

    Per token and layer, the weights cost about `2 * (4 * H**2 + 3 * H * I)` flops
    (attention projections and a gated MLP, hidden size H, MLP size I) and the
    attention `4 * H` flops per earlier token: equal at `2 * H + 1.5 * I` tokens
    (about 2k for the CPU bench preset, 25k for the LLaVA-1.5-7B shape).
    """
    hidden = int(text_config.hidden_size)
    inner = int(getattr(text_config, "intermediate_size", None) or 4 * hidden)
    return 2.0 * hidden + 1.5 * inner


def chunk_columns(budget: float, rows: int, done: int, span: float) -> int:
    """Columns of the next chunk: `rows * cols * (1 + (done + cols / 2) / span) <= budget`, at least one.

    `budget` counts prompt tokens at the start of a prompt; later chunks attend to more
    context and cost more per token, so they are narrower (the roots of that quadratic).
    """
    a = rows / (2 * span)
    b = rows * (1 + done / span)
    root = 2 * budget / (b + math.sqrt(b * b + 4 * a * budget))  # the stable form of (-b + sqrt(...)) / 2a
    return max(1, int(root + 1e-6))


def chunk_cost(rows: int, start: int, end: int, span: float) -> float:
    """`chunk_columns`'s cost of prefilling columns `[start, end)` of `rows` rows, in prompt tokens."""
    cols = end - start
    return rows * cols * (1 + (start + cols / 2) / span)


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """`[start, end)` column ranges where a 1-D bool tensor is True."""
    edges = torch.diff(torch.nn.functional.pad(flags.int(), (1, 1))).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2], strict=True))


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping `[start, end)` ranges merged into disjoint ones, in order."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class Prefill:
    """Prompt rows prefilled together: left-padded to one length, run a chunk of columns at a time.

    Each row's positions are computed as if it were alone (M-RoPE included)
    and padded on the left like every per-token tensor, so each row is
    computed as it would be alone, up to the batched kernels' summation order.
    `done` columns have been prefilled; `Decoder.run_chunk` advances it and
    `Decoder.finish` turns the finished prefill into a `RowBatch` and the last
    position's logits.

    Rows with images but no features (a model that takes raw pixel inputs
    only, `Quirks.image_inputs`) carry the processor's image inputs instead,
    stacked, and are prefilled whole in one chunk: every row of such a
    prefill must have them, stackable (`Decoder.can_share`).
    """

    def __init__(self, decoder: Decoder, rows: list[PromptRow], features: list[ImageFeatures | None]) -> None:
        model = decoder.model
        self.rows = list(rows)
        self.features = list(features)
        raw = [r.image_key is not None and f is None for r, f in zip(rows, features, strict=True)]
        if any(raw) and not decoder.can_share(rows, features):
            raise ValueError(
                "These prompts cannot be prefilled together: their raw image inputs do not stack "
                "(rows without images, or images of other counts or sizes). Prefill them apart."
            )
        self.raw = any(raw)
        """Whether the rows carry raw pixel inputs (prefilled whole) instead of image features."""
        self.length = max(r.length for r in rows)
        token = decoder.image_token_id
        pad = 0 if token != 0 else 1  # a padding id that is never taken for an image placeholder
        ids, per_token, positions = [], {}, []
        for row in rows:
            inputs = _to_model(row.inputs, model)
            n = self.length - row.length
            ids.append(_left_pad(inputs["input_ids"], n, pad))
            for key in PER_TOKEN_KEYS:
                if isinstance(inputs.get(key), torch.Tensor):
                    per_token.setdefault(key, []).append((inputs[key], n))
            if decoder.has_position_ids and not decoder.quirks.step_through_language_model:
                inputs.pop("labels", None)
                row_ids = inputs.pop("input_ids")
                positions.append(_left_pad(model._prepare_position_ids_for_generation(row_ids, inputs), n))
        self.ids = torch.cat(ids)
        self.per_token: dict[str, torch.Tensor] = {}
        for key, parts in per_token.items():
            if len(parts) < len(rows):  # e.g. mm_token_type_ids of a text-only row beside rows with images
                parts = [(row.inputs.get(key, torch.zeros_like(row.inputs["input_ids"])).to(self.ids.device),
                          self.length - row.length) for row in rows]
            self.per_token[key] = torch.cat([_left_pad(t, n) for t, n in parts])
        # raw inputs' per-token tensors have the sequence in dim 1; they are read by the prefill only
        self.pixel_tokens: dict[str, torch.Tensor] = {
            key: torch.cat([_left_pad_seq(r.inputs[key], self.length - r.length) for r in rows]).to(self.ids.device)
            for key in _PIXEL_TOKEN_KEYS
            if self.raw and isinstance(rows[0].inputs.get(key), torch.Tensor)
        }
        mask = self.per_token["attention_mask"]
        if decoder.quirks.step_through_language_model:
            self.positions: torch.Tensor | None = (mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            self.positions = torch.cat(positions, dim=1 if positions[0].ndim == 3 else 0) if positions else None
        self.placeholders = self.ids == token if token is not None else torch.zeros_like(self.ids, dtype=torch.bool)
        self._blocks_kind = decoder.quirks.prompt_blocks
        self.span = decoder.attention_span
        self._index_features()
        self.done = 0
        self.cache: Any = None
        self.output: Any = None

    def _index_features(self) -> None:
        if self.raw:  # the forward reads the pixels and finds its placeholders itself
            self.feature_index, self.pooled, self.deepstack = None, None, ()
            self.spans = [(0, self.length)]
            return
        # the feature row of each placeholder, counted over (row, column) as the model consumes them
        self.feature_index = self.placeholders.flatten().cumsum(0).view_as(self.ids) - 1
        present = [f for f in self.features if f is not None]
        self.pooled = torch.cat([f.pooled for f in present]) if present else None
        self.deepstack = (
            tuple(torch.cat(layer) for layer in zip(*(f.deepstack for f in present), strict=True))
            if present and present[0].deepstack else ()
        )
        count = int(self.placeholders.sum())
        if count != (0 if self.pooled is None else self.pooled.shape[0]):
            raise ValueError(
                f"The prompts hold {count} image placeholder tokens but their images give "
                f"{0 if self.pooled is None else self.pooled.shape[0]} feature vectors."
            )
        self.spans = self._blocks(self._blocks_kind)

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order), whatever has been prefilled so far."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.ids.device)
        self.rows = [self.rows[i] for i in keep]
        self.features = [self.features[i] for i in keep]
        self.ids = self.ids.index_select(0, idx)
        self.placeholders = self.placeholders.index_select(0, idx)
        self.per_token = {k: v.index_select(0, idx) for k, v in self.per_token.items()}
        self.pixel_tokens = {k: v.index_select(0, idx) for k, v in self.pixel_tokens.items()}
        if self.positions is not None:
            self.positions = self.positions.index_select(1 if self.positions.ndim == 3 else 0, idx)
        if self.cache is not None:
            self.cache.batch_select_indices(idx)
        self._index_features()

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def finished(self) -> bool:
        return self.done >= self.length

    def _blocks(self, kind: str) -> list[tuple[int, int]]:
        """Column ranges a chunk boundary must not cut (attention both ways inside)."""
        if kind == "prompt":
            return [(0, self.length)]
        if kind == "images":
            return _union([span for row in self.placeholders for span in _runs(row)])
        return []

    def next_end(self, budget: int | None) -> int:
        """Where the next chunk ends: about `budget` prompt tokens' worth of work over all rows
        (`chunk_columns`; None: the rest of the prompt). It depends on these rows alone."""
        if budget is None:
            return self.length
        end = min(self.length, self.done + chunk_columns(budget, self.size, self.done, self.span))
        for start, stop in self.spans:
            if start < end < stop:  # never cut a block: end before it, or after it if it starts the chunk
                end = start if start > self.done else stop
                break
        return end

    def pixel_inputs(self) -> dict[str, torch.Tensor]:
        """The raw image inputs of every row, stacked (empty unless `raw`)."""
        return _stack_images([r.inputs for r in self.rows]) if self.raw else {}

    def chunk_features(self, start: int, end: int) -> ImageFeatures | None:
        """The features of the placeholders in columns `[start, end)`, in the order the model reads them."""
        if self.pooled is None:
            return None
        inside = self.placeholders[:, start:end]
        if not bool(inside.any()):
            return None
        index = self.feature_index[:, start:end][inside]
        first = next(f for f in self.features if f is not None)
        return ImageFeatures(
            self.pooled[index], tuple(layer[index] for layer in self.deepstack), first.output_type, first.as_tensor
        )


# --------------------------------------------------------------------------- the decoder


class Decoder:
    """Prefill prompts and step a `RowBatch`, through the model's own generation hooks.

    `encode_images(row)` runs the vision tower for one row; `run_chunk(prefill,
    end)` prefills the next columns of a `Prefill`; `finish(prefill)` returns
    its `RowBatch` and the last position's logits `(B, V)`; `prefill(rows)`
    does all of it at once. `step(rows, tokens)` feeds one token per row
    (`tokens` shape `(B,)`) and returns the next logits `(B, V)`.

    `pre_encodes` says whether images are pre-encoded: `Quirks.image_inputs`
    from the forward's signature, and turned off by the first encoding when
    the model's encoder output has no pooled features to feed by placeholder
    (Llama 4's `pooler_output` is None: its forward projects
    `last_hidden_state` itself). Then `encode_images` returns None and the
    rows' raw pixel inputs are prefilled instead.
    """

    def __init__(self, model: Any, quirks: Quirks) -> None:
        self.model = model
        self.quirks = quirks
        self.stepper = model.language_model if quirks.step_through_language_model else model
        params = inspect.signature(model.forward).parameters
        self.has_position_ids = "position_ids" in params
        self._has_logits_to_keep = "logits_to_keep" in params
        self._stepper_keeps_logits = "logits_to_keep" in inspect.signature(self.stepper.forward).parameters
        config = model.config
        self.attention_span = attention_span(config.get_text_config())
        token = getattr(config, "image_token_id", None)
        self.image_token_id: int | None = token if isinstance(token, int) else getattr(config, "image_token_index", None)
        self.pre_encodes = quirks.image_inputs == "features"

    @torch.inference_mode()
    def encode_images(self, row: PromptRow) -> ImageFeatures | None:
        """Run the vision tower (and projector) on one row's images; None for a text-only row, and
        for every row of a model that takes raw pixel inputs (`pre_encodes`)."""
        if row.image_key is None or not self.pre_encodes:
            return None
        inputs = _to_model(_image_inputs(row.inputs), self.model)
        # the model's own pre-encoding hook, as `generate` calls it: it knows each family's arguments
        encoded = self.model._prepare_multimodal_encoder_kwargs_for_generation(inputs)["mm_encoder_outputs"]["image"]
        pooled = encoded.pooler_output
        if pooled is None:
            # the probe: nothing per placeholder to feed chunk by chunk (see the class docstring)
            self.pre_encodes = False
            return None
        deep = getattr(encoded, "deepstack_features", None) or ()
        return ImageFeatures(
            _flat(pooled), tuple(_flat(layer) for layer in deep), type(encoded), isinstance(pooled, torch.Tensor)
        )

    def can_share(self, rows: list[PromptRow], features: list[ImageFeatures | None]) -> bool:
        """Whether `rows` (with their images' `features`) can be prefilled together, left-padded.

        Always when their images are pre-encoded or they have none. Rows with raw pixel inputs
        only beside each other, and only when those stack (`_stack_signature`: the same keys,
        and shapes equal but in the first dimension), as in the padded batch the processor
        makes of several prompts, which these models (Mllama, Llama 4) prefill exactly as each
        alone; a text-only row lacks those inputs altogether, so it is prefilled apart.
        """
        raw = [r for r, f in zip(rows, features, strict=True) if r.image_key is not None and f is None]
        if not raw:
            return True
        signatures = {_stack_signature(r.inputs) for r in rows}
        return len(raw) == len(rows) and len(signatures) == 1 and None not in signatures

    @torch.inference_mode()
    def run_chunk(self, prefill: Prefill, end: int) -> None:
        """Prefill columns `[prefill.done, end)` of every row, onto the cache of the columns before."""
        start = prefill.done
        mask = prefill.per_token["attention_mask"][:, :end]
        features = prefill.chunk_features(start, end)
        ids = prefill.ids[:, start:end]
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": True}
        if prefill.cache is not None:
            kwargs["cache"] = prefill.cache
        if prefill.positions is not None and (self.has_position_ids or not prefill.raw):
            kwargs["position_ids"] = prefill.positions[..., start:end]
        if prefill.raw:
            # raw inputs go with the whole prompt (`Prefill.spans`) through the top-level forward,
            # as `generate` prefills without pre-encoding
            kwargs.update(_to_model(prefill.pixel_inputs(), self.model))
            kwargs.update({k: v[:, :end] for k, v in prefill.pixel_tokens.items()})
        if self.quirks.step_through_language_model and not prefill.raw:
            # the language model alone: features scattered into the embeddings, as the top-level forward does
            embeds = self.stepper.get_input_embeddings()(ids)
            if features is not None:
                inside = prefill.placeholders[:, start:end].unsqueeze(-1)
                embeds = embeds.masked_scatter(inside, features.pooled.to(embeds.dtype))
            if self._stepper_keeps_logits:
                kwargs["logits_to_keep"] = 1
            out = self.stepper(inputs_embeds=embeds, return_dict=True, **kwargs)
        else:
            for key in ("token_type_ids", "mm_token_type_ids"):
                if key in prefill.per_token:
                    # up to the chunk's end, as generate's chunked prefill: masks read them by position
                    kwargs[key] = prefill.per_token[key][:, :end]
            if features is not None:
                kwargs["mm_encoder_outputs"] = {"image": _model_features(features)}
            if self._has_logits_to_keep:
                # only the last position's logits are needed: skip the (B, L, V) tensor, as generate does
                kwargs["logits_to_keep"] = 1
            inputs = self.model.prepare_inputs_for_generation(ids, is_first_iteration=True, **kwargs)
            out = self.model(**inputs, return_dict=True)
        if prefill.cache is None:
            prefill.cache = _find_cache(out)
            give_room(prefill.cache)
        prefill.done = end
        prefill.output = out

    @torch.inference_mode()
    def finish(self, prefill: Prefill) -> tuple[RowBatch, torch.Tensor]:
        """The prefilled rows as a `RowBatch` ready for decode steps, and their last-position logits `(B, V)`."""
        assert prefill.finished and prefill.output is not None
        kwargs: dict[str, Any] = {**prefill.per_token, "cache": prefill.cache, "use_cache": True}
        if prefill.positions is not None and not self.quirks.step_through_language_model:
            kwargs["position_ids"] = prefill.positions
        # passed by name: Mllama's override makes `is_encoder_decoder` a required argument
        kwargs = self.model._update_model_kwargs_for_generation(prefill.output, kwargs, is_encoder_decoder=False)
        kwargs["cache"] = prefill.cache
        kept = {k: v for k, v in kwargs.items() if k in (*PER_TOKEN_KEYS, "cache", "use_cache")}
        if self.quirks.step_through_language_model:
            # The language model alone sees no images: mm type ids mean nothing to it, and its
            # positions must be counted per row (a left-padded row starts later than column 0).
            mask = kept["attention_mask"]
            kept = {k: v for k, v in kept.items() if k in ("attention_mask", "cache", "use_cache")}
            kept["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return RowBatch(kept), prefill.output.logits[:, -1, :]

    def prefill(self, rows: list[PromptRow], chunk_tokens: int | None = None) -> tuple[RowBatch, torch.Tensor]:
        """Encode the rows' images and prefill them together, in chunks of about `chunk_tokens` (None: whole)."""
        prefill = Prefill(self, rows, [self.encode_images(r) for r in rows])
        while not prefill.finished:
            self.run_chunk(prefill, prefill.next_end(chunk_tokens))
        return self.finish(prefill)

    @torch.inference_mode()
    def step(self, rows: RowBatch, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.to(rows.kwargs["attention_mask"].device).view(-1, 1)
        inputs = self.stepper.prepare_inputs_for_generation(ids, next_sequence_length=1, **rows.kwargs)
        out = self.stepper(**inputs, return_dict=True)
        rows.kwargs = self.stepper._update_model_kwargs_for_generation(out, rows.kwargs, is_encoder_decoder=False)
        return out.logits[:, -1, :]


def _model_features(features: ImageFeatures) -> Any:
    """Features in the family's own container, as `generate`'s chunked prefill slices them."""

    def wrap(t: torch.Tensor) -> Any:
        return t.unsqueeze(0) if features.as_tensor else [t]

    fields: dict[str, Any] = {"pooler_output": wrap(features.pooled)}
    if features.deepstack:
        fields["deepstack_features"] = [wrap(t) for t in features.deepstack]
    return features.output_type(**fields)


def encode_views(
    processor: Any,
    prompt: str,
    views: list[list[Image.Image]],
) -> dict[str, Any]:
    """Run the processor on one prompt per view; `views[i]` are the images of row i.

    With no images the batch has one text-only row. Both views of a request
    have images of equal sizes, so rows tokenize to the same length. Images go
    as one list per prompt (`[[a, b], [a', b']]`), the form every family takes.
    """
    texts = [prompt] * max(len(views), 1)
    try:
        if not views or not views[0]:
            return processor(text=texts, return_tensors="pt")
        return processor(images=views, text=texts, return_tensors="pt", padding=True)
    except (ValueError, TypeError) as exc:
        # e.g. PaliGemma refuses text-only prompts; say so as a typed input error
        raise UnsupportedContentError(
            f"{type(processor).__name__} rejected this request: {exc} "
            "Check that the model supports this kind of input (some need an image in every request)."
        ) from exc
