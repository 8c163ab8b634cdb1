"""Error types. A ForgeError is a user-fixable problem: the CLI and dodo.py print its
one-sentence message and exit non-zero, never a traceback."""


class ForgeError(Exception):
    """A problem the user can fix (bad recipe, bad source file, failed check)."""


class RecipeError(ForgeError):
    """The recipe file is malformed or inconsistent; the message names file, line and key."""


class SourceError(ForgeError):
    """A source file is missing, corrupt or does not match what the recipe expects."""


class PlanError(ForgeError):
    """The recipe's tables do not fit the sources (unmapped tensors, unmatched rules...)."""


class OwnershipError(ForgeError):
    """A path the build would write or delete is not forgekit's."""


class VerifyError(ForgeError):
    """A verification step failed; the message names the step and the cause."""

    def __init__(self, step: str, cause: str):
        super().__init__(f"verify step '{step}' failed: {cause}")
        self.step = step
        self.cause = cause
