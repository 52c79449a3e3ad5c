"""The narrow interface a remote must offer, and the file:// implementation.

Keys are '/'-separated names under the remote's root. Writes of immutable keys are
atomic (a reader never sees half a pack); refs change only by compare-and-swap.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from abc import ABC, abstractmethod

from ..errors import MvcError
from ..store.packs import pwrite_all


class RemoteError(MvcError):
    pass


def check_url(url: str) -> str:
    if any(c in url for c in "\r\n\x00"):
        raise RemoteError("remote URL contains a CR, LF or NUL character")
    return url


_IOV_MAX = 1024  # buffers per pwritev (Linux's IOV_MAX)
MAX_GET = 256 << 20  # a whole-key read (refs, indexes, the format file) never allocates more


class RemoteBackend(ABC):
    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write an immutable key atomically (readers see all of it or nothing)."""

    def put_parts(self, key: str, parts: list) -> None:
        """put() of the parts one after the other (a remote that can write them as they are
        overrides this: a 64 MiB pack is not joined in memory first)."""
        self.put(key, b"".join(parts))

    @abstractmethod
    def cas(self, key: str, expected: bytes | None, new: bytes) -> bool:
        """Set *key* to *new* only if it now holds *expected* (None: absent). True on success."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key (absent: nothing happens). Only `mvc remote fsck --repair` deletes."""

    #: bytes sent by put/cas and received by get/get_range, for reports and tests
    sent: int = 0
    received: int = 0


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
        raise RemoteError(f"bad remote key {key!r}")
    return key


class FileRemote(RemoteBackend):
    """A directory (a shared filesystem, or tests). file:///path"""

    def __init__(self, root: str, create: bool = False):
        self.root = os.path.abspath(root)
        self.sent = 0
        if not os.path.isdir(self.root):
            if not create:
                raise RemoteError(f"remote directory {self.root} does not exist")
            os.makedirs(self.root)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *_safe_key(key).split("/"))

    def _open(self, key: str) -> int | None:
        """A descriptor of the regular file holding *key* (None: absent). A FIFO, a device or a
        directory in its place is refused: it could block a read, or never end one."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RemoteError(f"cannot read remote object {key}: {e.strerror}") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RemoteError(f"remote object {key} is not a regular file")
        return fd

    def get(self, key):
        fd = self._open(key)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > MAX_GET:
                raise RemoteError(f"remote object {key} is {size} bytes, more than any index or ref can be")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_GET + 1)[:MAX_GET]
        finally:
            os.close(fd)
        self.received += len(data)
        return data

    def get_range(self, key, start, length):
        fd = self._open(key)
        if fd is None:
            raise RemoteError(f"remote object {key} is missing")
        try:
            data = os.pread(fd, length, start)
        finally:
            os.close(fd)
        if len(data) != length:
            raise RemoteError(f"remote object {key} is shorter than its index says")
        self.received += len(data)
        return data

    def put(self, key, data):
        self.put_parts(key, [data])

    def put_parts(self, key, parts):
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        parts = [p for p in map(memoryview, parts) if p.nbytes]  # (an empty key is an empty file)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        pos = 0
        try:
            for i in range(0, len(parts), _IOV_MAX):  # straight from the parts, no joined copy
                group = parts[i:i + _IOV_MAX]
                pwrite_all(fd, group, pos)
                pos += sum(p.nbytes for p in group)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.sent += pos

    @contextlib.contextmanager
    def _lock(self):
        fd = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def cas(self, key, expected, new):
        with self._lock():
            if self.get(key) != expected:
                return False
            self.put(key, new)
            return True

    def delete(self, key):
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix):
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        out = []
        for d, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(".tmp") or name == ".lock":
                    continue
                out.append(os.path.relpath(os.path.join(d, name), self.root).replace(os.sep, "/"))
        return sorted(out)


def open_remote(url: str, create: bool = False, endpoint_url: str | None = None) -> RemoteBackend:
    check_url(url)
    if endpoint_url:
        check_url(endpoint_url)
    if url.startswith("file://"):
        return FileRemote(url[len("file://"):], create=create)
    if url.startswith("s3://"):
        from .s3 import S3Remote

        return S3Remote(url, endpoint_url=endpoint_url)
    raise RemoteError(f"unsupported remote URL {url!r}", hint="use s3://BUCKET/PREFIX or file:///path")
