"""Rows of many requests in one KV cache: right-aligned, left-padded, realigned as they come and go.

Rows of different requests live in one `RowBatch`, right-aligned: every row's
last token is in the last column, and shorter rows are padded on the left
(attention mask 0, zero keys and values), the layout `generate` uses for a
batch of prompts of different lengths. Every per-row quantity (positions,
M-RoPE sections, token types) is kept per row in the generation kwargs, so a
row decodes exactly as it would alone, up to floating-point reordering in
batched kernels. `merge` pads two batches to one length and stacks them;
`RowBatch.select` keeps some rows; `RowBatch.trim` drops left columns that
have become padding in every row. Full-attention layers become
`GrowingLayer`s, which write each decode step in place.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "PER_TOKEN_KEYS",
    "GrowingLayer",
    "RowBatch",
    "give_room",
    "kv_bytes_per_token",
    "merge",
    "unbatchable_reason",
]

# Keys that grow with the sequence (or describe it) and survive the prefill;
# everything else the processor returned (pixels, grids, sizes) is prefill-only.
PER_TOKEN_KEYS = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", ()))


class GrowingLayer:
    """A full-attention cache layer with room to grow, so a decode step writes in place.

    transformers' `DynamicLayer` concatenates the whole cache with the new
    token's keys at every step (O(length) copies per layer per step, a third
    of a small model's step time on CPU). This layer keeps `(B, H, capacity, D)`
    buffers with spare room and writes new positions into them; `keys` and
    `values` are views of the first `length` positions, so attention reads
    exactly what `DynamicLayer` would hold. Assigning `keys` / `values`
    (padding, trimming, merging) replaces the buffers.
    """

    ROOM = 64
    """Positions of spare room allocated beyond the current length (at least a quarter more)."""

    def __new__(cls, layer: Any) -> Any:
        from transformers.cache_utils import DynamicLayer

        # a subclass made once, so that isinstance checks in transformers still see a DynamicLayer
        global _GROWING
        if _GROWING is None:
            _GROWING = type("GrowingDynamicLayer", (_GrowingMixin, DynamicLayer), {"__doc__": cls.__doc__})
        grown = object.__new__(_GROWING)
        DynamicLayer.__init__(grown)
        grown.device = layer.keys.device
        grown.is_initialized = True
        grown.keys, grown.values = layer.keys, layer.values
        return grown


class _GrowingMixin:
    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    _klen = 0
    _vlen = 0

    @staticmethod
    def _room_for(t: torch.Tensor, need: int = 0) -> torch.Tensor:
        length = t.shape[-2]
        room = max(GrowingLayer.ROOM, length // 4, need)
        buf = t.new_empty((*t.shape[:-2], length + room, t.shape[-1]))
        buf[..., :length, :] = t
        return buf

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._kbuf is None else self._kbuf[..., : self._klen, :]

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._kbuf, self._klen = (None, 0) if t is None else (self._room_for(t), t.shape[-2])

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._vbuf is None else self._vbuf[..., : self._vlen, :]

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._vbuf, self._vlen = (None, 0) if t is None else (self._room_for(t), t.shape[-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self._klen + n > self._kbuf.shape[-2]:  # new buffers with room (a prefill chunk may need much)
            self._kbuf = self._room_for(self.keys, n)
            self._vbuf = self._room_for(self.values, n)
        self._kbuf[..., self._klen : self._klen + n, :] = key_states
        self._vbuf[..., self._vlen : self._vlen + n, :] = value_states
        self._klen += n
        self._vlen += n
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._klen

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._kbuf is not None:
            self._kbuf = self._kbuf[indices, ...]
            self._vbuf = self._vbuf[indices, ...]


_GROWING: type | None = None


def give_room(cache: Any) -> None:
    """Swap the full-attention `DynamicLayer`s of a fresh prefill cache for `GrowingLayer`s."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and _initialized(layer):
            layers[i] = GrowingLayer(layer)


def unbatchable_reason(cache: Any) -> str | None:
    """Why rows of this cache cannot be realigned and merged, or None when they can.

    Full-attention (`DynamicLayer`) and sliding-window (`DynamicSlidingWindowLayer`)
    layers are plain `(B, H, L, D)` tensors we can pad and stack; recurrent,
    static, quantized or offloaded layers are not.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = _layers(cache)
    if not layers:
        return f"its KV cache ({type(cache).__name__}) has no layers we can read"
    for layer in layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer, _GROWING):
            return f"its KV cache has {type(layer).__name__} layers, which cannot be realigned row by row"
    return None


def _is_sliding(layer: Any) -> bool:
    return bool(getattr(layer, "is_sliding", False))


def _stored(layer: Any, length: int) -> int:
    """How many positions a layer keeps for a sequence of `length` tokens."""
    return min(length, layer.sliding_window - 1) if _is_sliding(layer) else length


def _total(layer: Any) -> int:
    """Tokens the layer has seen (a sliding layer keeps only the last ones)."""
    return int(layer.cumulative_length) if _is_sliding(layer) else int(layer.keys.shape[-2])


def _initialized(layer: Any) -> bool:
    return bool(layer.is_initialized) and isinstance(layer.keys, torch.Tensor) and layer.keys.numel() > 0


def _pad_layer(layer: Any, n: int) -> None:
    """Left-pad a layer's keys and values with `n` positions of zeros."""
    if not _initialized(layer):
        return
    total = _total(layer) + n
    grow = _stored(layer, total) - layer.keys.shape[-2]
    if grow > 0:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            setattr(layer, name, torch.cat([t.new_zeros((*t.shape[:-2], grow, t.shape[-1])), t], dim=-2))
    if _is_sliding(layer):
        layer.cumulative_length = total


def _trim_layer(layer: Any, n: int) -> None:
    """Drop the `n` oldest positions (padding in every row) from a layer."""
    if not _initialized(layer):
        return
    total = _total(layer) - n
    keep = _stored(layer, total)
    if layer.keys.shape[-2] > keep:
        layer.keys = layer.keys[..., layer.keys.shape[-2] - keep :, :]
        layer.values = layer.values[..., layer.values.shape[-2] - keep :, :]
    if _is_sliding(layer):
        layer.cumulative_length = total


def _batch_dim(key: str, value: torch.Tensor) -> int:
    # M-RoPE position ids are (3 or 4, B, L): batch is dim 1 there, as in generate
    return 1 if key == "position_ids" and value.ndim == 3 else 0


class RowBatch:
    """Rows sharing one KV cache, right-aligned to `length` columns (shorter rows left-padded).

    `kwargs` are the generation kwargs that follow the rows from step to step:
    the per-token tensors of `PER_TOKEN_KEYS`, the `cache` and `use_cache`.
    """

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs

    @property
    def cache(self) -> Any:
        return self.kwargs["cache"]

    @property
    def size(self) -> int:
        return int(self.kwargs["attention_mask"].shape[0])

    @property
    def length(self) -> int:
        return int(self.kwargs["attention_mask"].shape[-1])

    def pad_to(self, length: int) -> None:
        """Left-pad every row to `length` columns."""
        old = self.length
        if length <= old:
            return
        n = length - old
        for key in PER_TOKEN_KEYS:
            value = self.kwargs.get(key)
            if isinstance(value, torch.Tensor):
                # Padded columns are masked out, so only the attention mask's zeros matter;
                # zeros elsewhere keep dtypes and mean "text token" to the type ids.
                self.kwargs[key] = torch.cat([value.new_zeros((*value.shape[:-1], n)), value], dim=-1)
        for layer in _layers(self.cache):
            _pad_layer(layer, n)

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order): cache, masks, positions, token types."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.kwargs["attention_mask"].device)
        self.cache.batch_select_indices(idx)
        for key in PER_TOKEN_KEYS:
            value = self.kwargs.get(key)
            if isinstance(value, torch.Tensor):
                self.kwargs[key] = value.index_select(_batch_dim(key, value), idx.to(value.device))

    def trim(self) -> int:
        """Drop leading columns that are padding in every row; returns how many were dropped."""
        mask = self.kwargs["attention_mask"]
        used = mask.bool().any(dim=0).nonzero()
        if used.numel() == 0:
            return 0
        k = int(used[0])
        if k == 0:
            return 0
        for key in PER_TOKEN_KEYS:
            value = self.kwargs.get(key)
            if isinstance(value, torch.Tensor):
                self.kwargs[key] = value[..., k:]
        for layer in _layers(self.cache):
            _trim_layer(layer, k)
        return k

    def kv_bytes(self) -> int:
        """Bytes the cache holds now."""
        total = 0
        for layer in _layers(self.cache):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def merge(a: RowBatch, b: RowBatch) -> RowBatch:
    """`a`'s rows then `b`'s, padded to one length, in `a`'s cache object (`b` is consumed)."""
    length = max(a.length, b.length)
    a.pad_to(length)
    b.pad_to(length)
    for key in PER_TOKEN_KEYS:
        va, vb = a.kwargs.get(key), b.kwargs.get(key)
        if va is None and vb is None:
            continue
        if va is None or vb is None:
            # e.g. a text-only request without mm_token_type_ids beside one with images
            present = va if va is not None else vb
            if key == "position_ids":
                raise RuntimeError("cannot merge rows with and without position ids")
            filler = present.new_zeros(((b if va is None else a).size, present.shape[-1]))
            va, vb = (filler, vb) if va is None else (va, filler)
        a.kwargs[key] = torch.cat([va, vb], dim=_batch_dim(key, va))
    for la, lb in zip(_layers(a.cache), _layers(b.cache), strict=True):
        if not (_initialized(la) and _initialized(lb)):
            # a layer that holds nothing (KV sharing) holds nothing in either batch
            continue
        la.keys = torch.cat([la.keys, lb.keys], dim=0)
        la.values = torch.cat([la.values, lb.values], dim=0)
    return a


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one token of one row adds to a full-attention KV cache (all layers, keys and values)."""
    text = model.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.tensor([], dtype=model.dtype).element_size()
    return int(text.num_hidden_layers * 2 * heads * head_dim * element)
