"""One scheduler per loaded model, and every worker stopped before the interpreter exits.

Every engine on a model (several `SafeCoDe`s with other settings, a guard
judge's own model) shares that model's `Scheduler`, so all of its requests
batch together under one set of limits.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Any

from ..config import BatchingConfig
from ..errors import SafeCoDeInputError
from .adapters import Quirks
from .scheduler import WORKERS, Scheduler

__all__ = ["scheduler_for", "schedulers"]

# id(model) -> its scheduler, held weakly: the engines on a model hold its scheduler, and the
# scheduler holds the model, so once the last engine is gone (and the worker has exited) the
# weights are freed. (Keyed by the model itself, the scheduler's own reference to its key
# would keep every model alive for good.) An id cannot be reused while its entry lives,
# since the entry's scheduler holds the model.
_SCHEDULERS: weakref.WeakValueDictionary[int, Scheduler] = weakref.WeakValueDictionary()
_SCHEDULERS_GUARD = threading.Lock()


@atexit.register
def _close_all() -> None:
    # A daemon worker killed inside a torch kernel at interpreter exit aborts the process
    # ("terminate called without an active exception"): stop every worker first. A worker that
    # has just left its loop may hold the last reference to its scheduler, and so free the model
    # as its thread ends (its scheduler already gone from _SCHEDULERS): wait for those too.
    for scheduler in schedulers():
        scheduler.close()
    for worker in list(WORKERS):
        if worker is not threading.current_thread():
            worker.join(10.0)


def schedulers() -> list[Scheduler]:
    """The schedulers of the models loaded now (metrics and tests read their `stats`)."""
    with _SCHEDULERS_GUARD:
        return list(_SCHEDULERS.values())


def scheduler_for(model: Any, quirks: Quirks, settings: BatchingConfig | None = None) -> Scheduler:
    """The scheduler that owns `model` (made on first use; every engine on the model shares it).

    `settings` apply when the scheduler is made; later engines may pass None or
    the same settings, and anything else is a typed error (one model, one set of limits).
    """
    with _SCHEDULERS_GUARD:
        scheduler = _SCHEDULERS.get(id(model))
        if scheduler is None or scheduler.model is not model:
            scheduler = _SCHEDULERS[id(model)] = Scheduler(model, quirks, settings)
        elif settings is not None and settings != scheduler.settings:
            raise SafeCoDeInputError(
                f"This model already has a scheduler with {scheduler.settings!r}; an engine asked for "
                f"{settings!r}. One loaded model has one set of batching limits: pass the same "
                "BatchingConfig (or none) to every engine on it, or load the model twice."
            )
        return scheduler
