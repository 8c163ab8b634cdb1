"""Error types, and reading forgekit's numeric environment knobs without tracebacks. A ForgeError is a user-fixable problem: the CLI and dodo.py print
its one-sentence message and exit non-zero, never a traceback."""


class ForgeError(Exception):
    """A problem the user can fix (bad recipe, bad source file, failed check)."""


class RecipeError(ForgeError):
    """The recipe file is malformed or inconsistent; the message names file, line and key."""


class SourceError(ForgeError):
    """A source file is missing, corrupt or does not match what the recipe expects."""


class PlanError(ForgeError):
    """The recipe's tables do not fit the sources (unmapped tensors, unmatched rules...)."""


class VerifyError(ForgeError):
    """A verification step failed; the message names the step and the cause."""

    def __init__(self, step: str, cause: str):
        super().__init__(f"verify step '{step}' failed: {cause}")
        self.step = step
        self.cause = cause


def env_number(name: str, default, kind=int):
    """A numeric FORGEKIT_* environment variable; a bad value is a one-line ForgeError."""
    import os

    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ForgeError(f"environment variable {name} must be a number, got {raw!r}") from None
