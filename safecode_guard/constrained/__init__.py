"""Constrained decoding: structured output, JSON mode and forced tool calls that always fit their schema.

Flow: a caller (LangChain's `with_structured_output` / `bind_tools`, the
server's `response_format` / `tools`, or `SafeCoDe.generate(constraint=...)`)
describes the answer as a `Constraint` (`grammar.py`: llguidance grammar text,
pure) -> the engine compiles it once per tokenizer (`matcher.GrammarCompiler`,
cached per grammar) before the judge runs, so a schema it cannot compile is a
typed `UnsupportedSchemaError` naming the keyword -> each decode step, the
request's `RowConstraint` masks that row's logits before SafeCoDe's contrast,
refusal modulation and sampling act, so they choose among allowed tokens only
-> the chosen token advances the grammar; a complete grammar ends the answer.
Near the end of its token budget a row closes its answer by the grammar's
shortest completion instead of being cut (`SafeCoDeConfig.close_constrained`,
`matcher.closing_path`). Under `tool_choice="auto"` the grammar
(`auto_call_constraint`) leaves text free and holds only the calls.

An unsafe verdict drops the constraint: the answer is a free-text refusal,
never schema-shaped text (`SafeCoDeResult.constrained` says which happened).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ..errors import UnsupportedSchemaError
from .grammar import (
    JSON_SEPARATORS,
    Constraint,
    auto_call_constraint,
    call_close,
    ended_by_grammar,
    forced_call_constraint,
    json_object_constraint,
    json_schema_constraint,
    tool_call_constraint,
    tool_parameters,
)

# The grammar text is pure; the matcher side needs torch and numpy, so it loads on first use
# (`import safecode_guard.nemo`, which builds constraints for LangChain, stays light).
_LAZY = {"GrammarCompiler", "RowConstraint", "schema_error", "unpack_bitmask"}

__all__ = [
    "JSON_SEPARATORS",
    "Constraint",
    "GrammarCompiler",
    "RowConstraint",
    "UnsupportedSchemaError",
    "auto_call_constraint",
    "available",
    "call_close",
    "ended_by_grammar",
    "forced_call_constraint",
    "json_object_constraint",
    "json_schema_constraint",
    "schema_error",
    "tool_call_constraint",
    "tool_parameters",
    "unpack_bitmask",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(".matcher", __name__), name)
    globals()[name] = value
    return value


def available() -> bool:
    """Whether llguidance (the `constrained` extra) is installed: integrations constrain only then."""
    import importlib.util

    return importlib.util.find_spec("llguidance") is not None
