"""One error root for mvc. The CLI maps these to exit codes in one place (mvc/cli/errors.py)."""

from __future__ import annotations


class MvcError(Exception):
    """Root of every error mvc raises on purpose. The message is one line for the user."""

    #: a hint on how to fix it, appended by the CLI
    hint: str | None = None

    def __init_subclass__(cls, hint: str | None = None, **kw):
        """``class X(MvcError, hint="..."):`` gives every X that hint unless one is passed."""
        super().__init_subclass__(**kw)
        if hint is not None:
            cls.hint = hint

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class NotARepositoryError(MvcError, hint="run `mvc init` first, or pass -C DIR"):
    """No .mvc directory here or above, or its config is missing."""


class FormatVersionError(MvcError, hint="upgrade mvc (pip install -U mvc)"):
    """The repository's format is newer than this mvc understands (docs/format.md §9)."""


class UnknownRevisionError(MvcError):
    """A revision names no commit."""


class AmbiguousRevisionError(MvcError):
    """A short id matches more than one object."""


class InvalidRefNameError(MvcError):
    """A branch or tag name breaks Git's check-ref-format rules."""


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
    """A path would escape the work tree or name a repository directory."""


class DirtyWorkTreeError(MvcError, hint="commit your changes, or pass --force to discard them"):
    """The command would overwrite uncommitted changes."""


class NothingToCommitError(MvcError, hint="use --allow-empty to record a commit anyway"):
    """The work tree equals HEAD."""


class LockedError(MvcError, hint="wait for the other mvc process to finish"):
    """Another mvc process holds the repository lock."""


class UsageError(MvcError):
    """Bad arguments or options (exit code 2)."""


class MissingExtraError(MvcError):
    """A command needs an optional part of mvc that is not installed (``pip install 'mvc[compress]'``)."""

    def __init__(self, what: str, module: str, extra: str = "compress"):
        super().__init__(f"{what} needs the '{extra}' extra ({module} is not installed)",
                         hint=f"pip install 'mvc[{extra}]' (with -c constraints.txt to keep the CPU build of torch)")
