"""Exception raised for unreadable sparse checkpoints."""

from __future__ import annotations

import os

__all__ = ["SparseCheckpointError"]


class SparseCheckpointError(ValueError):
    """A sparse checkpoint file is corrupt, truncated, foreign or unsupported.

    The message always starts with the offending file's path, followed by what
    is wrong with it. Both parts are also available as attributes.

    Attributes:
        path: the file (or directory) that could not be read.
        problem: a human-readable description of what is wrong.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep picklable despite the custom __init__
        return (type(self), (self.path, self.problem))
