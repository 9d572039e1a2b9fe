"""Errors raised by the recipe engine; each names the YAML path of the problem."""

from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe that cannot be loaded, validated or built.

    ``problems`` holds one line per problem, each starting with the YAML path (``model.vit.depth: ...``); the
    message is those lines joined, so the CLI prints it as it is.
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
