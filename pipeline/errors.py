"""Errors a user can fix. The CLI prints them as one clear message (no traceback) and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a message naming the file, the field and the fix."""


class Preempted(Exception):
    """SIGTERM arrived (preemption notice): the current unit of work was abandoned or checkpointed."""

    exit_code = 143  # 128 + SIGTERM, what schedulers expect from a terminated job
