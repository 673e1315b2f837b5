"""Helpers shared by the test tiers: message builders, test doubles, real servers, NeMo setup, tool scripting.

Test modules import them as `support.<module>` (pytest puts `tests/` on the path,
see `pythonpath` in pyproject.toml). Fixtures that every tier uses live in
`tests/conftest.py`; fixtures of one tier in that tier's conftest.py.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (examples/, integrations/, README.md)."""
