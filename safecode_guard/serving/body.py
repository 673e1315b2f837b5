"""Reading a JSON request body within a structure budget, off the event loop.

A body within the byte cap can still hold tens of millions of tiny JSON
values (`[{},{},...]`): parsed, each costs a Python object, so a 60 MB body
would become gigabytes. `parse_json_body` counts the values before parsing
(a cheap count of the structural characters `[`, `{` and `,`, and only when
that upper bound is over budget, an exact count outside strings), refuses a
body over `max_items` values, parses it, and refuses one nested deeper than
`max_depth`. The server runs it in a preparation thread, so a large body
never parses on the event loop.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import JSONBudgetError

__all__ = ["DEFAULT_MAX_JSON_DEPTH", "DEFAULT_MAX_JSON_ITEMS", "JSONBudgetError", "json_values_bound", "parse_json_body"]

DEFAULT_MAX_JSON_ITEMS = 100_000
"""Most JSON values (objects, arrays, strings, numbers...) one request body may hold."""
DEFAULT_MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and arrays in one request body."""

# A JSON string, escapes included (the unrolled form: no backtracking, no recursion).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_values_bound(body: bytes) -> int:
    """An upper bound on the JSON values in `body` (object keys not counted): every value but the
    outermost opens a container or follows a `,` or `[`, or is the first value of an object (whose
    `{` is counted), so values <= 1 + (`[` + `{` + `,`); such bytes inside strings only loosen it."""
    return 1 + body.count(b",") + body.count(b"[") + body.count(b"{")


def _values_outside_strings(body: bytes) -> int:
    """`json_values_bound` without the `[`, `{` and `,` inside strings (no copy of the body is made)."""
    inside = 0
    for match in _STRING.finditer(body):
        text = match.group()
        inside += text.count(b",") + text.count(b"[") + text.count(b"{")
    return json_values_bound(body) - inside


def parse_json_body(body: bytes, *, max_items: int = DEFAULT_MAX_JSON_ITEMS, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """The parsed body; `JSONBudgetError` (code `invalid_json`, `too_many_json_values` or
    `nesting_too_deep`) when it is not JSON or is over the budget."""
    if json_values_bound(body) > max_items and _values_outside_strings(body) > max_items:
        raise JSONBudgetError(
            f"The request body holds more than {max_items} JSON values, this server's limit. Send fewer "
            "messages, content parts or tool definitions.",
            "too_many_json_values",
        )
    try:
        payload = json.loads(body)
    except RecursionError as exc:
        raise _too_deep(max_depth) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JSONBudgetError(f"The request body is not valid JSON ({exc}).", "invalid_json") from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts (sys.int_info)
        raise JSONBudgetError(
            f"The request body holds a number Python will not read ({str(exc).split('.')[0]}).", "invalid_json"
        ) from exc
    if _depth(payload, max_depth) > max_depth:
        raise _too_deep(max_depth)
    return payload


def _too_deep(max_depth: int) -> JSONBudgetError:
    return JSONBudgetError(
        f"The request is nested too deeply to read (more than {max_depth} levels). Flatten it (tool "
        "arguments and schemas rarely need more than a few levels).",
        "nesting_too_deep",
    )


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of `value` (a scalar is 0), walked without recursion; stops past `limit`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        if level > deepest:
            deepest = level
            if deepest > limit:
                return deepest
        stack.extend((child, level) for child in children if isinstance(child, (dict, list)))
    return deepest
