"""One error root for mvc. The CLI maps these to exit codes in one place (mvc/cli/errors.py)."""

from __future__ import annotations


class MvcError(Exception):
    """Root of every error mvc raises on purpose. The message is one line for the user."""

    #: a hint on how to fix it, appended by the CLI
    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class NotARepositoryError(MvcError):
    hint = "run `mvc init` first, or pass -C DIR"


class FormatVersionError(MvcError):
    hint = "upgrade mvc (pip install -U mvc)"


class UnknownRevisionError(MvcError):
    pass


class AmbiguousRevisionError(MvcError):
    pass


class InvalidRefNameError(MvcError):
    pass


class RefConflictError(MvcError):
    """A compare-and-swap on a ref lost: someone else moved it."""


class ObjectMissingError(MvcError):
    def __init__(self, oid: str, what: str = "object"):
        super().__init__(f"{what} {oid} is missing from the store")
        self.oid = oid


class CorruptObjectError(MvcError):
    hint = "run `mvc fsck` to list damaged objects; restore them from a remote or backup"

    def __init__(self, oid: str, detail: str):
        super().__init__(f"object {oid} is corrupt: {detail}")
        self.oid = oid


class InvalidFileError(MvcError):
    """A work-tree file could not be parsed (truncated safetensors, bad header, ...)."""

    def __init__(self, path: str, detail: str, hint: str | None = None):
        super().__init__(f"{path}: {detail}", hint)
        self.path = path


class UnsafePickleError(InvalidFileError):
    hint = "convert the file to safetensors, or list it in .mvcignore"


class UnsafePathError(MvcError):
    pass


class DirtyWorkTreeError(MvcError):
    hint = "commit your changes, or pass --force to discard them"


class NothingToCommitError(MvcError):
    hint = "use --allow-empty to record a commit anyway"


class LockedError(MvcError):
    hint = "wait for the other mvc process to finish"


class UsageError(MvcError):
    pass
