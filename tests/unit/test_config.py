"""Settings validate at construction; errors name the field, the value and a fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import safecode_guard
from safecode_guard import DEFAULT_REFUSAL_PHRASES, InputPolicy, SafeCoDeConfig


def test_defaults_are_the_papers():
    cfg = SafeCoDeConfig()
    assert (cfg.alpha, cfg.noise_std, cfg.steered_steps, cfg.lambda_boost, cfg.lambda_supp, cfg.seed) == (
        0.3, 0.1, 5, 1.0, 1.0, 0,
    )
    assert cfg.unsafe_mode == "prefix" and cfg.threshold == 0.5 and cfg.on_judge_error == "unsafe"
    assert cfg.plausibility_beta is None
    assert cfg.refusal_phrases == DEFAULT_REFUSAL_PHRASES
    assert {"I'm sorry", "I cannot", "As an AI"} <= set(cfg.refusal_phrases)


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("alpha", -0.1, "0.3"),
        ("alpha", 11.0, "0.3"),
        ("noise_std", -1.0, "0.1"),
        ("steered_steps", -1, "5"),
        ("steered_steps", 1000, "5"),
        ("lambda_boost", -2.0, "1.0"),
        ("lambda_supp", 1e6, "1.0"),
        ("threshold", 1.5, "0.5"),
        ("seed", -3, "non-negative"),
        ("plausibility_beta", 0.0, "None"),
        ("plausibility_beta", 2.0, "None"),
        ("judge_timeout_s", -1.0, "None"),
        ("refusal_phrases", "I'm sorry", "list"),
        ("refusal_phrases", None, "list"),
        ("refusal_phrases", [], "at least one"),
        ("refusal_phrases", ["ok", "  "], "non-empty"),
    ],
)
def test_bad_values_name_field_value_and_fix(field, value, hint):
    with pytest.raises(ValidationError) as info:
        SafeCoDeConfig(**{field: value})
    message = str(info.value)
    assert field in message and hint in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("field", "value"), [("unsafe_mode", "shout"), ("on_judge_error", "ignore")])
def test_choices_are_checked(field, value):
    with pytest.raises(ValidationError, match=field):
        SafeCoDeConfig(**{field: value})


def test_unknown_fields_are_rejected_not_dropped():
    with pytest.raises(ValidationError, match="alpah"):
        SafeCoDeConfig(alpah=0.5)


def test_config_is_frozen_and_phrases_deduplicated():
    cfg = SafeCoDeConfig(refusal_phrases=["No", "No", "Nope"])
    assert cfg.refusal_phrases == ("No", "Nope")
    with pytest.raises(ValidationError):
        cfg.alpha = 1.0  # type: ignore[misc]


def test_input_policy_bounds():
    assert InputPolicy().allow_image_urls is False and InputPolicy().allow_local_files is False
    with pytest.raises(ValidationError, match="max_images"):
        InputPolicy(max_images=-1)
    with pytest.raises(ValidationError, match="url_timeout_s"):
        InputPolicy(url_timeout_s=0)


def test_public_surface_is_pinned():
    assert sorted(safecode_guard.__all__) == sorted(
        [
            "DEFAULT_REFUSAL_PHRASES", "BatchingConfig", "CallableJudge", "ChatModelJudge", "ChatSafeCoDe",
            "FixedJudge", "GuardJudge", "ImageInputError", "InputLimitError", "InputPolicy", "InvalidVerdictError", "Judge",
            "JudgeBusyError", "JudgeError", "JudgeRequest", "OverloadedError", "RequestCancelledError", "RequestControl", "RequestTimeoutError", "SafeCoDe", "SafeCoDeConfig", "SafeCoDeError", "SafeCoDeInputError", "SafeCoDeResult",
            "SafeCoDeStream", "SelfJudge", "UnsupportedContentError", "UnsupportedModelError", "Usage",
            "Verdict", "__version__", "make_judge",
        ]
    )
    for name in safecode_guard.__all__:
        assert getattr(safecode_guard, name) is not None
