"""Two kinds of failure: a user's input that is wrong (UserError: one line, exit 2, no traceback) and
everything else (a bug: traceback)."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input. The message names the file and the problem and fits on one line."""

    log: str | None = None  # the failing stage's log (its library output), named after the line

    def __init__(self, problem: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class UnreachableTarget(UserError):
    """A MACs/params target the search cannot land within its tolerance."""
