"""Serving safecode-guard over HTTP: an OpenAI-compatible API that returns the verdict with every answer.

    safecode-guard serve --model ./my-vlm --judge self --port 8000

or in Python::

    from safecode_guard.serving import ServerSettings, create_app
    app = create_app(ServerSettings(model="./my-vlm"))   # any ASGI server runs it

Needs the optional extra: `pip install 'safecode-guard[serve]'` (FastAPI,
uvicorn, prometheus-client). `ray_serve` runs the same app on Ray Serve replicas.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as exc:  # the optional extra is missing
    raise ImportError(
        f"safecode_guard.serving needs the `serve` extra ({exc}). Install it with "
        "`pip install 'safecode-guard[serve]'`."
    ) from exc

from .app import ModelHost, create_app, error_response
from .settings import ServerSettings

__all__ = ["ModelHost", "ServerSettings", "create_app", "error_response"]
