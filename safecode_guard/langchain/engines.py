"""The engines one `ChatSafeCoDe` (and its copies) has built on shared weights, each built once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine.core import SafeCoDe

# --------------------------------------------------------------------------- engine cache


class Engines:
    """What one `ChatSafeCoDe` (and its copies on the same model) has built, and the lock that
    makes each build happen once.

    Weights come from `loading.shared_model`, shared by every chat model of the
    process that names the same weights, or from the objects `from_model`
    wrapped. An engine is a light view of those weights with one set of
    per-request settings (judge, `safecode`, `policy`): copies made with
    `model_copy` that change them get their own engine on the same weights,
    kept here (up to `MAX_VARIANTS`, least recently used first out), so
    switching between an instance and its copies never reloads anything. One
    more slot holds the engine of the most recent per-call `model=` override
    (one, so that overrides cannot pile up weights). Also held here: a
    processor loaded alone for token counting, and whether each model's
    template takes tools. A pickle carries none of it: after unpickling, the
    model is loaded again from `model` (a path or hub id) on first use, or
    found in memory if another chat model holds it.
    """

    MAX_VARIANTS = 8

    def __init__(self, hf_objects: tuple[Any, Any] | None = None) -> None:
        self.lock = threading.Lock()
        # (model, weights identity, settings identity) -> (what keeps the weights and judge alive, engine)
        self.variants: OrderedDict[tuple[Any, ...], tuple[Any, SafeCoDe]] = OrderedDict()
        self.override: tuple[tuple[Any, ...], Any, SafeCoDe] | None = None
        self.hf_objects = hf_objects
        self.processor: tuple[str, Any] | None = None  # (model, processor) loaded for counting only
        self.tool_calling: dict[str, bool] = {}  # model -> whether its chat template takes tools

    @property
    def slots(self) -> dict[tuple[Any, ...], SafeCoDe]:
        """Every engine held, by its key (for tests and introspection)."""
        held = {key: engine for key, (_, engine) in self.variants.items()}
        if self.override is not None:
            held[self.override[0]] = self.override[2]
        return held

    def get(self, override: bool, key: tuple[Any, ...], build: Callable[[], tuple[Any, SafeCoDe]]) -> SafeCoDe:
        with self.lock:
            if override:
                if self.override is None or self.override[0] != key:
                    self.override = None  # the previous override's weights may go before the next load
                    self.override = (key, *build())
                return self.override[2]
            held = self.variants.get(key)
            if held is not None:
                self.variants.move_to_end(key)
                return held[1]
            if any(k[:2] != key[:2] for k in self.variants):
                self.variants.clear()  # `model` was reassigned: the old weights are not kept alive here
            self.variants[key] = build()
            while len(self.variants) > self.MAX_VARIANTS:
                self.variants.popitem(last=False)
            return self.variants[key][1]

    def loaded(self, model: str) -> SafeCoDe | None:
        """An engine on `model`'s weights if one is built (never loads)."""
        with self.lock:
            return next((engine for key, (_, engine) in self.variants.items() if key[0] == model), None)

    def __deepcopy__(self, memo: dict[int, Any]) -> Engines:
        return self

    def __copy__(self) -> Engines:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Loaded weights never travel in a pickle (torch modules with transformers' hooks do
        # not even pickle); the unpickled chat model loads `model` again on first use.
        return (Engines, ())


