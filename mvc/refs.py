"""Branches, tags and HEAD. Every move is a compare-and-swap with a reflog entry."""

from __future__ import annotations

import re
import time

from .errors import InvalidRefNameError
from .state import HEAD, HEADS, TAGS
from .store.backend import Backend

_SYM = "ref: "
_BAD = re.compile(r"(^|/)\.|\.\.|[\x00-\x20\x7f~^:?*\[\\]|@\{|\.lock(/|$)|/$|^/|//|^@$|\.$")


def check_ref_name(name: str, what: str = "branch") -> str:
    """Git's check-ref-format rules for a short branch or tag name."""
    if not name or _BAD.search(name) or name.startswith("-") or name == "HEAD":
        raise InvalidRefNameError(f"{name!r} is not a valid {what} name")
    return name


class Refs:
    def __init__(self, backend: Backend, who: str = "mvc"):
        self.backend = backend
        self.who = who

    # -- reading ---------------------------------------------------------------
    def head_raw(self) -> str:
        return self.backend.get_ref(HEAD) or _SYM + HEADS + "main"

    def current_branch(self) -> str | None:
        """The branch HEAD is attached to (short name), or None when detached."""
        raw = self.head_raw()
        return raw[len(_SYM) + len(HEADS):] if raw.startswith(_SYM) else None

    def head_target_ref(self) -> str | None:
        raw = self.head_raw()
        return raw[len(_SYM):] if raw.startswith(_SYM) else None

    def head_commit(self) -> str | None:
        raw = self.head_raw()
        if raw.startswith(_SYM):
            return self.backend.get_ref(raw[len(_SYM):])
        return raw

    def get(self, name: str) -> str | None:
        return self.backend.get_ref(name)

    def branches(self) -> dict[str, str]:
        return {k[len(HEADS):]: v for k, v in self.backend.list_refs(HEADS).items()}

    def tags(self) -> dict[str, str]:
        return {k[len(TAGS):]: v for k, v in self.backend.list_refs(TAGS).items()}

    def reflog(self, name: str = HEAD) -> list[dict]:
        return self.backend.reflog(name)

    # -- writing ---------------------------------------------------------------
    def _entry(self, old, new, msg):
        return {"old": old, "new": new, "time": int(time.time()), "who": self.who, "msg": msg}

    def move_head(self, new: str, expected: str | None, msg: str) -> None:
        """Move whatever HEAD points at (its branch, or HEAD itself when detached) by CAS."""
        target = self.head_target_ref()
        if target is None:
            self.backend.update_refs([(HEAD, expected, new)], [(HEAD, self._entry(expected, new, msg))])
        else:
            self.backend.update_refs(
                [(target, expected, new)],
                [(target, self._entry(expected, new, msg)), (HEAD, self._entry(expected, new, msg))])

    def set_ref(self, name: str, new: str | None, expected: str | None, msg: str) -> None:
        log = [(name, self._entry(expected, new, msg))] if new else []
        if new and self.head_target_ref() == name:
            log.append((HEAD, self._entry(expected, new, msg)))
        self.backend.update_refs([(name, expected, new)], log)

    def attach_head(self, branch: str, msg: str, old_commit: str | None, new_commit: str | None) -> None:
        raw_old = self.backend.get_ref(HEAD)
        self.backend.update_refs([(HEAD, raw_old, _SYM + HEADS + branch)],
                                 [(HEAD, self._entry(old_commit, new_commit, msg))])

    def detach_head(self, commit: str, msg: str, old_commit: str | None) -> None:
        raw_old = self.backend.get_ref(HEAD)
        self.backend.update_refs([(HEAD, raw_old, commit)], [(HEAD, self._entry(old_commit, commit, msg))])

    def init(self, branch: str = "main") -> None:
        if self.backend.get_ref(HEAD) is None:  # a killed init (or clone) run again: HEAD stays
            self.backend.update_refs([(HEAD, None, _SYM + HEADS + branch)], [])
