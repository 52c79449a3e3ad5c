"""Exit codes, in one place. A user error prints one line (plus a hint), never a traceback."""

from __future__ import annotations

from .. import errors as E

EXIT_CODES = [
    (E.UsageError, 2),
    (E.NotARepositoryError, 128),
    (E.FormatVersionError, 128),
    (E.CorruptObjectError, 3),
    (E.ObjectMissingError, 3),
    (E.LockedError, 4),
    (E.MvcError, 1),
]


def exit_code(err: E.MvcError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(err, cls):
            return code
    return 1
