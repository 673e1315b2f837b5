"""Guard models as the scene judge: `judge="guard:<local folder or hub id>"`.

A dedicated safety classifier decides, and SafeCoDe shapes the answer under
its verdict. Three families, detected from the checkpoint's config
(`guard_family`):

- Llama Guard 3 Vision (`mllama`, e.g. `meta-llama/Llama-Guard-3-11B-Vision`),
- Llama Guard 4 (`llama4`, e.g. `meta-llama/Llama-Guard-4-12B`),
- ShieldGemma 2 (`shieldgemma2`, e.g. `google/shieldgemma-2-4b-it`).

Input flow::

    JudgeRequest --guard_prompts (the family's published format)--> prompt(s)
                 --the guard's scheduler (batched prefills)--> first-answer-token logits
                 --> Verdict(unsafe_score, categories)

The score is a probability. Llama Guard: P("unsafe") against P("safe") at the
first token of the answer (the labels' first tokens in the guard's own
tokenizer, `judges.label_token_ids`: a label of several tokens is decided by
its first, which no other label shares); when the verdict is unsafe, the
category line that follows "unsafe" is decoded greedily and read
(`guard_prompts.parse_categories`). Llama Guard 3 Vision was trained on one
image per prompt, so a request with several images is judged once per image
(every other part of the prompt the same) and the highest score decides;
Llama Guard 4 reads every image in one prompt. ShieldGemma 2: P("Yes")
against P("No") per image and policy, and for the conversation's text per
policy; the score is the highest, the categories the policies at or over the
threshold.

The guard runs on the same machinery as the answering model: loaded once per
process for its weights and options (`loading.shared_model`; every engine,
chat model, rail and server naming it shares one copy), its prefills queued
on its own scheduler (`registry.scheduler_for`), so concurrent judgements
are prefilled as one batch (Llama Guard 3 Vision's and 4's prompts with
images whole, from raw pixel inputs: `adapters.Quirks.image_inputs`). A padded
batch may move a score in its last float digits, so a prompt whose score is
within `NEAR_THRESHOLD` of the threshold is scored again alone
(`GuardModel.settled_scores`), as the self judge does. It is called through
`run_judge`, so the timeout, `on_judge_error` (fail closed by default) and
`on_judge_truncation` apply. Nothing is downloaded when `HF_HUB_OFFLINE` is
set (`loading.check_model_source`).

Shortcuts, said plainly: the category line is decoded with one prefill of the
whole prompt per token (no KV cache kept between them; the Llama Guard
families' images go through the vision tower in each): it is a few tokens,
and only decoded for unsafe verdicts. transformers 5.24's
`Llama4ForConditionalGeneration.forward` reads a field its language model's
output does not have (`image_outputs`) and fails on every call; a loaded
Llama Guard 4 gets a subclass whose forward runs the same steps without it
(`_Llama4Guard`).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import SafeCoDeConfig
from ..control import RequestControl, current_control
from ..engine.adapters import detect_quirks
from ..engine.loading import (
    LoadedModel,
    ModelNotFoundError,
    check_model_source,
    public_name,
    shared_model,
    weights_key,
)
from ..engine.registry import scheduler_for
from ..engine.scheduler import Scheduler
from ..errors import SafeCoDeInputError, UnsupportedGuardError, UnsupportedModelError
from ..images import image_working_side
from ..prompting import special_strings
from ..verdict import Verdict, label_from_score
from .folding import delimit
from .guard_prompts import (
    GUARD_FAMILIES,
    GuardFamily,
    GuardTurn,
    ShieldGemmaPolicy,
    llama_guard_categories,
    llama_guard_messages,
    llama_guard_turns,
    neutralise_for_guard,
    parse_categories,
    render_llama_guard,
    shieldgemma_image_prompt,
    shieldgemma_policies,
    shieldgemma_text_prompt,
    shown_categories,
)
from .request import JudgeRequest
from .runner import run_judge
from .scoring import label_token_ids, unsafe_probability
from .self_judge import NEAR_THRESHOLD
from .view import DEFAULT_MAX_TRANSCRIPT_CHARS, check_transcript_budget, judge_view

#: The marker strings guard processors carry (Idefics-style guards add a fake image token).
GUARD_MARKERS = ("image_token", "boi_token", "eoi_token", "fake_image_token")


__all__ = [
    "GUARD_SPEC_PREFIX",
    "GuardJudge",
    "GuardModel",
    "UnsupportedGuardError",
    "check_answer",
    "decode_greedy",
    "guard_family",
    "guard_image_side",
    "judge_from_spec",
    "load_guard",
    "load_if_guard",
    "supports_answer_check",
]

GUARD_SPEC_PREFIX = "guard"
"""Judge specs `guard:<local folder or hub id>` name a guard model."""

_FAMILY_LIST = "; ".join(f"{k} = {v}" for k, v in GUARD_FAMILIES.items())


# --------------------------------------------------------------------------- which family


def _config_of(path_or_id: str) -> dict[str, Any]:
    """The checkpoint's `config.json` as a dict, from the disk or the hub cache (nothing else downloaded
    when offline; one small file otherwise, as `check_model_source` already reached the hub)."""
    try:
        source = check_model_source(path_or_id)
    except ModelNotFoundError:
        raise
    except UnsupportedModelError as exc:
        # not an image-text-to-text model at all (a text-only Llama Guard, say): name the guard families
        raise UnsupportedGuardError(
            f"{public_name(path_or_id)!r} cannot be a guard judge: {exc} The guard judge supports {_FAMILY_LIST}."
        ) from exc
    if source.kind == "folder":
        return json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    file = hf_hub_download(source.location, "config.json", local_files_only=source.cached_only)
    return json.loads(Path(file).read_text(encoding="utf-8"))


def guard_family(path_or_id: str) -> GuardFamily:
    """The guard family of a checkpoint, from its config (no weights loaded).

    Raises `UnsupportedGuardError` (naming the supported families) for any
    other model, and `ModelNotFoundError` when it is not there.
    """
    model_type = _config_of(path_or_id).get("model_type")
    if model_type not in GUARD_FAMILIES:
        raise UnsupportedGuardError(
            f"{public_name(path_or_id)!r} is a model of type {model_type!r}, not a guard model this judge "
            f"knows. Supported: {_FAMILY_LIST}. For another model, use it as the main model's own judge "
            "('self') or as a chat judge ('chat:<provider>:<model>')."
        )
    return model_type  # type: ignore[return-value]


# --------------------------------------------------------------------------- Llama 4 forward


def _llama4_guard_class() -> type:
    """`Llama4ForConditionalGeneration` with a forward that does not fail (see the module docstring)."""
    global _LLAMA4_GUARD
    if _LLAMA4_GUARD is not None:
        return _LLAMA4_GUARD
    from transformers import Llama4ForConditionalGeneration
    from transformers.models.llama4.modeling_llama4 import Llama4CausalLMOutputWithPast

    class _Llama4Guard(Llama4ForConditionalGeneration):
        """Llama 4 whose forward merges the image features and runs the language model, as upstream does."""

        def forward(  # type: ignore[override]
            self,
            input_ids: torch.Tensor | None = None,
            pixel_values: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None,
            cache: Any = None,
            inputs_embeds: torch.Tensor | None = None,
            use_cache: bool | None = None,
            logits_to_keep: int | torch.Tensor = 0,
            **kwargs: Any,
        ) -> Any:
            kwargs.pop("return_dict", None)
            kwargs.pop("past_key_values", None)
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                features = self.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
                flat = features.view(-1, features.size(-1))
                projected = self.multi_modal_projector(flat).to(inputs_embeds.device, inputs_embeds.dtype)
                mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=projected)
                inputs_embeds = inputs_embeds.masked_scatter(mask, projected)
            out = self.language_model(
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                return_dict=True,
                **kwargs,
            )
            return Llama4CausalLMOutputWithPast(logits=out.logits, cache=out.cache)

    _LLAMA4_GUARD = _Llama4Guard
    return _Llama4Guard


_LLAMA4_GUARD: type | None = None


def _llama4_forward_broken(model: Any) -> bool:
    """Whether this transformers' Llama 4 forward reads `image_outputs` from an output that lacks it."""
    import inspect

    from transformers import Llama4ForConditionalGeneration

    try:
        source = inspect.getsource(Llama4ForConditionalGeneration.forward)
    except (OSError, TypeError):
        return True
    return "outputs.image_outputs" in source and type(model) is Llama4ForConditionalGeneration


# --------------------------------------------------------------------------- the loaded guard


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _chat_template(processor: Any) -> str | None:
    template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", None), "chat_template", None
    )
    return template if isinstance(template, str) else None


def _first_token_ids(tokenizer: Any, spellings: Sequence[str]) -> tuple[int, ...]:
    ids: list[int] = []
    for spelling in spellings:
        encoded = list(tokenizer.encode(spelling, add_special_tokens=False))
        if encoded and int(encoded[0]) not in ids:
            ids.append(int(encoded[0]))
    return tuple(ids)


class GuardModel:
    """A loaded guard: its generation model, the processor that encodes its prompts, its scheduler.

    One per loaded weights (`load_guard`), shared by every `GuardJudge` on them.
    """

    def __init__(self, family: GuardFamily, loaded: LoadedModel) -> None:
        self.family: GuardFamily = family
        self.loaded = loaded  # holds the shared weights for as long as this guard lives
        processor = loaded.processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = _chat_template(processor)
        self.checkpoint_processor = processor
        if family == "shieldgemma2":
            from transformers import Gemma3Processor

            # ShieldGemma2Processor writes its own prompts and ignores the text it is given; the
            # prompts here are ours, so they are encoded by the Gemma 3 processor it is made of.
            self.model = loaded.model.model
            self.processor = Gemma3Processor(
                image_processor=processor.image_processor,
                tokenizer=self.tokenizer,
                image_seq_length=getattr(processor, "image_seq_length", 256),
            )
            self.image_token = self.tokenizer.boi_token
            self.policy_definitions = dict(getattr(processor, "policy_definitions", None) or {})
            self.yes_ids = _first_token_ids(self.tokenizer, ("Yes",))
            self.no_ids = _first_token_ids(self.tokenizer, ("No",))
            if not self.yes_ids or set(self.yes_ids) & set(self.no_ids):
                raise UnsupportedGuardError(
                    "This ShieldGemma 2 tokenizer has no distinct first tokens for 'Yes' and 'No', so its "
                    "answers cannot be scored. Use the checkpoint's own tokenizer."
                )
        else:
            self.model = loaded.model
            if family == "llama4" and _llama4_forward_broken(self.model):
                self.model.__class__ = _llama4_guard_class()
            self.processor = processor
            self.image_token = getattr(processor, "image_token", None) or "<|image|>"
            self.policy_definitions = {}
            self.safe_ids, self.unsafe_ids = label_token_ids(self.tokenizer)
        self.model.eval()
        self.scheduler: Scheduler = scheduler_for(self.model, detect_quirks(self.model), None)
        self.specials = special_strings(processor, self.tokenizer, GUARD_MARKERS)
        self.stop_ids = frozenset(int(i) for i in (getattr(self.tokenizer, "all_special_ids", None) or []))
        adds_bos = self.tokenizer("x").input_ids[:1] == [self.tokenizer.bos_token_id]
        self.bos = "" if adds_bos or self.tokenizer.bos_token is None else self.tokenizer.bos_token

    # -- running prompts ------------------------------------------------------------------------

    def logits(self, prompt: str, images: Sequence[Image.Image], *, alone: bool = False) -> torch.Tensor:
        """Next-token logits `(V,)` after `prompt`: one prefill on the guard's scheduler (batched with
        concurrent ones; `alone=True` prefills it by itself). Follows the request's control."""
        return self.scheduler.prefill_logits(self.processor, prompt, list(images), alone=alone)

    def many_logits(self, jobs: Sequence[tuple[str, Sequence[Image.Image]]]) -> list[torch.Tensor]:
        """`logits` of several prompts, all queued at once (so the scheduler prefills them together).
        Follows the request's control: once it is cancelled, the prompts not yet prefilled are dropped."""
        if len(jobs) == 1:
            return [self.logits(*jobs[0])]
        control = current_control()
        if control is not None:
            control.check()
        futures = self.scheduler.submit_prefills(self.processor, [(prompt, list(images)) for prompt, images in jobs])
        return [_wait(f, control) for f in futures]

    def settled_scores(
        self,
        jobs: Sequence[tuple[str, Sequence[Image.Image]]],
        scores: Sequence[float],
        threshold: float,
        score: Callable[[torch.Tensor], float],
    ) -> list[float]:
        """`scores` of `jobs`, each within `NEAR_THRESHOLD` of `threshold` recomputed from a prefill of
        its own (`score(logits)`). A padded batch may move a score in its last digits (which prompts
        share a prefill depends on timing and other requests); this close to the threshold that could
        flip a label or a category, so those are scored alone, as the self judge does."""
        return [
            score(self.logits(prompt, images, alone=True)) if abs(s - threshold) < NEAR_THRESHOLD else s
            for (prompt, images), s in zip(jobs, scores, strict=True)
        ]

    # -- prompts --------------------------------------------------------------------------------

    def llama_guard_prompt(self, turns: Sequence[GuardTurn], categories: Mapping[str, str], images: int) -> str:
        """The Llama Guard prompt for `turns`: the checkpoint's own Llama Guard template when it has
        one and it renders what was asked (every category, every image, the conversation), else the
        documented format (`guard_prompts.render_llama_guard`). Ends where the answer starts."""
        shown = shown_categories(categories, images > 0)
        prompt = self._templated(turns, shown, images) if self.template and _is_llama_guard_template(self.template) else None
        if prompt is None:
            prompt = render_llama_guard(
                self.family, turns, shown, images=images, image_token=self.image_token, bos=self.bos
            )
        # the answer's first token must be the label: a template that stops at the assistant
        # header without its blank line would make that line the first token
        return prompt if prompt.endswith("\n\n") else prompt + "\n\n"

    def _templated(self, turns: Sequence[GuardTurn], shown: Mapping[str, str], images: int) -> str | None:
        from jinja2 import TemplateError

        try:
            prompt = self.checkpoint_processor.apply_chat_template(
                llama_guard_messages(turns, images),
                tokenize=False,
                add_generation_prompt=True,
                categories=dict(shown),
                excluded_category_keys=[],
            )
        except (TemplateError, TypeError, ValueError):
            return None
        if not isinstance(prompt, str):
            return None
        complete = (
            all(f"{code}: {text}" in prompt for code, text in shown.items())
            and prompt.count(self.image_token) == images
            and turns[-1].text in prompt
        )
        return prompt if complete else None

    def shieldgemma_prompt(self, policy: ShieldGemmaPolicy) -> str:
        """ShieldGemma 2's prompt for one image and `policy`: the checkpoint's template when it is
        ShieldGemma 2's (and renders the policy), else the documented format."""
        if self.template and "SAFETY_POLICY" in self.template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": policy.image}]}]
            try:
                prompt = self.checkpoint_processor.apply_chat_template(messages, tokenize=False)
            except Exception:  # a template that cannot render it: the documented format below
                prompt = None
            if isinstance(prompt, str) and policy.image in prompt and prompt.count(self.image_token) == 1:
                return prompt
        return self.bos + shieldgemma_image_prompt(policy, self.image_token)


def _is_llama_guard_template(template: str) -> bool:
    return "UNSAFE CONTENT CATEGORIES" in template


def _wait(future: Future[torch.Tensor], control: RequestControl | None) -> torch.Tensor:
    return future.result() if control is None else control.wait_future(future)


_GUARDS: weakref.WeakValueDictionary[Any, GuardModel] = weakref.WeakValueDictionary()
_GUARDS_LOCK = threading.Lock()


def load_guard(path_or_id: str, *, device: str | None = None, dtype: Any = None) -> GuardModel:
    """The guard model of `path_or_id`, loaded once per process for these options.

    `device` (default: "cuda" when available, else "cpu") and `dtype` (default
    "auto": the checkpoint's own, bfloat16 for the published guards) say
    where and how the weights are loaded. Raises `UnsupportedGuardError` for a
    model of another family and `ModelNotFoundError` when it is not there.
    """
    family = guard_family(path_or_id)
    auto_class = "AutoModelForImageClassification" if family == "shieldgemma2" else "AutoModelForImageTextToText"
    device = device or _default_device()
    dtype = "auto" if dtype is None else dtype
    key = weights_key(path_or_id, device=device, dtype=dtype, auto_class=auto_class)
    with _GUARDS_LOCK:
        guard = _GUARDS.get(key)
    if guard is not None:
        return guard
    loaded = shared_model(path_or_id, device=device, dtype=dtype, auto_class=auto_class)
    with _GUARDS_LOCK:
        guard = _GUARDS.get(key)
        if guard is None or guard.loaded is not loaded:
            guard = GuardModel(family, loaded)
            _GUARDS[key] = guard
        return guard


# --------------------------------------------------------------------------- decoding a category line

_CATEGORY_CHARS = frozenset("Ss0123456789, ")


def decode_greedy(
    step: Callable[[str], torch.Tensor],
    tokenizer: Any,
    prompt: str,
    *,
    max_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    allowed: frozenset[str] | None = _CATEGORY_CHARS,
) -> str:
    """Greedy text after `prompt`, one `step(prompt + text) -> (V,) logits` per token.

    Stops at a token of `stop_ids`, a line break, `max_tokens` tokens, or (with
    `allowed`) a character no category line holds.
    """
    text = ""
    for _ in range(max_tokens):
        token = int(torch.argmax(step(prompt + text)).item())
        if token in stop_ids:
            break
        piece = tokenizer.decode([token])
        if "\n" in piece:
            text += piece.split("\n", 1)[0]
            break
        text += piece
        if allowed is not None and not set(piece) <= allowed:
            break
    return text


# --------------------------------------------------------------------------- the judge


class GuardJudge:
    """A guard model as the scene judge (see the module docstring).

    - `path_or_id`: a local folder or hub id of Llama Guard 3 Vision, Llama
      Guard 4 or ShieldGemma 2 (the family is read from its config).
    - `device`, `dtype`: where the guard runs (default: "cuda" when available,
      else "cpu"; the checkpoint's dtype). Independent of the answering model's.
    - `categories`, `custom_categories` (Llama Guard): the codes to judge
      (default all, S1-S14; S14 only for prompts without images) and codes of
      your own (`{"S15": "Dangerous Scenes. ..."}`).
    - `policies`, `custom_policies` (ShieldGemma 2): the policies to judge
      (default the checkpoint's: dangerous, sexual, violence) and policies of
      your own (`{"weapons": "No Weapons: ..."}`).
    - `max_transcript_chars`: the conversation's character budget, as for the
      other judges.

    Loaded on first use (`load()`; a `SafeCoDe` engine loads it when built, so
    loading never counts against `judge_timeout_s`), once per process for its
    weights and options. `judge_answer(request, answer)` classifies an answer
    (Llama Guard's `Agent` role; ShieldGemma's response prompt).
    """

    def __init__(
        self,
        path_or_id: str,
        *,
        device: str | None = None,
        dtype: Any = None,
        categories: Sequence[str] | None = None,
        custom_categories: Mapping[str, str] | None = None,
        policies: Sequence[str] | None = None,
        custom_policies: Mapping[str, str] | None = None,
        max_transcript_chars: int = DEFAULT_MAX_TRANSCRIPT_CHARS,
        name: str | None = None,
    ) -> None:
        if not isinstance(path_or_id, str) or not path_or_id.strip():
            raise SafeCoDeInputError(
                f"A guard judge needs the guard model's local folder or hub id, got {path_or_id!r}; e.g. "
                "'guard:meta-llama/Llama-Guard-3-11B-Vision'."
            )
        if device is not None and not isinstance(device, str):
            device = str(device)
        self.path = path_or_id.strip()
        self.device = device
        self.dtype = dtype
        self.categories = llama_guard_categories(categories, custom_categories)
        self._policy_options = (None if policies is None else list(policies), dict(custom_policies or {}))
        # custom policies are checked now; selected names at load, against the checkpoint's own policies too
        shieldgemma_policies(None, self._policy_options[1])
        self.max_transcript_chars = check_transcript_budget(max_transcript_chars)
        self.name = name or f"{GUARD_SPEC_PREFIX}:{public_name(self.path)}"  # verdicts travel: never a local path
        self._guard: GuardModel | None = None
        self._policies: list[ShieldGemmaPolicy] | None = None
        self._lock = threading.Lock()

    @property
    def cache_key(self) -> str:
        """What decides this judge's verdicts (the weights, dtype and prompt options), as a digest:
        LangChain's cache may keep answers a guard judge decided (`langchain.cache.judge_fingerprint`)."""
        import hashlib

        described = json.dumps(
            [weights_key(self.path, dtype=self.dtype).location, str(self.dtype), self.categories,
             self._policy_options, self.max_transcript_chars],
            sort_keys=True, default=str,
        )
        return f"{self.name}:{hashlib.sha256(described.encode()).hexdigest()[:16]}"

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> GuardModel:
        """Load the guard (once per process for its weights and options) and return it."""
        with self._lock:
            if self._guard is None:
                guard = load_guard(self.path, device=self.device, dtype=self.dtype)
                if guard.family == "shieldgemma2":
                    self._policies = shieldgemma_policies(*self._policy_options, definitions=guard.policy_definitions)
                self._guard = guard
            return self._guard

    @property
    def family(self) -> GuardFamily:
        return self.load().family

    # -- judging --------------------------------------------------------------------------------

    def __call__(self, request: JudgeRequest) -> Verdict:
        return self._judge(request, None)

    def judge_answer(self, request: JudgeRequest, answer: str) -> Verdict:
        """The guard's verdict on `answer` to `request` (response classification)."""
        if not isinstance(answer, str):
            raise SafeCoDeInputError(f"`answer` must be the answer's text (a str), got a {type(answer).__name__}.")
        return self._judge(request, answer)

    def _judge(self, request: JudgeRequest, answer: str | None) -> Verdict:
        guard = self.load()
        # run_judge calls this in a worker thread, where the caller's grad mode does not apply
        with torch.inference_mode():
            if guard.family == "shieldgemma2":
                score, categories, truncated = self._shieldgemma(guard, request, answer)
            else:
                score, categories, truncated = self._llama_guard(guard, request, answer)
        label = label_from_score(score, request.threshold)
        return Verdict(
            label=label,
            unsafe_score=score,
            categories=categories if label == "unsafe" else [],
            judge=self.name,
            transcript_truncated=truncated,
        )

    def _llama_guard(
        self, guard: GuardModel, request: JudgeRequest, answer: str | None
    ) -> tuple[float, list[str], bool]:
        turns, truncated = llama_guard_turns(request, self.max_transcript_chars, guard.specials, answer=answer)
        images = list(request.images)  # an answer is judged with the images it answers about
        # Llama Guard 3 Vision reads one image per prompt: one prompt per image, the highest score decides
        per_prompt = [[img] for img in images] if guard.family == "mllama" and len(images) > 1 else [images]
        jobs = [(guard.llama_guard_prompt(turns, self.categories, len(imgs)), imgs) for imgs in per_prompt]

        def p_unsafe(logits: torch.Tensor) -> float:
            return unsafe_probability(logits, guard.safe_ids, guard.unsafe_ids)

        scores = guard.settled_scores(jobs, [p_unsafe(x) for x in guard.many_logits(jobs)], request.threshold, p_unsafe)
        best = max(range(len(scores)), key=scores.__getitem__)
        score = scores[best]
        prompt, imgs = jobs[best]
        categories: list[str] = []
        if score >= request.threshold:
            known = list(shown_categories(self.categories, bool(imgs)))
            line = decode_greedy(
                lambda text: guard.logits(text, imgs),
                guard.tokenizer,
                prompt + "unsafe\n",
                max_tokens=4 * len(known) + 2,
                stop_ids=guard.stop_ids,
            )
            categories = parse_categories(line, known)
        return score, categories, truncated

    def _shieldgemma(
        self, guard: GuardModel, request: JudgeRequest, answer: str | None
    ) -> tuple[float, list[str], bool]:
        assert self._policies is not None
        view = judge_view(request, self.max_transcript_chars)
        if view.transcript is None and view.tools is None:
            conversation = view.request or "(no text)"
        else:
            conversation = "\n\n".join(
                b for b in (view.tools, view.transcript, delimit("request", view.request or "(no text)")) if b
            )
        conversation = neutralise_for_guard(conversation, guard.specials)
        reply = None if answer is None else neutralise_for_guard(answer, guard.specials)
        jobs: list[tuple[str, str, Sequence[Image.Image]]] = []
        if answer is None:
            for image in request.images:
                jobs.extend((p.name, guard.shieldgemma_prompt(p), [image]) for p in self._policies)
        jobs.extend((p.name, guard.bos + shieldgemma_text_prompt(p, conversation, reply), []) for p in self._policies)
        prompts = [(prompt, images) for _, prompt, images in jobs]

        def p_yes(logits: torch.Tensor) -> float:
            return unsafe_probability(logits, guard.no_ids, guard.yes_ids)  # "Yes": the policy is violated

        scores = guard.settled_scores(prompts, [p_yes(x) for x in guard.many_logits(prompts)], request.threshold, p_yes)
        by_policy: dict[str, float] = {}
        for (name, _, _), p in zip(jobs, scores, strict=True):
            by_policy[name] = max(p, by_policy.get(name, 0.0))
        score = max(by_policy.values())
        categories = [name for name, p in by_policy.items() if p >= request.threshold]
        return score, categories, view.truncated

    def __repr__(self) -> str:
        loaded = self._guard.family if self._guard is not None else "not loaded"
        return f"GuardJudge({public_name(self.path)!r}, {loaded})"


# --------------------------------------------------------------------------- the answer check


def load_if_guard(judge: Any) -> Any:
    """Load `judge` now when it is a `GuardJudge` (a no-op for every other judge), and return it.

    Callers run this before `run_judge`, so loading the guard's weights never
    counts against `judge_timeout_s`.
    """
    if isinstance(judge, GuardJudge):
        judge.load()
    return judge


def guard_image_side(judge: Any, policy: Any = None) -> int:
    """The longest image side worth keeping for `judge`'s guard processor (0 for any other judge):
    an engine keeps images at least this large, so its guard judge does not see them shrunk to the
    answering model's needs."""
    if not isinstance(judge, GuardJudge):
        return 0
    return image_working_side(judge.load().processor, policy)


def supports_answer_check(judge: Any) -> bool:
    """Whether `judge` can classify a finished answer (guard judges can)."""
    return callable(getattr(judge, "judge_answer", None))


class _AnswerJudge:
    """`judge.judge_answer(request, answer)` as a one-call judge, so `run_judge`'s policies apply."""

    def __init__(self, judge: Any, answer: str) -> None:
        self.judge, self.answer = judge, answer
        self.name = getattr(judge, "name", "guard")

    def __call__(self, request: JudgeRequest) -> Verdict:
        return self.judge.judge_answer(request, self.answer)


def check_answer(
    judge: Any,
    request: JudgeRequest,
    answer: str,
    config: SafeCoDeConfig | None = None,
    *,
    control: RequestControl | None = None,
) -> Verdict:
    """The judge's verdict on a finished `answer` to `request`, through `run_judge` (timeout,
    `on_judge_error`: a failed check is an unsafe answer by default)."""
    if not supports_answer_check(judge):
        raise SafeCoDeInputError(
            f"The judge {getattr(judge, 'name', judge)!r} cannot check answers; the answer check needs a "
            "guard judge ('guard:<path or hub id>'). Turn `check_answer` off, or use a guard judge."
        )
    return run_judge(_AnswerJudge(judge, answer), request, config, control=control)


def judge_from_spec(rest: str, spec: str) -> GuardJudge:
    """`guard:<path>` or `guard:<path>?device=...&dtype=...&categories=S1,S9&policies=dangerous`."""
    path, _, query = rest.partition("?")
    options: dict[str, Any] = {}
    if query:
        from urllib.parse import parse_qsl

        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            if key in ("device", "dtype"):
                options[key] = value
            elif key in ("categories", "policies"):
                options[key] = [v.strip() for v in value.split(",") if v.strip()]
            elif key == "max_transcript_chars" and value.isdigit():
                options[key] = int(value)
            else:
                raise SafeCoDeInputError(
                    f"Unknown option {key!r} in the judge spec {spec!r}. Options: device, dtype, categories "
                    "(Llama Guard codes, comma-separated), policies (ShieldGemma 2 names), max_transcript_chars; "
                    "e.g. 'guard:meta-llama/Llama-Guard-4-12B?device=cuda:1&dtype=bfloat16'."
                )
    if not path.strip():
        raise SafeCoDeInputError(
            f"The judge spec {spec!r} names no guard model. Use 'guard:<local folder or hub id>', e.g. "
            "'guard:meta-llama/Llama-Guard-3-11B-Vision'."
        )
    return GuardJudge(path.strip(), **options)
