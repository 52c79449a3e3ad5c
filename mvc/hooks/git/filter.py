"""Git's long-running clean/smudge filter (`filter.mvc.process`), on an mvc store in .git/mvc.

clean:  file bytes -> tensors and chunks in the store, a pointer (docs/pointer-spec.md) to Git.
        A pointer is returned unchanged (clean is idempotent).
smudge: pointer -> the file, rebuilt bit-for-bit and verified; anything else passes through.
One process serves a whole `git add` or `git checkout` (protocol version 2).
"""

from __future__ import annotations

import os
import tempfile

from ...errors import InvalidFileError, MvcError
from ...formats import safetensors as stf
from ...pipeline import Ingestor, Materializer
from ...store.lmdb_backend import LmdbBackend
from ...store.odb import ObjectDB
from . import pktline as P
from .pointer import Pointer, parse


def git_dir(start: str = ".") -> str:
    """The common .git directory of the repository containing *start*."""
    import pygit2

    found = pygit2.discover_repository(os.path.abspath(start))
    if not found:
        raise MvcError(f"not a git repository: {os.path.abspath(start)}", hint="run `git init` first")
    return os.path.abspath(found)


def store_path(gitdir: str) -> str:
    return os.path.join(gitdir, "mvc", "store")


def open_store(gitdir: str, create: bool = True) -> ObjectDB:
    return ObjectDB(LmdbBackend(store_path(gitdir), create=create))


class Filter:
    """Filter logic, separate from the protocol: clean a spooled file, smudge a pointer."""

    def __init__(self, odb: ObjectDB, tmpdir: str, sources=None, skip_smudge: bool = False):
        self.odb = odb
        self.tmpdir = tmpdir
        #: where missing objects come from (transfer.Sources: the paired mvc remote, a local origin)
        self.sources = sources
        #: MVC_SKIP_SMUDGE=1 (like GIT_LFS_SKIP_SMUDGE): checkouts leave pointers; `mvc git pull` fills them
        self.skip_smudge = skip_smudge
        os.makedirs(tmpdir, exist_ok=True)

    def clean_stream(self, reader: P.PacketReader, pathname: str) -> bytes:
        """Clean content read from Git's packets; safetensors stream straight into the store."""
        head = reader.read(1025)
        if len(head) <= 1024 and parse(head) is not None and reader.drain() == 0:
            return head
        if pathname.endswith(".safetensors") and len(head) >= 8:
            size = _safetensors_size(head, reader, pathname)
            if size is not None:
                stream = _Prefixed(head, reader)
                with Ingestor(self.odb, store=True) as ing:
                    oid = ing.ingest_safetensors_stream(stream, size, pathname)
                if reader.drain():
                    raise InvalidFileError(pathname, "trailing bytes after the last tensor")
                return Pointer(oid, size).encode()
        return self.clean(lambda f: (f.write(head), f.write(reader.read())), pathname)

    def clean(self, read_into, pathname: str) -> bytes:
        """*read_into(file)* writes the content to a file; returns the pointer to give Git."""
        fd, tmp = tempfile.mkstemp(dir=self.tmpdir, suffix=".clean")
        try:
            with os.fdopen(fd, "wb") as f:
                read_into(f)
            size = os.path.getsize(tmp)
            if size <= 1024:
                with open(tmp, "rb") as f:
                    head = f.read()
                if parse(head) is not None:
                    return head
            with Ingestor(self.odb, store=True) as ing:
                oid = ing.ingest(tmp, pathname)
            return Pointer(oid, size).encode()
        finally:
            os.unlink(tmp)

    def check_smudge(self, data: bytes) -> None:
        """Raise before any output if *data* is a pointer whose object this store lacks."""
        ptr = parse(data)
        if ptr is None or self.skip_smudge or self.odb.has(ptr.oid):
            return
        if self.sources is None:
            raise MvcError(f"object {ptr.oid[:12]} is missing from {self.odb.backend.path}",
                           hint="pair an mvc remote (`mvc remote add`), then `mvc git pull`")
        self.sources.fetch([ptr.oid])

    def smudge(self, data: bytes, out) -> None:
        """Write the file a pointer names (or *data* itself, if it is not a pointer) to *out*."""
        ptr = parse(data)
        if ptr is None or self.skip_smudge:
            out.write(data)
            return
        self.check_smudge(data)
        with Materializer(self.odb) as mat:
            mat.write(ptr.oid, out)


def serve(stdin, stdout, filt: Filter, log) -> None:
    """Run protocol version 2 until Git closes the pipe. *log(str)* reports errors to Git's stderr."""
    hello = P.read_text_list(stdin)
    if "git-filter-client" not in hello or "version=2" not in hello:
        raise P.ProtocolError(f"unexpected handshake {hello!r}")
    P.write_text(stdout, "git-filter-server", "version=2")
    P.flush(stdout)
    caps = P.read_text_list(stdin)
    offer = [c for c in ("capability=clean", "capability=smudge") if c in caps]
    P.write_text(stdout, *offer)
    P.flush(stdout)
    while True:
        try:
            header = P.read_text_list(stdin)
        except EOFError:
            return
        meta = dict(line.split("=", 1) for line in header if "=" in line)
        command, pathname = meta.get("command"), meta.get("pathname", "?")
        try:
            if command == "clean":
                reader = P.PacketReader(stdin)
                try:
                    result = filt.clean_stream(reader, pathname)
                finally:
                    if not reader.eof:
                        reader.drain()  # keep the protocol in step even when cleaning failed
                _respond(stdout, result)
            elif command == "smudge":
                chunks: list[bytes] = []
                P.read_content(stdin, chunks.append)
                data = b"".join(chunks)
                filt.check_smudge(data)
                P.write_text(stdout, "status=success")
                P.flush(stdout)
                w = P.PacketWriter(stdout)
                try:
                    filt.smudge(data, w)
                    w.close()
                    P.flush(stdout)
                    P.flush(stdout)  # empty list: keep status=success
                except MvcError as e:
                    w.close()
                    P.flush(stdout)
                    P.write_text(stdout, "status=error")
                    P.flush(stdout)
                    log(f"mvc: {pathname}: {e}" + (f" (hint: {e.hint})" if e.hint else ""))
            else:
                P.read_content(stdin, lambda _b: None)
                P.write_text(stdout, "status=error")
                P.flush(stdout)
        except MvcError as e:
            log(f"mvc: {pathname}: {e}" + (f" (hint: {e.hint})" if e.hint else ""))
            P.write_text(stdout, "status=error")
            P.flush(stdout)


class _Prefixed:
    """Bytes already read, then the rest of a PacketReader, as one sequential file."""

    def __init__(self, head: bytes, reader: P.PacketReader):
        self.head = head
        self.reader = reader
        self.pos = 0

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            if len(out) < n:
                out += self.reader.read(n - len(out))
        else:
            out = self.reader.read(n)
        self.pos += len(out)
        return out

    def tell(self) -> int:
        return self.pos


def _safetensors_size(head: bytes, reader: P.PacketReader, pathname: str) -> int | None:
    """The whole file's size from its header (the largest end offset), or None if unreadable."""
    import json
    import struct

    (n,) = struct.unpack("<Q", head[:8])
    if n > stf.MAX_HEADER:
        raise InvalidFileError(pathname, f"safetensors header of {n} bytes is over the {stf.MAX_HEADER} byte limit")
    need = 8 + n - len(head)
    if need > 0:
        head_more = reader.read(need)
        if len(head_more) < need:
            raise InvalidFileError(pathname, f"safetensors header length {n} runs past the end of the file")
        reader.unread(head_more)  # the ingest reads the header again, in order
        header = head + head_more
    else:
        header = head
    try:
        entries = json.loads(header[8:8 + n])
        ends = [v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        return None  # let the full parser report exactly what is wrong
    if not all(isinstance(e, int) and e >= 0 for e in ends):
        return None
    return 8 + n + max(ends, default=0)


def _respond(stdout, data: bytes) -> None:
    P.write_text(stdout, "status=success")
    P.flush(stdout)
    P.write_packet(stdout, data)
    P.flush(stdout)
    P.flush(stdout)
