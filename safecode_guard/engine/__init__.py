"""The engine: `SafeCoDe` around one loaded model, and the loop that owns the model.

- `core`: `SafeCoDe`, the readable single-request path (checks, images, the
  prompt, the judge, a `DecodeJob` for the scheduler);
- `results`: the `SafeCoDeStream` a caller reads and the `SafeCoDeResult` it ends with;
- `scheduler` + `jobs`: the worker thread that batches every request on a model
  (continuous batching, chunked prefill), and the request as it holds it;
  `registry`: one scheduler per loaded model, every worker stopped at exit;
- `decoding`: one request's token choice (contrast, refusal modulation,
  sampling) and its incremental text;
- `adapters`: where model families differ (prompt rows, image features,
  prefill, decode steps); `kv_rows`: the batched KV-cache rows;
- `loading`: model sources checked, weights loaded once per process;
  `demo_model`: the embedded demo model, built on first use.

The names below load on first use: the scheduler and adapters are imported by
guard judges, which the engine itself imports, so this package's own import
must not pull in `core`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import SafeCoDe
    from .results import SafeCoDeResult, SafeCoDeStream, Usage

__all__ = ["SafeCoDe", "SafeCoDeResult", "SafeCoDeStream", "Usage"]

_LAZY = {"SafeCoDe": "core", "SafeCoDeResult": "results", "SafeCoDeStream": "results", "Usage": "results"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safecode_guard.engine' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
