"""What a built-in judge shows of a request (`judge_view`): request, tools and transcript within a character budget."""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SafeCoDeInputError
from ..messages import Turn, canonical_json
from .folding import PROMPT_TAGS, delimit, neutralise_tags
from .request import JudgeRequest

__all__ = [
    "DEFAULT_MAX_TRANSCRIPT_CHARS",
    "VIEW_LOG",
    "JudgeView",
    "ViewLog",
    "check_transcript_budget",
    "clip",
    "judge_view",
]


# --------------------------------------------------------------------------- what a judge sees

DEFAULT_MAX_TRANSCRIPT_CHARS = 8000
"""Characters of conversation a built-in judge's prompt holds (request and transcript together).

About 2,000-2,700 tokens of English: with one 576-token image and the
~300-token instructions it fits the 4,096-token context of LLaVA-1.5 (the
SPEC's reference shape), and keeps the direct self judge's prompt about the
size of the answer prompt's own prefill. Raise it for long-context models."""

_MIN_TRANSCRIPT_CHARS = 256
# A turn that does not fit whole is still shown clipped when at least this much budget is left.
_MIN_CLIPPED_TURN = 200


def check_transcript_budget(value: Any) -> int:
    """`value` if it is a valid `max_transcript_chars` budget, else `SafeCoDeInputError` naming the rule."""
    if isinstance(value, bool) or not isinstance(value, int) or value < _MIN_TRANSCRIPT_CHARS:
        raise SafeCoDeInputError(
            f"`max_transcript_chars` (={value!r}) must be an integer of at least {_MIN_TRANSCRIPT_CHARS} "
            f"(characters of conversation in the judge's prompt); the default is {DEFAULT_MAX_TRANSCRIPT_CHARS}."
        )
    return value


class ViewLog:
    """What the judge of one `run_judge` call was shown: `truncated` holds the smallest budget
    of a `judge_view` that left something out (None: nothing was left out)."""

    def __init__(self) -> None:
        self.truncated: int | None = None


VIEW_LOG: contextvars.ContextVar[ViewLog | None] = contextvars.ContextVar("safecode_judge_views", default=None)
"""What the judge of the current `run_judge` call was shown (set by `run_judge`; None outside it)."""


@dataclass(frozen=True)
class JudgeView:
    """What a judge prompt shows of a request (see `judge_view`)."""

    request: str
    """Text of the latest user turn (clipped to the budget, with a note, when too long)."""
    transcript: str | None
    """The `<transcript>` block of every turn, or None when the request is one user turn."""
    truncated: bool
    """Whether anything was left out to fit the budget."""
    tools: str | None = None
    """The `<tools>` block: the tool definitions and response schema the model is given (None without)."""


def judge_view(request: JudgeRequest, max_chars: int = DEFAULT_MAX_TRANSCRIPT_CHARS) -> JudgeView:
    """The request text, tools block and transcript block a built-in judge puts in its prompt.

    A lone user turn (or no conversation) gives just its text. Otherwise every
    turn becomes a `<turn n="i" role="...">` block, oldest first: its text
    (runs of text joined as the model's template joins them; neutralised, so
    it cannot open or close a prompt tag), `[image N]` where the N-th image of
    `request.images` was sent, tool calls with their JSON arguments, tool
    results with the tool's name; a forced answer opening (`answer_prefix`)
    is a last assistant turn. The latest user turn's text goes in the request
    block instead, and its turn block points there. The tools the model is
    given and its response schema go in a `<tools>` block, as canonical JSON.

    Budget: at most `max_chars` characters of request text, tools block and
    turn blocks together. The request text comes first (at most half the
    budget when the rest needs room; a longer one keeps its start and end with
    a note of what was cut); then the forced answer opening, the tools block
    (clipped the same way to half of what is left when it does not fit), and
    turns from the newest back, whole while they fit; the first that does not
    fit is clipped the same way when at least `_MIN_CLIPPED_TURN` characters
    are left, and older turns are replaced by one line saying which were left
    out. `truncated` then says so, and a "safe" verdict on such a view is
    refused under the default `on_judge_truncation` (see `run_judge`).
    """
    check_transcript_budget(max_chars)
    view = _render_view(request, max_chars)
    log = VIEW_LOG.get()
    if view.truncated and log is not None:
        log.truncated = max_chars if log.truncated is None else min(log.truncated, max_chars)
    return view


def _render_view(request: JudgeRequest, max_chars: int) -> JudgeView:
    turns = request.turns
    users = [i for i, t in enumerate(turns) if t.role == "user"]
    latest = users[-1] if users else None
    tools = _tools_text(request)
    # Sizes first (neutralising keeps lengths), so only what is shown is neutralised.
    tools_size = len(_tools_block(tools, neutralise=False)) if tools else 0
    if (not turns or (len(turns) == 1 and latest == 0)) and not request.answer_prefix:
        text = turns[0].text if turns else request.request
        clipped, truncated = clip(text.strip(), max(max_chars - tools_size, max_chars // 2))
        tools_block = None
        if tools:
            tools_block, cut = _fit_tools(tools, max_chars - len(clipped))
            truncated = truncated or cut
        return JudgeView(request=clipped, transcript=None, truncated=truncated, tools=tools_block)

    numbers: list[list[int]] = []  # per turn, the 1-based numbers of its images
    count = 0
    for turn in turns:
        numbers.append(list(range(count + 1, count + 1 + len(turn.images))))
        count += len(turn.images)
    blocks = [
        _turn_block(i, t, numbers[i], is_request=(i == latest), neutralise=False) for i, t in enumerate(turns)
    ]
    opening = _opening_block(len(turns), request.answer_prefix, neutralise=False) if request.answer_prefix else ""

    request_text = turns[latest].text.strip() if latest is not None else ""
    context = sum(len(b) for b in blocks) + len(opening) + tools_size
    clipped, truncated = clip(request_text, max(max_chars - context, max_chars // 2))
    remaining = max_chars - len(clipped)
    shown: dict[int, str] = {}
    if latest is not None:  # the pointer to the request block always stays
        shown[latest] = _turn_block(latest, turns[latest], numbers[latest], is_request=True)
        remaining -= len(blocks[latest])
    opening_block = None
    if request.answer_prefix:  # the newest of all: what the model continues from
        limit = None if len(opening) <= remaining else max(remaining // 2, _MIN_CLIPPED_TURN)
        opening_block = _opening_block(len(turns), request.answer_prefix, limit=limit)
        truncated = truncated or limit is not None
        remaining -= len(opening_block)
    tools_block = None
    if tools:
        tools_block, cut = _fit_tools(tools, remaining)
        truncated = truncated or cut
        remaining -= len(tools_block)
    for i in reversed(range(len(turns))):
        if i == latest:
            continue
        if len(blocks[i]) <= remaining:
            shown[i] = _turn_block(i, turns[i], numbers[i])
            remaining -= len(blocks[i])
            continue
        truncated = True
        if remaining >= _MIN_CLIPPED_TURN:
            shown[i] = _turn_block(i, turns[i], numbers[i], limit=remaining)
        break
    hidden = [i for i in range(len(turns)) if i not in shown]
    lines = ["<transcript>"]
    if hidden:
        lines.append(
            f"[turns {_ranges(hidden)} of {len(turns)} are not shown: the conversation is longer "
            f"than the judge's budget of {max_chars} characters]"
        )
    lines.extend(shown[i] for i in sorted(shown))
    if opening_block is not None:
        lines.append(opening_block)
    lines.append("</transcript>")
    return JudgeView(request=clipped, transcript="\n".join(lines), truncated=truncated, tools=tools_block)


def _tools_text(request: JudgeRequest) -> str:
    """The tools and response schema as the judge reads them: one line of canonical JSON each."""
    lines = [f"tool {i + 1}: {canonical_json(tool)}" for i, tool in enumerate(request.tools)]
    if request.response_schema is not None:
        lines.append(f"answer format (JSON schema): {canonical_json(request.response_schema)}")
    return "\n".join(lines)


def _tools_block(text: str, *, neutralise: bool = True) -> str:
    return delimit("tools", text) if neutralise else f"<tools>\n{text}\n</tools>"


def _fit_tools(text: str, room: int) -> tuple[str, bool]:
    """The tools block, whole when it fits in `room` characters, else clipped to half of `room`."""
    overhead = len(_tools_block("", neutralise=False))
    if len(text) + overhead <= room:
        return _tools_block(text), False
    clipped, _ = clip(text, max(room // 2 - overhead, 0))
    return _tools_block(clipped), True


def _opening_block(count: int, prefix: str, *, limit: int | None = None, neutralise: bool = True) -> str:
    """The forced answer opening as the transcript's last turn (the assistant's own words so far)."""
    head = f'<turn n="{count + 1}" role="assistant">\n(the opening the answer is forced to start with)\n'
    tail = "\n</turn>"
    body = prefix
    if limit is not None:
        body, _ = clip(body, max(limit - len(head) - len(tail), 0))
    return head + (neutralise_tags(body, PROMPT_TAGS) if neutralise else body) + tail


def _turn_block(
    index: int,
    turn: Turn,
    numbers: Sequence[int],
    *,
    is_request: bool = False,
    limit: int | None = None,
    neutralise: bool = True,
) -> str:
    """One `<turn>` block; `limit` clips its body so the whole block has at most `limit` characters.

    Neutralising keeps the length, so `neutralise=False` gives the block's size cheaply.
    Call ids are shown too: some templates write them, and a client chooses them.
    """
    pieces: list[str] = []
    if turn.role == "tool":
        pieces.append(f"(result of tool {turn.tool_name or '?'})")
    numbered = iter(numbers)
    for part in turn.parts:
        if isinstance(part, str):
            if not is_request:
                pieces.append(part)
        else:
            pieces.append(f"[image {next(numbered)}]")
    if is_request:
        pieces.append("(the latest request: its text is in the request block below)")
    if turn.tool_call_id:
        pieces.append(f"(answers call id {turn.tool_call_id})")
    for call_id, name, args in turn.tool_calls:
        pieces.append(f"(tool call: {name} {args})" + (f" (call id {call_id})" if call_id else ""))
    head = f'<turn n="{index + 1}" role="{turn.role}">\n'
    tail = "\n</turn>"
    body = "\n".join(pieces)
    if limit is not None:
        body, _ = clip(body, max(limit - len(head) - len(tail), 0))
    return head + (neutralise_tags(body, PROMPT_TAGS) if neutralise else body) + tail


def clip(text: str, limit: int) -> tuple[str, bool]:
    """`text` if it fits in `limit` characters, else its start and end around a note of what was cut."""
    if len(text) <= limit:
        return text, False
    note = f"\n[... {len(text)} characters in all, the middle is not shown ...]\n"
    keep = max(limit - len(note), 0)
    head = (keep + 1) // 2
    return text[:head] + note + text[len(text) - (keep - head) :], True


def _ranges(indices: Sequence[int]) -> str:
    """1-based turn numbers as ranges: [0, 1, 2, 5] -> "1-3, 6"."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and spans[-1][1] == i:
            spans[-1][1] = i + 1
        else:
            spans.append([i + 1, i + 1])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
