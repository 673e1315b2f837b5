"""What the server answers where OpenAI's API has a convention: error codes, the `model` name, media types.

OpenAI (and vLLM) answer a request they cannot use with HTTP 400 and an
`invalid_request_error` whose `param` names the field and whose `code` says
what is wrong with it (`unknown_parameter`, `integer_above_max_value`, ...),
so `except openai.BadRequestError` catches every bad request. An unknown
`model` is 404 `model_not_found`; a body that is not `application/json` is
415 (a web page can POST `text/plain` to a local server without a CORS
preflight, so nothing but JSON is ever read).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from ..errors import SafeCoDeInputError
from ..sampling import openai_code

__all__ = ["check_content_type", "check_model", "input_error_code", "validation_error_fields"]

def validation_error_fields(exc: ValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) of a request that failed the schema, as OpenAI words them."""
    errors = exc.errors()
    problems = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"Unrecognized request argument supplied: {where}")
        else:
            problems.append(f"{where}: {err['msg']}")
    if not errors:
        return "The request does not match the schema.", None, "invalid_value"
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return "; ".join(problems), param, openai_code(first["type"], first.get("ctx") or {})


def input_error_code(exc: SafeCoDeInputError) -> str:
    """The `code` of a library input error in an OpenAI error body: the error's own `code`, its class
    (`ImageInputError` -> `image_input`, `InputLimitError` -> `input_limit`), or `invalid_value`."""
    own = getattr(exc, "code", None)
    if isinstance(own, str):
        return own
    if type(exc) is SafeCoDeInputError:
        return "invalid_value"
    name = type(exc).__name__.removesuffix("Error")
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def check_content_type(content_type: str | None) -> str | None:
    """None when `content_type` is JSON; else the message of a 415 answer."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json":
        return None
    shown = media or "none"
    return (
        f"The request body must be JSON with `Content-Type: application/json`; this one's content type is {shown}. "
        "Send the header (OpenAI clients do)."
    )


def check_model(requested: str | None, served: Sequence[str]) -> str | None:
    """None when `requested` names the served model (or is left out); else the message of a 404 answer."""
    if requested is None or requested in served:
        return None
    names = ", ".join(repr(n) for n in served)
    return (
        f"The model `{requested}` does not exist on this server. It serves {names}: send one of those names "
        "(GET /v1/models lists them), or start the server with --served-model-name to add aliases."
    )
