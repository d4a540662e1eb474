"""SIGTERM = preemption notice. Stages decide where it may interrupt them.

Shard stages mark the slow part of a shard (the model work) as *abandonable*: a SIGTERM there
raises `Preempted` at once, the shard's temporary file is removed, and the stage exits non-zero.
Bookkeeping (renaming a shard, updating a manifest) is never interrupted: a SIGTERM that lands
there is held until the bookkeeping is done. Training polls `requested` at step boundaries and
saves a checkpoint before raising.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from pipeline.errors import Preempted


class PreemptionGuard:
    def __init__(self) -> None:
        self.requested = False
        self._abandonable = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.requested = True
        if self._abandonable:
            self._abandonable = False
            raise Preempted()

    def check(self) -> None:
        """Raise `Preempted` if a SIGTERM arrived while it could not interrupt."""
        if self.requested:
            raise Preempted()

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        self.check()
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False


# One per process: signal handlers are process-wide.
PREEMPTION = PreemptionGuard()
