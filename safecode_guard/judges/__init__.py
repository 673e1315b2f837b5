"""Judges: who decides whether a request is safe in its visual context.

A judge is one small seam (SPEC section 3): it takes a `JudgeRequest` (the
request's images, the latest user text, the whole conversation) and returns a
`Verdict`, a label ("safe" / "unsafe") or an unsafe probability. The decoding
loop never sees a judge; it only sees the `Verdict` that `run_judge` makes.

Input flow::

    messages --JudgeRequest.from_messages--> JudgeRequest
             --run_judge(judge, request, config)--> Verdict

`run_judge` owns everything that is the same for every judge: the timeout
(on a shared, capped set of worker threads), re-validating what the judge
returned, applying the threshold, timing, and the `on_judge_error` policy
(fail closed, fail open, or raise `JudgeError`).

What the built-in judges see (`judge_view`) is what the model reads: the
engine makes the `JudgeRequest` from the same `messages.Conversation` it
renders the model's prompt from (`JudgeRequest.from_conversation`). Every
image of the conversation, the latest user request (its text parts joined as
the model's chat template joins them) and, when the conversation holds more
than that one user turn, a transcript of every turn (system message, earlier
user and assistant turns, tool calls and tool results, a forced answer
opening) with each image marked where it was sent; and the tools (names,
descriptions, parameter schemas) and response schema the model is given.
Harm can sit in any of them ("Continue." after a harmful system message, a
tool described as doing harm). All of it has a character budget
(`max_transcript_chars`, default `DEFAULT_MAX_TRANSCRIPT_CHARS`); past it the
judge sees the most recent part, is told so, and its verdict says
`transcript_truncated=True`, and `run_judge` does not let such a verdict be
"safe" unless `SafeCoDeConfig.on_judge_truncation` opts in.

Judges here:

- `SelfJudge`: the local model judges itself through two engine methods.
  `direct` scores one forward pass of a verdict prompt (softmax over the
  "safe"/"unsafe" label tokens, no free text to parse); `caption` (the
  paper's recipe) captions the images first and then scores a text-only
  verdict prompt over request + caption.
- `ChatModelJudge`: any LangChain chat model; caption, then a verdict that
  ends with `Decision: safe|unsafe`, parsed by `parse_verdict_text` (only an
  unambiguous safe decision reads as safe).
- `ChatSafeCoDeJudge`: a `ChatSafeCoDe` given as a judge judges with its own
  model's self judge (unsteered), loaded on first use.
- `FixedJudge`, `CallableJudge`: pinned policies and your own functions.
- `GuardJudge` (`guard`, prompts in `guard_prompts`): a dedicated guard model (Llama Guard 3 Vision,
  Llama Guard 4, ShieldGemma 2) in its published prompt format, with hazard
  categories (`Verdict.categories`).

`make_judge` turns a spec string (`"self"`, `"self:caption"`, `"fixed:safe"`,
`"chat:<provider>:<model>"`, `"guard:<folder or hub id>"`) or an object into a judge.

User text, captions, tools and transcript turns placed in a judge prompt are
neutralised (`delimit`), so they cannot open or close the prompt's own tags.

Modules: `request` (`JudgeRequest`, `Judge`, the hand-off), `runner`
(`run_judge`: threads, timeouts, policies), `view` (what a judge sees, within
its budget), `prompts` (the judges' own prompts), `folding` (text as a judge
reads it, tag neutralising), `parsing` (a chat judge's answer), `scoring`
(P(unsafe) from logits), `builtin` / `self_judge` / `chat` / `guard` (the
judges), `factory` (`make_judge`). None of them imports LangChain: a chat
judge uses the chat model it is given.
"""

from __future__ import annotations

from ..errors import InvalidVerdictError, JudgeBusyError
from ..messages import Turn
from ..verdict import validated_verdict
from .builtin import CallableJudge, FixedJudge
from .chat import ChatModelJudge
from .factory import make_judge
from .folding import PROMPT_TAGS, delimit, neutralise_tags
from .guard import GuardJudge
from .parsing import parse_verdict_text
from .prompts import CAPTION_PROMPT, verdict_prompt
from .request import (
    Judge,
    JudgeRequest,
    JudgeResult,
    hand_off_verdict,
    handed_off_verdict,
    judge_name,
    request_fingerprint,
)
from .runner import DEFAULT_MAX_JUDGE_THREADS, judge_error_code, run_judge, set_max_judge_threads
from .scoring import SAFE_VARIANTS, UNSAFE_VARIANTS, label_token_ids, unsafe_probability
from .self_judge import ChatSafeCoDeJudge, SelfJudge
from .view import DEFAULT_MAX_TRANSCRIPT_CHARS, JudgeView, check_transcript_budget, judge_view

__all__ = [
    "CAPTION_PROMPT",
    "DEFAULT_MAX_JUDGE_THREADS",
    "DEFAULT_MAX_TRANSCRIPT_CHARS",
    "PROMPT_TAGS",
    "SAFE_VARIANTS",
    "UNSAFE_VARIANTS",
    "CallableJudge",
    "ChatModelJudge",
    "ChatSafeCoDeJudge",
    "FixedJudge",
    "GuardJudge",
    "InvalidVerdictError",
    "Judge",
    "JudgeBusyError",
    "JudgeRequest",
    "JudgeResult",
    "JudgeView",
    "SelfJudge",
    "Turn",
    "check_transcript_budget",
    "delimit",
    "hand_off_verdict",
    "handed_off_verdict",
    "judge_error_code",
    "judge_name",
    "judge_view",
    "label_token_ids",
    "make_judge",
    "neutralise_tags",
    "parse_verdict_text",
    "request_fingerprint",
    "run_judge",
    "set_max_judge_threads",
    "unsafe_probability",
    "validated_verdict",
    "verdict_prompt",
]

