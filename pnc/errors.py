"""User-facing errors of pnc (stdlib only).

Every error a user can cause is a :class:`PncError`. The command line prints its
message and exits with status 1, never a traceback. Messages name the fix: the file
(and line/column where there is one), the key, what was expected and what exists.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class PncError(Exception):
    """An error caused by user input or the environment, with a message that names the fix."""


class DataError(PncError):
    """Dataset files are missing, truncated or inconsistent."""


class ModelError(PncError):
    """A model cannot be built (unknown name, weights missing, bad layer selection)."""


class AccessDenied(PncError):
    """The MLflow server refused a request: unknown user, wrong password (HTTP 401) or a permission missing (403)."""


class TrainingError(PncError):
    """A training run failed in a way that marks its cell FAILED (NaN loss, divergence)."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a spec: where it is and what is wrong."""

    file: str
    line: int  # 1-based
    col: int  # 1-based
    path: str  # dotted key path, e.g. "train.epochs" or "models[2]"
    message: str

    def __str__(self) -> str:  # one line, so that every line of a report starts with its position
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        message = " ".join(self.message.splitlines())
        return f"{where}: {self.path}: {message}" if self.path else f"{where}: {message}"


class SpecError(PncError):
    """One or more problems in a spec file; ``str()`` lists them all, one per line."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def did_you_mean(name: str, options: Iterable[str], *, show: int = 12) -> str:
    """Return ' Did you mean X? Available: a, b, ...' for an unknown ``name``."""
    opts = sorted(set(options))
    close = difflib.get_close_matches(str(name), opts, n=3, cutoff=0.6)
    if not close:
        lowered = {o.lower(): o for o in opts}
        close = [lowered[c] for c in difflib.get_close_matches(str(name).lower(), list(lowered), n=3, cutoff=0.6)]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(opts[:show]) + (f", ... ({len(opts)} in all)" if len(opts) > show else "")
    return f"{hint} Available: {shown}."
