"""The scripts in examples/, imported as modules so tests can call their `main(argv)`."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from support import REPO

EXAMPLES = REPO / "examples"


def load_example(name: str) -> ModuleType:
    """`examples/<name>.py` as a fresh module (its `if __name__ == "__main__"` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
