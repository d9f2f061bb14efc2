"""The error types of the recipe layer: `RecipeError` (every problem as ``(yaml path, message)``, located in
the file) and `FinalSaveError` (the trained run could not be saved; the message says what was kept)."""

from __future__ import annotations

from typing import Optional, Sequence

Problem = tuple[str, str]  # (yaml path, message)


class RecipeError(ValueError):
    """An invalid recipe; ``problems`` holds ``(yaml path, message)`` pairs."""

    def __init__(self, problems: Sequence[Problem], source: str = "recipe", lines: Optional[dict] = None):
        self.problems = list(problems)
        self.source = source
        self.lines = lines or {}
        super().__init__("\n".join(self.format_lines()))

    def located(self, source: str, lines: Optional[dict]) -> "RecipeError":
        """The same problems, located in the recipe file (for problems found after validation)."""
        return RecipeError(self.problems, source=source, lines={**(lines or {}), **self.lines})

    def format_lines(self) -> list[str]:
        out = []
        for path, message in self.problems:
            where = self._where(path)
            out.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        return out

    def _where(self, path: str) -> str:
        parts = path.split(".") if path else []
        while parts:  # the nearest enclosing key that has a known origin
            origin = self.lines.get(".".join(parts))
            if origin is not None:
                return origin if isinstance(origin, str) else f"{self.source}:{origin}"
            parts.pop()
        return self.source


class FinalSaveError(RuntimeError):
    """The final save of a finished run failed (a full disk, a read-only folder); the message says what is kept."""
