"""Moved to `safecode_guard.images.budget`; this path keeps working."""

from .images.budget import (
    DEFAULT_DECODE_BUDGET_MB,
    DEFAULT_DECODE_WAIT_S,
    DecodeMemoryBudget,
    decode_memory_budget,
    set_decode_memory_budget,
)

__all__ = [
    "DEFAULT_DECODE_BUDGET_MB",
    "DEFAULT_DECODE_WAIT_S",
    "DecodeMemoryBudget",
    "decode_memory_budget",
    "set_decode_memory_budget",
]
