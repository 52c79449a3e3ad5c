"""Model objects travel with Git: upload for `git push` (pre-push), download for clones,
checkouts and `mvc git fetch/pull`.

Where objects go and come from, in this order:
  1. the mvc remote paired with the Git remote in .mvcconfig (s3:// or file://; the remote
     format of `mvc push`, docs/remote-format.md, without branch refs: Git has the refs);
  2. for a Git remote that is a directory on this machine, its own store (<its git dir>/mvc/store),
     so a local bare repository works with no pairing, as it does for Git itself.
Every object is verified against its id before it is stored or sent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import MvcError
from ...graph import closure
from ...remote.backends import RemoteError, open_remote
from ...remote.sync import check_format, download_objects, remote_index, upload_objects
from ...store.lmdb_backend import LmdbBackend
from ...store.odb import ObjectDB
from . import mvcconfig
from .mvcconfig import Paired


@dataclass
class Transfer:
    files: int = 0  # model files (pointers) considered
    objects: int = 0  # objects moved
    nbytes: int = 0  # stored bytes moved
    where: str = ""  # the remote (or store) they went to or came from


def local_git_store(url: str | None) -> str | None:
    """The mvc store of a Git remote on this machine (a path or file:// URL): <git dir>/mvc/store.
    None for a network URL or a path that is not a Git repository."""
    if not url:
        return None
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url or (":" in url.split("/")[0] and not os.path.exists(url)):
        return None  # a network remote (scp-like user@host:path included)
    path = os.path.abspath(url)
    gitdir = os.path.join(path, ".git") if os.path.isdir(os.path.join(path, ".git")) else path
    if not os.path.isfile(os.path.join(gitdir, "HEAD")):
        return None
    return os.path.join(gitdir, "mvc", "store")


def workdir_of(gitdir: str) -> str | None:
    """The work tree of the repository at *gitdir* (None when bare)."""
    import pygit2

    wd = pygit2.Repository(gitdir).workdir
    return os.path.abspath(wd) if wd else None


MAX_UPDATES = 1 << 20  # bytes of pre-push input: one line per pushed ref


def parse_push_updates(text: bytes) -> list[tuple[str, str]]:
    """Git's pre-push input, "<local ref> <local id> <remote ref> <remote id>" per line, as
    (local id, remote id) pairs; all zeros for an id means none (a new or deleted ref)."""
    import re

    if len(text) > MAX_UPDATES:
        raise MvcError(f"pre-push input is over {MAX_UPDATES} bytes")
    line_re = re.compile(r"\A(\S+) ([0-9a-f]{40}|[0-9a-f]{64}) (\S+) ([0-9a-f]{40}|[0-9a-f]{64})\Z")
    out = []
    for line in text.decode("utf-8", "surrogateescape").splitlines():
        if not line.strip():
            continue
        m = line_re.match(line)
        if not m:
            raise MvcError(f"pre-push: unexpected input line {line[:120]!r} (Git sends "
                           "'<local ref> <local id> <remote ref> <remote id>')")
        out.append((m.group(2), m.group(4)))
    return out


def git_remote_url(workdir: str, name: str) -> str | None:
    import subprocess

    res = subprocess.run(["git", "config", "--get", f"remote.{name}.url"], cwd=workdir,
                         capture_output=True, text=True)
    return res.stdout.strip() or None


def copy_closure(src: ObjectDB, dst: ObjectDB, roots: list[str]) -> Transfer:
    """Copy file objects *roots* and everything they name that *dst* lacks, verifying each;
    chunks, then tensors, then files, so *dst* never names what it lacks."""
    needed = closure(src.get, [(o, "file") for o in roots], dst.has)
    t = Transfer(objects=len(needed))
    for group in ("chunk", "tensor", "file"):
        batch, size = [], 0
        for o, kind in needed.items():
            if kind != group:
                continue
            stored = src.standalone(o)  # the destination may lack a delta's base: values in full
            dst.decode(bytes.fromhex(o), stored, kind)  # never store what does not verify
            batch.append((bytes.fromhex(o), stored))
            size += len(stored)
            t.nbytes += len(stored)
            if size > 64 << 20:
                dst.backend.put_many(batch)
                batch, size = [], 0
        dst.backend.put_many(batch)
    return t


def _open(paired: Paired, create: bool):
    try:
        remote = open_remote(paired.url, create=create, endpoint_url=paired.endpoint_url)
        check_format(remote, create=create)
    except MvcError as e:
        raise RemoteError(f"mvc remote {paired.name} ({paired.url}): {e}", hint=e.hint) from e
    return remote


def _named(paired: Paired, e: MvcError) -> RemoteError:
    return RemoteError(f"mvc remote {paired.name} ({paired.url}): {e}", hint=e.hint)


def upload(odb: ObjectDB, paired: Paired, pointers: dict[str, str], progress=None) -> Transfer:
    """Send what the paired remote lacks of the objects behind *pointers* (id -> where Git names it)."""
    remote = _open(paired, create=True)
    try:
        have = remote_index(odb.backend, remote, paired.url)
        roots = [o for o in pointers if o not in have]
        _check_local(odb, roots, pointers, paired.name)
        want = closure(odb.get, [(o, "file") for o in roots], have.__contains__)
        upload_objects(odb, remote, have, want, progress)
    except RemoteError as e:
        raise _named(paired, e) from e
    return Transfer(len(pointers), len(want), remote.sent, f"{paired.name} ({paired.url})")


def upload_to_store(odb: ObjectDB, store: str, pointers: dict[str, str]) -> Transfer:
    """Copy what a local Git remote's store lacks of the objects behind *pointers*."""
    from .history import store_lock

    dst = ObjectDB(LmdbBackend(store, create=True))
    try:
        with store_lock(os.path.dirname(os.path.dirname(store)), exclusive=False):
            roots = [o for o in pointers if not dst.has(o)]
            _check_local(odb, roots, pointers, store)
            t = copy_closure(odb, dst, roots)
    finally:
        dst.backend.close()
    t.files, t.where = len(pointers), store
    return t


def _check_local(odb: ObjectDB, roots: list[str], pointers: dict[str, str], dest: str) -> None:
    lost = [o for o in roots if not odb.has(o)]
    if lost:
        raise MvcError(f"{pointers[lost[0]]}: model object {lost[0][:12]} is neither in .git/mvc nor on {dest}"
                       + (f" ({len(lost) - 1} more like it)" if len(lost) > 1 else ""),
                       hint="fetch it from where it was pushed (`mvc git fetch --all`), "
                            "or push without models: `git push --no-verify`")


class Sources:
    """Where a Git repository's missing objects come from (see the module docstring), opened
    on first use and kept for the process (a filter serves a whole checkout)."""

    def __init__(self, odb: ObjectDB, gitdir: str, workdir: str | None, git_remote: str | None = None):
        self.odb = odb
        self.gitdir = gitdir
        self.workdir = workdir
        self.git_remote = git_remote
        self._paired: Paired | None | bool = False  # False: not looked up yet
        self._remote = None
        self._index = None
        self._store: ObjectDB | None | bool = False

    def _git_remote(self) -> str:
        if self.git_remote is None:  # looked up once (two `git` calls)
            self.git_remote = mvcconfig.default_git_remote(self.workdir)
        return self.git_remote

    def paired(self) -> Paired | None:
        if self._paired is False:
            self._paired = None
            if self.workdir:
                self._paired = mvcconfig.resolve(self.workdir, self._git_remote())
        return self._paired

    def local_store(self) -> ObjectDB | None:
        if self._store is False:
            self._store = None
            if self.workdir:
                path = local_git_store(git_remote_url(self.workdir, self._git_remote()))
                if path and os.path.abspath(path) != os.path.abspath(self.odb.backend.path) \
                        and os.path.exists(os.path.join(path, "data.mdb")):
                    self._store = ObjectDB(LmdbBackend(path))
        return self._store

    def fetch(self, oids: list[str], progress=None) -> Transfer:
        """Bring file objects *oids* (and what they name) here, verified. Raises a one-line error
        naming where it looked when some cannot be found."""
        t = Transfer(files=len(oids))
        missing = [o for o in oids if not self.odb.has(o)]
        store = self.local_store() if missing else None
        if store is not None:
            there = [o for o in missing if store.has(o)]
            if there:
                got = copy_closure(store, self.odb, there)
                t.objects, t.nbytes, t.where = got.objects, got.nbytes, store.backend.path
                got_here = set(there)
                missing = [o for o in missing if o not in got_here]
        if not missing:
            return t
        paired = self.paired()
        if paired is None:
            more = f" ({len(missing) - 1} more like it)" if len(missing) > 1 else ""
            raise MvcError(f"model object {missing[0][:12]} is not in .git/mvc{more} and no mvc remote is "
                           "paired with this repository",
                           hint="pair one: `mvc remote add origin s3://BUCKET/PREFIX` (or file:///PATH), "
                                "and commit .mvcconfig")
        try:
            if self._remote is None:
                self._remote = _open(paired, create=False)
                self._index = remote_index(self.odb.backend, self._remote, paired.url)
            absent = [o for o in missing if o not in self._index]
            if absent:
                raise MvcError(f"model object {absent[0][:12]} is not on mvc remote {paired.name} ({paired.url})"
                               + (f" ({len(absent) - 1} more like it)" if len(absent) > 1 else ""),
                               hint="push it there from a repository that has it (`git push`)")
            before = self._remote.received
            t.objects += download_objects(self.odb, self._remote, self._index, [(o, "file") for o in missing],
                                          paired.name, progress)
        except RemoteError as e:
            raise _named(paired, e) from e
        t.nbytes += self._remote.received - before
        t.where = f"{paired.name} ({paired.url})"
        return t

    def close(self) -> None:
        if isinstance(self._store, ObjectDB):
            self._store.backend.close()
