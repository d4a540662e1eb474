"""SIGTERM = preemption notice: stop soon, exit 143, leave nothing half-written.

By default a SIGTERM raises `Preempted` at once, wherever the program is: every file eopd-pipe
writes is written under a temporary name and renamed, so abandoning work never leaves a
half-written output. Code that must not be cut in the middle runs under `PREEMPTION.deferred()`:
bookkeeping (rename a shard + record it in the manifest), and the training loop, which polls
`PREEMPTION.requested` at step boundaries to save a checkpoint before it stops.
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
        self._deferring = 0

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.requested = True
        if not self._deferring:
            raise Preempted()

    def check(self) -> None:
        """Raise `Preempted` if a SIGTERM arrived while it was deferred."""
        if self.requested:
            raise Preempted()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a SIGTERM until the block ends (then raise, unless the block raised already)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring:
            self.check()


# One per process: signal handlers are process-wide.
PREEMPTION = PreemptionGuard()
