"""The work tree: scanning with .mvcignore, the stat cache, and safe file writes.

Writes never leave the work tree: every directory on the way is opened relative
to its parent with O_NOFOLLOW, so a symlink planted anywhere on a path makes the
write fail instead of following it. Files are written to a temporary name and
renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat as st
import time
from dataclasses import dataclass

import pathspec

from .errors import MvcError, UnsafePathError
from .state import IGNORE_FILE, KV_STAT, TMP_SUFFIX
from .store.backend import Backend
from .store.objects import MODE_EXEC, MODE_FILE, check_path

_ALWAYS_IGNORED = (".mvc/", ".git/", f"*{TMP_SUFFIX}")
_TMP_PID = re.compile(r"^\..+\.\d+" + re.escape(TMP_SUFFIX) + "$")  # open_for_write's temporary names
_RACY_NS = 100_000_000  # > the coarse kernel clock tick that stamps mtimes (1-10 ms)
#: files up to this size also keep a digest of their bytes in the stat cache: when only their stat
#: changed (touch, `cp -p` onto itself, an archive restored), hashing the bytes (~2 GB/s) replaces
#: reading every tensor again (a file of 100,000 small tensors: milliseconds instead of seconds)
DIGEST_MAX = 256 << 20


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int
    ino: int
    mode: int  # MODE_FILE or MODE_EXEC
    #: the inode's change time: no tool can set it, so `cp -p`, `touch -r` or an archive that keeps
    #: size and mtime still changes it (Git's index compares it too)
    ctime_ns: int = 0

    @classmethod
    def of(cls, s: os.stat_result) -> FileStat:
        return cls(s.st_size, s.st_mtime_ns, s.st_ino, MODE_EXEC if s.st_mode & 0o111 else MODE_FILE, s.st_ctime_ns)


def drop_scratch(prefix: str) -> None:
    """Remove the scratch files *prefix* and *prefix*.N (a merge's or a clone's, under .mvc/tmp:
    what a finished command did not move into the work tree, or a killed one left)."""
    folder, name = os.path.split(prefix)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for n in names:
        if n == name or n.startswith(name + "."):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, n))


def _check_utf8(rel: str) -> None:
    """Paths are stored as UTF-8 (tree entries are JSON strings): a name the file system gave as
    other bytes is refused by name, and the user can rename or ignore it."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
        raise UnsafePathError(f"file name '{shown}' is not UTF-8: rename it, or list it in {IGNORE_FILE}") from e


def _stat_key(rel: str) -> bytes:
    """The stat cache's key of a path: a hash, so that a path of any length fits LMDB's 511-byte
    key limit (the entry holds the path itself)."""
    import blake3

    return KV_STAT + blake3.blake3(rel.encode("utf-8", "surrogateescape")).hexdigest()[:32].encode()


class WorkTree:
    def __init__(self, root: str, backend: Backend):
        self.root = os.path.realpath(root)
        self.backend = backend
        self._spec = None

    # -- scanning --------------------------------------------------------------
    def _ignore_spec(self):
        if self._spec is None:
            lines = list(_ALWAYS_IGNORED)
            try:
                with open(os.path.join(self.root, IGNORE_FILE), encoding="utf-8") as f:
                    lines += f.read().splitlines()
            except FileNotFoundError:
                pass
            self._spec = pathspec.GitIgnoreSpec.from_lines(lines)
        return self._spec

    def ignored(self, rel: str) -> bool:
        return self._ignore_spec().match_file(rel)

    def scan(self, prefixes: list[str] | None = None) -> dict[str, FileStat]:
        """Tracked-candidate files: relative path -> stat. Symlinked files are followed, symlinked dirs are not."""
        out: dict[str, FileStat] = {}
        spec = self._ignore_spec()
        starts = prefixes if prefixes else [""]
        for start in starts:
            top = os.path.join(self.root, start) if start else self.root
            if start and os.path.isfile(top):
                if not spec.match_file(start):
                    _check_utf8(start)
                    out[start] = FileStat.of(os.stat(top))
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                reldir = os.path.relpath(dirpath, self.root)
                reldir = "" if reldir == "." else reldir.replace(os.sep, "/") + "/"
                dirnames[:] = sorted(d for d in dirnames if not spec.match_file(reldir + d + "/")
                                     and not os.path.islink(os.path.join(dirpath, d)))
                for name in filenames:
                    rel = reldir + name
                    if spec.match_file(rel):
                        continue
                    try:
                        s = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue  # dangling symlink
                    if st.S_ISREG(s.st_mode):
                        _check_utf8(rel)
                        out[rel] = FileStat.of(s)
        return out

    def remove_leftovers(self) -> int:
        """Delete the temporary files (``.<name>.<pid>.mvc-tmp``) of a writer that was killed; the
        caller holds the repository lock, so no live writer has one. Returns how many."""
        gone = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == self.root:
                dirnames[:] = [d for d in dirnames if d not in (".mvc", ".git")]
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                if name.startswith(".") and name.endswith(TMP_SUFFIX) and _TMP_PID.match(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        gone += 1
        return gone

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def rel_from_cwd(self, path: str, cwd: str | None = None) -> str:
        """Turn a user path (relative to *cwd*, default the process's) into a work-tree path."""
        full = os.path.abspath(os.path.join(cwd or os.getcwd(), path))
        if full != self.root and not full.startswith(self.root + os.sep):
            # the cwd may be reached through a symlink; resolve it, but not the last component
            full = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        if full == self.root:
            return ""
        if not full.startswith(self.root + os.sep):
            raise MvcError(f"{path}: outside the work tree {self.root}")
        return os.path.relpath(full, self.root).replace(os.sep, "/")

    # -- stat cache ------------------------------------------------------------
    def cached_oid(self, rel: str, fs: FileStat) -> str | None:
        raw = self.backend.kv_get(_stat_key(rel))
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            seen = (d["path"], d["size"], d["mtime_ns"], d["ctime_ns"], d["ino"], d["mode"])
            oid = d["oid"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return None  # a damaged entry is a miss: the file is hashed again
        if seen == (rel, fs.size, fs.mtime_ns, fs.ctime_ns, fs.ino, fs.mode) and isinstance(oid, str):
            return oid
        return None

    def _digest(self, rel: str) -> str | None:
        import blake3

        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        try:
            if os.path.getsize(self.abspath(rel)):  # (an empty file cannot be mapped)
                h.update_mmap(self.abspath(rel))
        except (OSError, ValueError):
            return None
        return h.hexdigest()

    def same_content(self, rel: str, fs: FileStat) -> str | None:
        """The file id the stat cache holds for *rel* if only the file's stat changed: same size,
        and the same digest of its bytes (kept for files up to DIGEST_MAX). None otherwise."""
        if fs.size > DIGEST_MAX:
            return None
        raw = self.backend.kv_get(_stat_key(rel))
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            path, size, digest, oid = d["path"], d["size"], d.get("digest"), d["oid"]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None
        if path != rel or size != fs.size or not isinstance(digest, str) or not isinstance(oid, str):
            return None
        return oid if self._digest(rel) == digest else None

    def remember(self, entries: dict[str, tuple[FileStat, str]], forget: list[str] = ()) -> None:
        """Record path -> (stat, file id), and a digest of the bytes of files up to DIGEST_MAX.
        Racily-clean files (modified or changed in the last 100 ms: a write in the same clock tick
        would not show) are not cached, nor is a file whose stat changed while it was digested."""
        now = time.time_ns()
        items: dict[bytes, bytes | None] = {}
        for rel, (fs, oid) in entries.items():
            if max(fs.mtime_ns, fs.ctime_ns) >= now - _RACY_NS:
                items[_stat_key(rel)] = None
                continue
            entry = {"path": rel, "size": fs.size, "mtime_ns": fs.mtime_ns, "ctime_ns": fs.ctime_ns, "ino": fs.ino,
                     "mode": fs.mode, "oid": oid}
            if fs.size <= DIGEST_MAX:
                digest = self._digest(rel)
                if digest is None or self.stat(rel) != fs:  # changed meanwhile: the digest may not be oid's
                    items[_stat_key(rel)] = None
                    continue
                entry["digest"] = digest
            items[_stat_key(rel)] = json.dumps(entry, ensure_ascii=True).encode()
        for rel in forget:
            items[_stat_key(rel)] = None
        if items:
            self.backend.kv_put_many(items)

    # -- safe writes -----------------------------------------------------------
    def _open_dir(self, rel_dir: str, create: bool) -> int:
        """An fd for a work-tree directory, opened component by component without following links."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for comp in [c for c in rel_dir.split("/") if c]:
                try:
                    nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o777, dir_fd=fd)
                    nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except (NotADirectoryError, OSError) as e:
                    if isinstance(e, FileNotFoundError):
                        raise
                    raise UnsafePathError(
                        f"refusing to write through {rel_dir!r}: {comp!r} is a symlink or not a directory") from e
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def check_writable(self, rel: str) -> None:
        """Refuse a path whose parent directories include a symlink or a file (checked before writing)."""
        check_path(rel)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            sub = "/".join(parts[:i])
            try:
                s = os.lstat(self.abspath(sub))
            except FileNotFoundError:
                return
            if st.S_ISLNK(s.st_mode):
                raise UnsafePathError(f"refusing to write {rel!r}: {sub!r} is a symlink")
            if not st.S_ISDIR(s.st_mode):
                raise UnsafePathError(f"refusing to write {rel!r}: {sub!r} is a file, not a directory")

    @contextlib.contextmanager
    def _parent_of(self, rel: str):
        """(the open parent directory of *rel*, created if need be; *rel*'s name in it), once no
        directory stands where the file goes."""
        check_path(rel)
        parent, _, name = rel.rpartition("/")
        dfd = self._open_dir(parent, create=True)
        try:
            try:
                existing = os.lstat(name, dir_fd=dfd)
                if st.S_ISDIR(existing.st_mode) and not st.S_ISLNK(existing.st_mode):
                    raise UnsafePathError(f"{rel}: a directory is in the way")
            except FileNotFoundError:
                pass
            yield dfd, name
        finally:
            os.close(dfd)

    @contextlib.contextmanager
    def open_for_write(self, rel: str, mode: int):
        """Yield a binary file to fill; on success it atomically replaces *rel*."""
        with self._parent_of(rel) as (dfd, name):
            tmp = f".{name}.{os.getpid()}{TMP_SUFFIX}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_EXCL,
                         0o777 if mode == MODE_EXEC else 0o666, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb", buffering=0, closefd=True) as f:
                    yield f
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def adopt(self, rel: str, mode: int, src: str) -> None:
        """Move the finished file *src* (on this file system: a merge's or a clone's scratch under
        .mvc) into place as *rel*, atomically, with the mode a written file gets. Raises OSError
        (EXDEV on another file system) with *rel* untouched; the caller then writes it the usual way."""
        with self._parent_of(rel) as (dfd, name):
            if mode == MODE_EXEC:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(src, 0o777 & ~umask)
            os.rename(src, name, dst_dir_fd=dfd)

    def stat(self, rel: str) -> FileStat | None:
        try:
            s = os.stat(self.abspath(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return FileStat.of(s) if st.S_ISREG(s.st_mode) else None

    def remove(self, rel: str) -> None:
        """Delete a file (not through symlinked dirs) and prune directories left empty."""
        check_path(rel)
        parent, _, name = rel.rpartition("/")
        try:
            dfd = self._open_dir(parent, create=False)
        except FileNotFoundError:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)
        finally:
            os.close(dfd)
        while parent:
            try:
                os.rmdir(self.abspath(parent))
            except OSError:
                break
            parent = parent.rpartition("/")[0]
