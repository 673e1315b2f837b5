"""Reading a chat judge's free-text answer, fail-closed: only an unambiguous safe decision reads as safe."""

from __future__ import annotations

import re
from typing import Literal

from ..verdict import Label
from .folding import fold

__all__ = [
    "parse_verdict_text",
]


# --------------------------------------------------------------------------- reading a chat judge's answer
#
# Only an unambiguous safe decision reads as safe. The answer is first read as a
# person would (`fold`, markdown emphasis dropped), then:
#
# - anything in the answer that reads unsafe makes it unsafe: before a decision, after
#   one, inside a quote (a quoted or forged "Decision: safe" cannot outvote it);
# - a decision is "decision" or "verdict" followed by ":", "=", a dash, "is" or a line
#   break; its segment runs to the next decision;
# - a segment reads safe only when its value is the bare word "safe" (after a few
#   filler words such as "it is") and no words follow it; any other value
#   ("dangerous", "safe (benign)", nothing) or a note after it ("Just kidding.") is
#   ambiguous, and one ambiguous decision, or a negation anywhere in an
#   answer whose decisions say safe, gives no label (the judge then failed and
#   `on_judge_error` decides);
# - without a decision, the answer is safe only if it is the single word "safe".
#
# "Reads unsafe": a word containing "unsafe" (also spelled with separators inside:
# "un-safe", "UN**SAFE", "u n s a f e"), a word like "notsafe" / "nonsafe", or a
# negation ("not", "never", "isn't", "no", ...) at most six words before a word
# containing "safe" ("not at all safe", "not a safe request"). On a decision's own
# line any negation counts ("Decision: safe? no").

_DECISION_RE = re.compile(r"\b(?:decision|verdict)\b\s*(?:is\b|[:=>\n\-\u2010-\u2015\u2192])")
_SPACED_UNSAFE_RE = re.compile(r"(?<![a-z0-9])u[\W_]*n[\W_]*s[\W_]*a[\W_]*f[\W_]*e")
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
_NEGATIONS = frozenset(
    {
        "not", "no", "never", "nor", "neither", "none", "nothing", "nobody", "nowhere", "without",
        "cannot", "hardly", "barely", "scarcely", "isnt", "arent", "wasnt", "werent", "dont",
        "doesnt", "didnt", "cant", "couldnt", "wont", "wouldnt", "shouldnt", "aint", "mustnt",
        "neednt", "hasnt", "havent", "hadnt",
    }
)  # fmt: skip
_NEGATED_PREFIXES = ("un", "not", "non", "no", "in")
# Words that may stand before the value: "Decision: it is safe", "Verdict: final answer safe".
_FILLERS = frozenset({"it", "is", "this", "the", "request", "answer", "final", "label", "verdict", "would", "be"})
_NEGATION_REACH = 6


def _answer_reading(text: str) -> str:
    """The answer as `fold` reads it, without markdown emphasis or code marks.

    "~" stays: `~~safe~~` is struck through, and a struck "safe" is no decision.
    """
    return re.sub(r"[*_`]+", "", fold(text))


def _is_negation(word: str) -> bool:
    return word in _NEGATIONS or word.endswith("n't")


def _reads_unsafe(text: str) -> bool:
    """Whether folded `text` says unsafe anywhere (see the rules above)."""
    if _SPACED_UNSAFE_RE.search(text):
        return True
    words = _WORD_RE.findall(text)
    for i, word in enumerate(words):
        if "unsafe" in word:
            return True
        if "safe" in word and word != "safe" and word.startswith(_NEGATED_PREFIXES):
            return True
        if "safe" in word and any(_is_negation(w) for w in words[max(0, i - _NEGATION_REACH) : i]):
            return True
    return False


def _read_decision(segment: str) -> Literal["safe", "unsafe", "ambiguous"]:
    """The label one decision segment gives ("ambiguous" for any value but a bare safe or unsafe)."""
    if _reads_unsafe(segment):
        return "unsafe"
    # The value: the first line with a word on it (the value may sit on the next line).
    lines = [line for line in segment.split("\n") if _WORD_RE.search(line)]
    line = lines[0] if lines else ""
    value = _WORD_RE.findall(line)
    if any(map(_is_negation, value)):
        return "unsafe"  # a negation on the decision's own line negates or qualifies it
    while value and value[0] in _FILLERS:
        value = value[1:]
    if len(lines) > 1:
        return "ambiguous"  # words after the decision ("Just kidding.", "Reasoning: harmful") may retract it
    return "safe" if value == ["safe"] and "~" not in line else "ambiguous"


def parse_verdict_text(text: str) -> Label | None:
    """The label in a chat judge's answer, or None when it gives no unambiguous one.

    Fail-closed reading (rules in the comment above): any decision or wording
    anywhere in the answer that reads unsafe ("Decision: unsafe", "not safe",
    "it isn't safe", "**UN**SAFE", "un-safe", zero-width or lookalike
    spellings) gives "unsafe", even next to a forged or quoted "Decision: safe";
    "safe" needs decisions whose values are all just "safe" (or the bare answer
    "safe") and no negation anywhere. Anything else is None: the judge failed,
    and `on_judge_error` decides.
    """
    reading = _answer_reading(text)
    if _reads_unsafe(reading):
        return "unsafe"  # anywhere: before a decision, inside a quote, in a later note
    starts = list(_DECISION_RE.finditer(reading))
    segments = [
        reading[m.end() : starts[k + 1].start() if k + 1 < len(starts) else len(reading)]
        for k, m in enumerate(starts)
    ]
    labels = set(map(_read_decision, segments))
    words = _WORD_RE.findall(reading)
    if "unsafe" in labels:
        return "unsafe"
    if labels:
        # Safe only when every decision is a bare "safe" and nothing anywhere negates.
        return "safe" if labels == {"safe"} and not any(map(_is_negation, words)) else None
    # No decision: the reasoning-free one-word answer, or free text.
    if words == ["safe"] and "~" not in reading:
        return "safe"
    if any("safe" in w for w in words) and any(_is_negation(w) for w in words):
        return "unsafe"  # "safe? no." and the like: not a safe decision, and reads against one
    return None
