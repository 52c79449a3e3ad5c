"""Typed objects and their one canonical encoding.

Metadata objects (tensor, file, tree, commit) are canonical JSON: UTF-8, keys
sorted, no insignificant whitespace, ids as lowercase hex. Chunks are raw bytes.
Parsing validates shape and types, so an object from a remote or a damaged store
is rejected before it is used. Golden bytes are pinned in tests/test_objects.py.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptObjectError, UnsafePathError
from . import kernels
from .ids import is_hex_oid

_first, _second = operator.itemgetter(0), operator.itemgetter(1)

#: safetensors dtype name -> (element size in bytes, is floating point)
DTYPES: dict[str, tuple[int, bool]] = {
    "BOOL": (1, False), "U8": (1, False), "I8": (1, False),
    "U16": (2, False), "I16": (2, False), "F16": (2, True), "BF16": (2, True),
    "U32": (4, False), "I32": (4, False), "F32": (4, True),
    "U64": (8, False), "I64": (8, False), "F64": (8, True),
    "F8_E4M3": (1, True), "F8_E5M2": (1, True), "F8_E8M0": (1, True),
    "C64": (8, False),
}

MODE_FILE = 0o100644
MODE_EXEC = 0o100755
MODES = (MODE_FILE, MODE_EXEC)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _oid(v: Any, what: str) -> str:
    if not isinstance(v, str) or not is_hex_oid(v):
        raise ValueError(f"{what} is not an object id")
    return v


_HEX_IDS = re.compile(r"(?:[0-9a-f]{64},)*")


def _oids(v: Any, what: str) -> tuple[str, ...]:
    """A list of object ids, checked at once (a file object may list 100,000)."""
    if not isinstance(v, list) or set(map(type, v)) - {str}:
        raise ValueError(f"{what} ids must be a list of strings")
    if v and _HEX_IDS.fullmatch(",".join(v) + ",") is None:
        raise ValueError(f"a {what} is not an object id")
    return tuple(v)


def _int(v: Any, what: str, lo: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{what} must be an integer >= {lo}")
    return v


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPES[dtype][0] * math.prod(shape)


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    chunk_size: int
    chunks: tuple[str, ...]

    kind = "tensor"

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    def to_json(self) -> dict:
        return {"chunk_size": self.chunk_size, "chunks": list(self.chunks), "dtype": self.dtype,
                "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> Tensor:
        dtype = d["dtype"]
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        shape = tuple(_int(x, "shape") for x in d["shape"])
        n = 1
        for x in shape:  # the safetensors library's checked product: no 64-bit overflow on the way
            n *= x
            if n >= 1 << 64:
                raise ValueError("shape overflows 64 bits")
        cs = _int(d["chunk_size"], "chunk_size", 1)
        chunks = tuple(_oid(c, "chunk") for c in d["chunks"])
        t = cls(dtype, shape, cs, chunks)
        if len(chunks) != -(-t.nbytes // cs):
            raise ValueError("chunk count does not match shape")
        return t


@dataclass(frozen=True)
class File:
    """How a work-tree file is rebuilt: raw chunks, or a safetensors header plus tensors."""

    format: str  # "raw" | "safetensors"
    size: int
    chunks: tuple[str, ...] = ()  # raw: file chunks; safetensors: header chunks
    tensors: tuple[tuple[str, str], ...] = ()  # safetensors: (name, tensor id) in data order

    kind = "file"

    def to_json(self, copy: bool = True) -> dict:
        """The JSON fields; *copy* False leaves the tensor pairs as tuples (json writes them as the
        same arrays, without a list made for each of 100,000 pairs)."""
        d: dict = {"chunks": list(self.chunks), "format": self.format, "size": self.size}
        if self.format == "safetensors":
            d["tensors"] = list(map(list, self.tensors)) if copy else self.tensors
        return d

    @classmethod
    def from_json(cls, d: dict) -> File:
        fmt = d["format"]
        if fmt not in ("raw", "safetensors"):
            raise ValueError(f"unknown file format {fmt!r}")
        tensors: tuple = ()
        if fmt == "safetensors":
            listed = d["tensors"]  # whole passes, not a Python step per tensor (100,000 of them)
            if type(listed) is not list or set(map(type, listed)) - {list} or set(map(len, listed)) - {2}:
                raise ValueError("tensors must be a list of [name, tensor id] pairs")
            tensors = tuple(map(tuple, listed))
            if set(map(type, map(_first, tensors))) - {str}:
                raise ValueError("a tensor name is not a string")
            _oids(list(map(_second, tensors)), "tensor")
        return cls(fmt, _int(d["size"], "size"), _oids(d["chunks"], "chunk"), tensors)


MAX_NAME = 255  # bytes of one path component (Linux NAME_MAX, macOS and Windows alike)
MAX_PATH = 4095  # bytes of a whole path (Linux PATH_MAX less its NUL)


def check_path(path: str) -> str:
    """Validate a tree path: relative, normalized, nothing that escapes or names a repo dir."""
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        raise UnsafePathError(f"unsafe path in tree: {path!r}")
    if path.startswith("/"):
        raise UnsafePathError(f"unsafe path in tree: {path!r} is absolute")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UnsafePathError(f"unsafe path in tree: {path!r} is not UTF-8") from e
    if len(raw) > MAX_PATH or max(len(c) for c in raw.split(b"/")) > MAX_NAME:
        raise UnsafePathError(f"path in tree is longer than a file system allows ({MAX_NAME} bytes a name, "
                              f"{MAX_PATH} in all): {path[:80]!r}...")
    for comp in path.split("/"):
        if comp in ("", ".", ".."):
            raise UnsafePathError(f"unsafe path in tree: {path!r}")
        if comp.rstrip(". ").lower() in (".mvc", ".git"):
            raise UnsafePathError(f"unsafe path in tree: {path!r} names a repository directory")
    return path


def _no_file_dir_clash(paths) -> None:
    paths = list(paths)
    dirs = {p[:i] for p in paths for i in range(len(p)) if p[i] == "/"}
    for p in paths:
        if p in dirs:
            raise UnsafePathError(f"tree names {p!r} both as a file and as a directory")


@dataclass(frozen=True)
class TreeEntry:
    path: str
    mode: int
    oid: str


@dataclass(frozen=True)
class Tree:
    entries: tuple[TreeEntry, ...]

    kind = "tree"

    def to_json(self) -> dict:
        return {"entries": [[e.path, e.mode, e.oid] for e in self.entries]}

    @classmethod
    def build(cls, items: dict[str, tuple[int, str]]) -> Tree:
        keys = sorted(items, key=lambda p: p.encode("utf-8"))
        _no_file_dir_clash(keys)
        return cls(tuple(TreeEntry(check_path(p), *items[p]) for p in keys))

    @classmethod
    def from_json(cls, d: dict) -> Tree:
        entries = []
        prev = b""
        for path, mode, oid in d["entries"]:
            check_path(path)
            if mode not in MODES:
                raise ValueError(f"bad mode {mode!r}")
            key = path.encode("utf-8")
            if entries and key <= prev:
                raise ValueError("tree entries not sorted or duplicated")
            prev = key
            entries.append(TreeEntry(path, mode, _oid(oid, "file")))
        _no_file_dir_clash(e.path for e in entries)
        return cls(tuple(entries))

    def as_dict(self) -> dict[str, TreeEntry]:
        return {e.path: e for e in self.entries}


@dataclass(frozen=True)
class Commit:
    tree: str
    parents: tuple[str, ...]
    author: str
    time: int
    tz: int  # minutes east of UTC
    message: str
    op: dict | None = field(default=None)

    kind = "commit"

    def to_json(self) -> dict:
        d = {"author": self.author, "message": self.message, "parents": list(self.parents),
             "time": self.time, "tree": self.tree, "tz": self.tz}
        if self.op is not None:
            d["op"] = self.op
        return d

    @classmethod
    def from_json(cls, d: dict) -> Commit:
        op = d.get("op")
        if op is not None and not isinstance(op, dict):
            raise ValueError("op must be an object")
        if not isinstance(d["author"], str) or not isinstance(d["message"], str):
            raise ValueError("author and message must be strings")
        tz = _int(d["tz"], "tz", -24 * 60)
        if tz > 24 * 60:
            raise ValueError("tz must be minutes east of UTC, within a day")
        return cls(_oid(d["tree"], "tree"), tuple(_oid(p, "parent") for p in d["parents"]),
                   d["author"], _int(d["time"], "time"), tz, d["message"], op)


CLASSES = {"tensor": Tensor, "file": File, "tree": Tree, "commit": Commit}


#: a tensor object exactly as canonical_json writes it (parse_object's fast path; anything else
#: takes the general path, which accepts only what re-encodes to the same bytes)
_TENSOR_CANONICAL = re.compile(
    rb'\{"chunk_size":([1-9][0-9]{0,18}),"chunks":\[((?:"[0-9a-f]{64}")(?:,"[0-9a-f]{64}")*)?\],'
    rb'"dtype":"([A-Z0-9_]{1,16})","shape":\[((?:0|[1-9][0-9]{0,18})(?:,(?:0|[1-9][0-9]{0,18}))*)?\]\}')


def _encode_tensor(t: Tensor) -> bytes | None:
    """canonical_json(t.to_json()) without the json module (a file may hold 100,000 tensors), for
    the tensors mvc makes: a known dtype, hex chunk ids, integer dimensions. None: anything else."""
    if t.dtype not in DTYPES or not all(type(d) is int for d in t.shape) or type(t.chunk_size) is not int:
        return None
    chunks = '","'.join(t.chunks)
    if chunks and not (chunks.isascii() and chunks.replace('","', "").isalnum()):
        return None
    listed = f'"{chunks}"' if chunks else ""
    dims = ",".join(map(str, t.shape))
    return f'{{"chunk_size":{t.chunk_size},"chunks":[{listed}],"dtype":"{t.dtype}","shape":[{dims}]}}'.encode()


def _tensor_of(size: bytes, chunks: bytes | None, dtype: bytes, shape: bytes | None) -> Tensor:
    """The tensor of a _TENSOR_CANONICAL match: the checks of Tensor.from_json that the pattern
    does not make already."""
    name = dtype.decode()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    dims = tuple(map(int, shape.split(b","))) if shape else ()
    n = 1
    for x in dims:
        n *= x
        if n >= 1 << 64:
            raise ValueError("shape overflows 64 bits")
    ids = tuple(chunks.decode().replace('"', "").split(",")) if chunks else ()
    cs = int(size)
    if len(ids) != -(-n * DTYPES[name][0] // cs):
        raise ValueError("chunk count does not match shape")
    return Tensor(name, dims, cs, ids)


def encode_object(obj) -> bytes:
    if type(obj) is Tensor:
        fast = _encode_tensor(obj)
        if fast is not None:
            return fast
    if type(obj) is File:
        if obj.format == "safetensors" and type(obj.chunks) is tuple and type(obj.tensors) is tuple:
            fast = kernels.file_json(obj.chunks, obj.size, obj.tensors)
            if fast is not None:
                return fast
        return canonical_json(obj.to_json(copy=False))
    return canonical_json(obj.to_json())


def parse_object(kind: str, content: bytes, oid: str = "?"):
    """Parse canonical bytes of a metadata object; CorruptObjectError if malformed."""
    try:
        if kind == "tensor":
            m = _TENSOR_CANONICAL.fullmatch(content)
            if m is not None:  # canonical by construction: ids are hex, dimensions integers
                return _tensor_of(*m.groups())
        elif kind == "file":
            fast = kernels.file_object(content)
            if fast is not None:  # canonical by construction: exactly the bytes file_json writes
                chunks, size, tensors = fast
                return File("safetensors", size, chunks, tensors)
        d = json.loads(content)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        obj = CLASSES[kind].from_json(d)
    except UnsafePathError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError, OverflowError) as e:
        raise CorruptObjectError(oid, f"malformed {kind}: {str(e)[:200]}") from e
    if encode_object(obj) != bytes(content):  # unknown keys, other types or spellings: one value, one id
        raise CorruptObjectError(oid, f"malformed {kind}: not in canonical form (docs/format.md §4)")
    return obj
