"""safetensors header parsing and validation (no torch, no safetensors import needed).

Layout: u64 little-endian header length N, N bytes of JSON header, then the data
region. Each entry gives dtype, shape and [begin, end) offsets into the data
region. We accept a file only when the entries tile the data region exactly: in
bounds, no overlap, no holes, sizes matching dtype x shape.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import InvalidFileError
from ..store import kernels
from ..store.objects import DTYPES

MAX_HEADER = 100 * 1000 * 1000  # the safetensors reference implementation's limit


class Entry(NamedTuple):  # a tuple: a header may hold 100,000 of them
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    header_size: int  # bytes before the data region (8 + N)
    entries: tuple[Entry, ...]  # sorted by begin offset
    metadata: dict | None


_by_offsets = operator.itemgetter(3, 4)  # Entry.begin, Entry.end
entry_begin, entry_end = operator.itemgetter(3), operator.itemgetter(4)  # Entry.begin, Entry.end, in C


def encode_header(tensors, metadata: dict | None = None) -> tuple[bytes, dict[str, int], int]:
    """What precedes the data region of a file holding *tensors* [(name, dtype, shape)] back to
    back in that order: (the u64 length and the compact JSON header, padded with spaces to a
    multiple of 8, *metadata* last; {name: offset in the data region}; the data region's size)."""
    head, offsets, off = {}, {}, 0
    for name, dtype, shape in tensors:
        nbytes = DTYPES[dtype][0] * math.prod(shape)
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        offsets[name] = off
        off += nbytes
    if metadata is not None:
        head["__metadata__"] = metadata
    h = json.dumps(head, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h, offsets, off


def _no_dupes(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dupe = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dupe!r}")
    return d


_STRING = re.compile(r'"[^"\\]*"')  # a JSON string without escapes


def _load(text: str):
    """The header's JSON, refusing a key given twice in an object (the last would win silently).
    Without escapes in the text every string is a run between two quotes: outside them, each
    ':' separates one pair and each '{' opens one object, so when the parsed tree's objects and
    pairs add up to those counts no key came twice; the hook that checks each object otherwise
    costs 0.3 s on a header of 100,000 tensors."""
    if "\\" not in text:
        head = json.loads(text)
        if type(head) is not dict:
            return head
        dicts = [v for v in head.values() if type(v) is dict]
        bare = _STRING.sub("", text)
        if bare.count("{") == 1 + len(dicts) and bare.count(":") == len(head) + sum(map(len, dicts)):
            return head
    return json.loads(text, object_pairs_hook=_no_dupes)


def _fits(shape) -> bool:
    """The running product of the dimensions stays within 64 bits, as the safetensors library
    checks it (so [2^62, 2^62, 0, 2^62], zero elements in all, is refused there and here)."""
    n = 1
    for d in shape:
        n *= d
        if n >= 1 << 64:
            return False
    return True


def parse_header(prefix: bytes, file_size: int, path: str) -> Header:
    """Validate a header. *prefix* holds at least the first 8 + N bytes of the file."""
    if file_size < 8 or len(prefix) < 8:
        raise InvalidFileError(path, "truncated safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER:
        raise InvalidFileError(path, f"safetensors header of {n} bytes is over the {MAX_HEADER} byte limit")
    if 8 + n > file_size:
        raise InvalidFileError(path, f"safetensors header length {n} runs past the end of the {file_size}-byte file")
    raw = memoryview(prefix)[8:8 + n]
    data_size = file_size - 8 - n
    fast = kernels.safetensors_header(raw, data_size, _SIZE, Entry)
    if fast is not None:  # a plain header, every check below passed in one C pass
        return Header(8 + n, fast[0], fast[1])
    try:
        head = _load(str(raw, "utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidFileError(path, f"safetensors header is not valid JSON ({e})") from e
    except RecursionError as e:
        raise InvalidFileError(path, "safetensors header is nested too deeply") from e
    if not isinstance(head, dict):
        raise InvalidFileError(path, "safetensors header is not a JSON object")
    meta = head.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise InvalidFileError(path, "safetensors __metadata__ must map strings to strings")
    entries = _entries_fast(head, data_size)
    if entries is None:  # something is wrong: entry by entry, to say what and where
        entries = _entries_checked(head, data_size, path)
    return Header(8 + n, tuple(entries), meta)


_SIZE = {name: size for name, (size, _float) in DTYPES.items()}
_begin, _end = operator.itemgetter(0), operator.itemgetter(1)


def _entries_fast(head: dict, data_size: int) -> list[Entry] | None:
    """The entries of a well-formed header, checked in whole passes over all of them (no Python
    step per check per tensor: a header may hold 100,000); None if any check fails, and then
    _entries_checked finds and names the bad entry."""
    infos = list(head.values())
    if set(map(type, infos)) - {dict}:
        return None
    try:
        dtypes = [i["dtype"] for i in infos]
        shapes = [i["shape"] for i in infos]
        offsets = [i["data_offsets"] for i in infos]
    except KeyError:
        return None
    if set(map(type, shapes)) - {list} or set(map(type, offsets)) - {list} or set(map(len, offsets)) - {2}:
        return None
    dims = list(itertools.chain.from_iterable(shapes))
    begins, ends = list(map(_begin, offsets)), list(map(_end, offsets))
    numbers = dims + begins + ends
    if set(map(type, numbers)) - {int} or (numbers and min(numbers) < 0) or not set(_SIZE).issuperset(dtypes):
        return None
    if (ends and max(ends) > data_size) or not all(map(operator.le, begins, ends)):
        return None
    if dims and (max(dims) >= 1 << 16 or max(map(len, shapes)) > 3):  # the running product may pass 2^64
        if not all(map(_fits, shapes)):
            return None
    sizes = list(map(operator.mul, map(_SIZE.__getitem__, dtypes), map(math.prod, shapes)))
    if sizes != list(map(operator.sub, ends, begins)):
        return None
    # tuple.__new__ makes each Entry in C (Entry's own __new__ is a Python function: 0.2 s here)
    entries = list(map(tuple.__new__, itertools.repeat(Entry), zip(head, dtypes, map(tuple, shapes), begins, ends)))
    entries.sort(key=_by_offsets)
    begins, ends = list(map(entry_begin, entries)), list(map(entry_end, entries))
    if entries and (begins[0] != 0 or ends[-1] != data_size or begins[1:] != ends[:-1]):
        return None  # overlaps, holes or trailing bytes
    if not entries and data_size:
        return None
    return entries


def _entries_checked(head: dict, data_size: int, path: str) -> list[Entry]:
    """The entries, checked one at a time; InvalidFileError names the first bad one."""
    entries = []
    for name, info in head.items():
        try:
            dtype = info["dtype"]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}")
            # type(x) is int: no bools, no floats
            if not (type(begin) is int and type(end) is int and begin >= 0
                    and all(type(x) is int and x >= 0 for x in shape)):
                raise ValueError("shape and offsets must be non-negative integers")
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidFileError(path, f"tensor {name!r}: bad header entry ({e})") from e
        if end < begin or end > data_size:
            raise InvalidFileError(
                path, f"tensor {name!r}: offsets [{begin}, {end}) out of bounds of the {data_size}-byte data region")
        if not _fits(shape):
            raise InvalidFileError(path, f"tensor {name!r}: shape {list(shape)[:8]} overflows 64 bits "
                                         "(the safetensors library refuses it too)")
        if end - begin != DTYPES[dtype][0] * math.prod(shape):
            raise InvalidFileError(path, f"tensor {name!r}: {end - begin} bytes do not match {dtype} {list(shape)}")
        entries.append(Entry(name, dtype, shape, begin, end))
    entries.sort(key=_by_offsets)
    pos = 0
    for e in entries:
        if e.begin < pos:
            raise InvalidFileError(path, f"tensor {e.name!r} overlaps the previous tensor")
        if e.begin > pos:
            raise InvalidFileError(path, f"hole of {e.begin - pos} bytes before tensor {e.name!r}")
        pos = e.end
    if pos != data_size:
        raise InvalidFileError(path, f"{data_size - pos} trailing bytes after the last tensor")
    return entries


def read_header(f, file_size: int, path: str) -> tuple[bytes, Header]:
    """Read and validate the header from an open binary file positioned at 0."""
    first = f.read(8)
    if len(first) < 8:
        raise InvalidFileError(path, "truncated safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", first)
    if n > MAX_HEADER or 8 + n > file_size:
        parse_header(first, file_size, path)  # raises the precise error
    raw = first + f.read(n)
    return raw, parse_header(raw, file_size, path)
