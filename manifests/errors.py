"""Errors raised while reading annotation files and validating manifests.

Every error names the bad input (file and line where there is one) and the fix, so the CLIs can
print it as one line without a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path


def first_line(e: BaseException) -> str:
    """The first line of an error's message, for one-line reports (its repr when the message is empty:
    ``EOFError()`` from a zero-byte file has none)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", (str(e).splitlines() or [repr(e)])[0])  # no terminal colour codes


class ManifestError(ValueError):
    """A manifest (or a request for one) is invalid; the message says what to change."""


class AnnotationError(ManifestError):
    """A line of an official annotation file could not be used.

    Args:
        path: the annotation file.
        line: 1-based line number in that file (None when the problem is the whole file).
        problem: what is wrong.
        fix: what the user should do about it.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str, fix: str):
        self.path = Path(path)
        self.line = line
        self.problem = problem
        self.fix = fix
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {problem}. Fix: {fix}")
