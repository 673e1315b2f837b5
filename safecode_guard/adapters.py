"""The one place where model families differ: encoding the two views and stepping the cache.

SafeCoDe's loop needs four things from a model: encode a batch of prompts
with their images, prefill it, feed one more token per row, and drop rows
from the KV cache. Hugging Face models already describe their per-family
needs to `generate` through `prepare_inputs_for_generation`,
`_prepare_position_ids_for_generation` and `_update_model_kwargs_for_generation`
(M-RoPE positions for Qwen-VL, `token_type_ids` for PaliGemma and Gemma3, ...),
so `Decoder` drives those same hooks instead of re-implementing them.

What those hooks do not cover lives in `Quirks`, detected once per model:

- composite models whose top-level forward insists on `pixel_values` on every
  call (InstructBLIP): decode steps go through their `language_model`;
- per-row state kept on the model after a prefill (`rope_deltas` on Qwen-VL),
  which must be sliced with the cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .errors import UnsupportedContentError

__all__ = ["Decoder", "Quirks", "detect_quirks"]

# Keys that grow with the sequence (or describe it) and survive the prefill;
# everything else the processor returned (pixels, grids, sizes) is prefill-only.
_PER_TOKEN_KEYS = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class Quirks:
    requires_image: bool
    """The top-level forward has no text-only path (`pixel_values` is required)."""
    step_through_language_model: bool
    """Decode steps must call `model.language_model` (top-level forward needs pixels)."""


def detect_quirks(model: Any) -> Quirks:
    pixel_param = inspect.signature(model.forward).parameters.get("pixel_values")
    needs_pixels = pixel_param is not None and pixel_param.default is inspect.Parameter.empty
    return Quirks(
        requires_image=needs_pixels,
        step_through_language_model=needs_pixels and hasattr(model, "language_model"),
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


class Decoder:
    """Incremental decoding of a batch of rows sharing one KV cache.

    `prefill(batch)` returns the last-position logits, shape `(B, V)`;
    `step(tokens)` feeds one token per row (`tokens` shape `(B,)`) and
    returns the next logits `(B, V)`; `keep(rows)` drops the other rows
    from the cache and from everything that tracks the batch.
    """

    def __init__(self, model: Any, quirks: Quirks) -> None:
        self.model = model
        self.quirks = quirks
        self.stepper = model.language_model if quirks.step_through_language_model else model
        self.input_ids: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}
        self.last_logits: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, batch: dict[str, Any]) -> torch.Tensor:
        model = self.model
        batch = dict(batch)
        batch.pop("labels", None)  # PaliGemma's processor adds them; inference needs none
        input_ids = batch.pop("input_ids")
        kwargs: dict[str, Any] = {**batch, "use_cache": True}
        params = inspect.signature(model.forward).parameters
        if "position_ids" in params:
            kwargs["position_ids"] = model._prepare_position_ids_for_generation(input_ids, kwargs)
        if "logits_to_keep" in params:
            # only the last position's logits are needed: skip the (B, L, V) tensor, as generate does
            kwargs["logits_to_keep"] = 1
        inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **kwargs)
        out = model(**inputs, return_dict=True)
        kwargs["cache"] = _find_cache(out)
        kwargs = model._update_model_kwargs_for_generation(out, kwargs)
        self.kwargs = {k: v for k, v in kwargs.items() if k in (*_PER_TOKEN_KEYS, "cache", "use_cache")}
        if self.quirks.step_through_language_model:
            # the language model counts positions from its own cache; mm type ids mean nothing to it
            self.kwargs = {k: v for k, v in self.kwargs.items() if k in ("attention_mask", "cache", "use_cache")}
        self.input_ids = input_ids
        self.last_logits = out.logits[:, -1, :]
        return self.last_logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.input_ids is not None, "prefill() first"
        self.input_ids = torch.cat([self.input_ids, tokens.to(self.input_ids.device)[:, None]], dim=-1)
        inputs = self.stepper.prepare_inputs_for_generation(
            self.input_ids, next_sequence_length=1, **self.kwargs
        )
        out = self.stepper(**inputs, return_dict=True)
        self.kwargs = self.stepper._update_model_kwargs_for_generation(out, self.kwargs)
        return out.logits[:, -1, :]

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` of the batch: cache, masks, positions and per-row model state."""
        assert self.input_ids is not None, "prefill() first"
        old = self.input_ids.shape[0]
        idx = torch.tensor(rows, device=self.input_ids.device)
        self.kwargs["cache"].batch_select_indices(idx)
        self.input_ids = self.input_ids[idx]
        for key in _PER_TOKEN_KEYS:
            value = self.kwargs.get(key)
            if isinstance(value, torch.Tensor):
                # M-RoPE position ids are (3 or 4, B, L): batch is dim 1 there, as in generate
                dim = 1 if key == "position_ids" and value.ndim == 3 else 0
                self.kwargs[key] = value.index_select(dim, idx.to(value.device))
        for module in (self.model, getattr(self.model, "model", None)):
            deltas = getattr(module, "rope_deltas", None)
            if isinstance(deltas, torch.Tensor) and deltas.shape[0] == old:
                module.rope_deltas = deltas.index_select(0, idx.to(deltas.device))

    def release(self) -> None:
        """Drop the cache and inputs so their memory goes back before the next request."""
        self.kwargs = {}
        self.input_ids = None
        self.last_logits = None


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
