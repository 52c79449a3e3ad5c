"""Three-way merges of trees, files, tensors and single elements.

Per path: changed on one side only, take it. Per tensor in a safetensors file
changed on both sides: likewise by tensor id. Per element of a tensor changed on
both sides (same dtype and shape): an element changed on one side takes that
side; changed on both to different values it conflicts, and a strategy (if
given) decides it. Everything streams chunk by chunk. Formulas: docs/merge.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..diff.stats import to_float64
from ..errors import MvcError, UsageError
from ..formats.safetensors import encode_header
from ..pipeline import CHUNK_SIZE, Ingestor, Materializer
from ..progress import NULL, Progress
from ..store import kernels
from ..store.objects import DTYPES, File, Tensor, Tree, TreeEntry
from ..store.packs import pwrite_all

STRATEGIES = ("ours", "theirs", "average", "task-arithmetic", "ties")
_UINT = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}


@dataclass
class Conflict:
    path: str
    tensor: str | None  # None: the whole file
    elements: int = 0  # conflicting elements (tensor conflicts); 0 for whole-file or whole-tensor
    reason: str = ""


@dataclass
class MergeResult:
    entries: dict[str, tuple[int, str]]  # merged tree: path -> (mode, file id)
    conflicts: list[Conflict] = field(default_factory=list)
    merged_tensors: int = 0
    elements_resolved: int = 0  # conflicting elements a strategy decided
    #: merged chunk id -> (scratch file, offset, length): chunks computed by this merge, which the
    #: checkout of its result reads (and verifies) from there instead of decoding their delta chains
    locations: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    #: path -> its scratch file, which holds the merged chunks where the merged file has them: the
    #: checkout fills in the rest and moves it into the work tree (Repo.write_entries)
    prepared: dict[str, str] = field(default_factory=dict)


def merge_bases(repo, a: str, b: str) -> list[str]:
    """Best common ancestors of a and b (none of them an ancestor of another)."""
    anc_a = repo.ancestors(a)
    best: list[str] = []
    covered: set[str] = set()
    # children before parents: a common commit not below an earlier best one is itself a best one
    for e in repo.log(b):
        if e.oid in anc_a and e.oid not in covered:
            best.append(e.oid)
            covered |= repo.ancestors(e.oid)
    return sorted(best, key=lambda c: (-repo.commit_obj(c).time, c))


# -- float conversion back to stored bytes ---------------------------------------------
def from_float64(dtype: str, x: np.ndarray) -> np.ndarray:
    """float64 values as *dtype*'s raw little-endian elements (round to nearest even)."""
    if dtype == "BF16":
        f = x.astype(np.float32, copy=False)  # float32 math already is
        u = f.view(np.uint32)
        # round to nearest even on the top 16 bits; only NaN patterns could overflow, and they are replaced
        rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        nan = np.isnan(f)
        if nan.any():
            rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a (quiet) NaN
        return rounded
    if dtype in ("F16", "F32", "F64"):
        return x.astype({"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype])
    if dtype in ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"):
        np_dtype = np.dtype({"BOOL": "u1", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "U32": "<u4",
                             "I32": "<i4", "U64": "<u8", "I64": "<i8"}[dtype])
        info = np.iinfo(np_dtype)
        out = np.clip(np.rint(x), info.min, info.max)
        return (out != 0).astype("u1") if dtype == "BOOL" else out.astype(np_dtype)
    raise UsageError(f"merge strategies cannot compute {dtype} values", hint="use --strategy ours or theirs")


def kth_largest(arrays, k: int) -> float:
    """The exact k-th largest value (k >= 1) of non-negative float64 data streamed by *arrays()*.

    A radix select over the 64-bit patterns (monotonic for non-negative floats), 16 bits a
    pass: four passes over the data and a 65,536-bin histogram, whatever the tensor's size.
    """
    prefix, left = 0, k
    for step in range(4):
        shift = 48 - 16 * step
        hist = np.zeros(65536, dtype=np.int64)
        for a in arrays():
            u = np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)
            if step:
                u = u[(u >> np.uint64(shift + 16)) == np.uint64(prefix)]
            hist += np.bincount(((u >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64), minlength=65536)
        cum = np.cumsum(hist[::-1])
        idx = int(np.searchsorted(cum, left))
        if idx >= 65536:
            return 0.0
        left -= int(cum[idx - 1]) if idx else 0
        prefix = (prefix << 16) | (65535 - idx)
    return float(np.array([prefix], dtype=np.uint64).view(np.float64)[0])


def ties_values(fb, fo, ft, thr_o: float, thr_t: float, weights: tuple[float, float]) -> np.ndarray:
    """TIES-merging of two task vectors on these elements: trim, elect sign, disjoint mean."""
    to = (fo - fb) * weights[0]
    tt = (ft - fb) * weights[1]
    to = np.where(np.abs(fo - fb) >= thr_o, to, 0.0)
    tt = np.where(np.abs(ft - fb) >= thr_t, tt, 0.0)
    sign = np.sign(to + tt)
    keep_o = (np.sign(to) == sign) & (to != 0)
    keep_t = (np.sign(tt) == sign) & (tt != 0)
    count = (keep_o.astype(np.int8) + keep_t).astype(fb.dtype)
    total = np.where(keep_o, to, 0.0) + np.where(keep_t, tt, 0.0)
    return fb + np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def to_float(dtype: str, elements: np.ndarray) -> np.ndarray:
    """A tensor's elements (unsigned integer view) as the floats the strategies compute with:
    float32 for bf16 and fp16 (their 8- and 11-bit significands leave float32 13 guard bits or
    more), float64 for every other dtype."""
    if dtype == "BF16":
        return (elements.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return elements.view("<f2").astype(np.float32)
    return to_float64(dtype, elements.tobytes())


def resolve_elements(strategy: str, dtype: str, b, o, t, weights: tuple[float, float],
                     ties_thresholds: tuple[float, float] | None = None) -> np.ndarray:
    """Values for conflicting elements (raw element arrays b, o, t of equal length) under *strategy*."""
    if strategy == "ours":
        return o
    if strategy == "theirs":
        return t
    fb, fo, ft = (to_float(dtype, v) for v in (b, o, t))
    w1, w2 = weights
    if strategy == "average":
        val = (w1 * fo + w2 * ft) / (w1 + w2)
    elif strategy == "task-arithmetic":
        val = fb + w1 * (fo - fb) + w2 * (ft - fb)
    elif strategy == "ties":
        val = ties_values(fb, fo, ft, *ties_thresholds, weights)
    else:
        raise UsageError(f"unknown strategy {strategy!r}")
    return from_float64(dtype, val).view(o.dtype)


# -- the merge ---------------------------------------------------------------------------
class Merger:
    def __init__(self, repo, strategy: str | None = None, weights: tuple[float, float] = (1.0, 1.0),
                 density: float = 0.2, progress: Progress = NULL, scratch: str | None = None):
        if strategy is not None and strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
        self.repo = repo
        self.odb = repo.odb
        self.strategy = strategy
        self.weights = weights
        if not 0 < density <= 1:
            raise UsageError(f"--density {density}: must be in (0, 1]")
        self.density = density
        self.progress = progress
        self._made: dict[str, Tensor] = {}  # tensors made by this merge, not yet flushed to the store
        #: where merged chunks are also written as they are made (None: nowhere), see MergeResult:
        #: one file per merged file, *scratch*.N, each laid out as that file is
        self.scratch = scratch
        self._scratch_ok = False
        self._scratch_fd: int | None = None  # the file being merged: its scratch, and where its
        self._scratch_at: dict[str, int] = {}  # tensors (by name) begin in it

    def _tensor(self, tid: str) -> Tensor:
        return self._made.get(tid) or self.odb.get(tid, "tensor")

    def merge_trees(self, base: Tree, ours: Tree, theirs: Tree) -> MergeResult:
        b, o, t = base.as_dict(), ours.as_dict(), theirs.as_dict()
        res = MergeResult(entries={})
        # progress counts the tensor bytes of files changed on both sides: the ones merged tensor by tensor
        both = [p for p in o if p in t and o[p] != t[p] and (p not in b or (b[p] != o[p] and b[p] != t[p]))]
        total = sum(self.odb.get(o[p].oid, "file").size for p in both)
        self.progress.start("merging", total)
        self._scratch_ok = self._room_for_scratch(total)
        bases = self.repo.delta_bases([])
        try:
            with Ingestor(self.odb, store=True, workers=self.repo.workers, batch_bytes=32 << 20, bases=bases) as ing, \
                    Materializer(self.odb, workers=self.repo.workers) as mat:
                mat.inflight = 2  # three streams (base, ours, theirs) read at once: keep each short
                self.ing, self.mat = ing, mat
                for path in sorted(b.keys() | o.keys() | t.keys(), key=str.encode):
                    eb, eo, et = b.get(path), o.get(path), t.get(path)
                    merged = self._merge_path(path, eb, eo, et, res)
                    if merged is not None:
                        res.entries[path] = merged
        finally:
            self._close_scratch()
        self.progress.finish()
        return res

    def _room_for_scratch(self, total: int) -> bool:
        """Whether merged chunks go to scratch files: there is a scratch path and the disk has room
        for the merged files twice over (a scratch lives until its file is written)."""
        if self.scratch is None or total == 0:
            return False
        try:
            return shutil.disk_usage(os.path.dirname(self.scratch)).free >= 2 * total + (256 << 20)
        except OSError:
            return False

    def _open_scratch(self, path: str, f: File, res: MergeResult) -> None:
        """The scratch of merged file *path*, laid out as *f* (the side whose header the merged
        file keeps): its tensors begin where they do in *f*. Without one (no room, an error) the
        checkout decodes the merged chunks from the store as ever."""
        if not self._scratch_ok:
            return
        at = f.size - sum(self._tensor(tid).nbytes for _, tid in f.tensors)  # the header's length
        where = {}
        for name, tid in f.tensors:
            where[name] = at
            at += self._tensor(tid).nbytes
        name = f"{self.scratch}.{len(res.prepared)}"
        try:
            # the mode checkout gives a new file: this one may become the work tree's file
            self._scratch_fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        except OSError:
            return
        self._scratch_at = where
        res.prepared[path] = name

    def _close_scratch(self) -> None:
        if self._scratch_fd is not None:
            os.close(self._scratch_fd)
            self._scratch_fd = None
        self._scratch_at = {}

    def _take(self, e: TreeEntry | None):
        return (e.mode, e.oid) if e is not None else None

    def _side(self, path, eo, et, res, what, tensor=None):
        """A conflict no element-wise rule can settle: only --strategy ours or theirs picks a side."""
        if self.strategy == "ours":
            return eo
        if self.strategy == "theirs":
            return et
        res.conflicts.append(Conflict(path, tensor, 0, what))
        return eo

    def _merge_path(self, path, eb, eo, et, res):
        ko, kt, kb = self._take(eo), self._take(et), self._take(eb)
        if ko == kt:
            return ko
        if ko == kb:
            return kt
        if kt == kb:
            return ko
        if eo is None or et is None:
            side = self._side(path, eo, et, res, "deleted on one side, changed on the other")
            return self._take(side)
        fo, ft = self.odb.get(eo.oid, "file"), self.odb.get(et.oid, "file")
        fb = self.odb.get(eb.oid, "file") if eb else None
        if fo.format != "safetensors" or ft.format != "safetensors" or (fb and fb.format != "safetensors"):
            return self._take(self._side(path, eo, et, res, "changed on both sides"))
        mode = eo.mode if kb is None or eo.mode != eb.mode else et.mode
        return mode, self._merge_file(path, fb, fo, ft, res)

    def _merge_file(self, path: str, fb: File | None, fo: File, ft: File, res: MergeResult) -> str:
        if fb is not None and self._layout(fo) == self._layout(ft) == self._layout(fb):
            self._open_scratch(path, fo, res)  # the merged file keeps ours' header: its layout is known
        try:
            return self._merge_tensors(path, fb, fo, ft, res)
        finally:
            self._close_scratch()

    def _layout(self, f: File) -> list:
        return [(n, self._tensor(tid).dtype, tuple(self._tensor(tid).shape)) for n, tid in f.tensors]

    def _merge_tensors(self, path: str, fb: File | None, fo: File, ft: File, res: MergeResult) -> str:
        tb = dict(fb.tensors) if fb else {}
        to, tt = dict(fo.tensors), dict(ft.tensors)
        names = [n for n, _ in fo.tensors] + [n for n, _ in ft.tensors if n not in to]
        out: list[tuple[str, str]] = []
        for name in names + [n for n in tb if n not in to and n not in tt]:
            b, o, t = tb.get(name), to.get(name), tt.get(name)
            streamed = False  # merged element by element: progress was counted chunk by chunk
            if o == t:
                merged = o
            elif o == b:
                merged = t
            elif t == b:
                merged = o
            elif o is None or t is None or b is None:
                merged = self._side(path, o, t, res, "added or deleted on one side, changed on the other", name)
            else:
                merged = self._merge_tensor(path, name, b, o, t, res)
                streamed = True
            if merged is not None:
                out.append((name, merged))
            self.progress.advance(nbytes=0 if streamed or o is None else self._tensor(o).nbytes, tensors=1)
        return self._file_object(fo, ft, out)

    def _merge_tensor(self, path, name, b_id, o_id, t_id, res: MergeResult) -> str:
        b, o, t = (self.odb.get(x, "tensor") for x in (b_id, o_id, t_id))
        same = {(x.dtype, x.shape, x.chunk_size) for x in (b, o, t)}
        if len(same) != 1:
            return self._side(path, o_id, t_id, res, "dtype or shape changed on both sides", name)
        itemsize = DTYPES[o.dtype][0]
        view = _UINT[itemsize]
        chunks: list[str] = []
        conflicts = 0
        thresholds = self._ties_thresholds(b, o, t) if self.strategy == "ties" else None
        fs = itemsize if DTYPES[o.dtype][1] and itemsize > 1 else 0

        def merge_chunk(i, cb, at):
            """On a worker: the merged chunk i, encoded (numpy, zstd and BLAKE3 release the GIL).
            Ours and theirs are read here, once base chunk *cb* has been decoded and cached: a
            side stored as a delta against the base then decodes its own planes only (read in
            three parallel streams, each side often decoded the base again)."""
            co, ct = self.odb.read_chunk(o.chunks[i]), self.odb.read_chunk(t.chunks[i])
            vb, vo, vt = (np.frombuffer(v, dtype=view) for v in (cb, co, ct))
            fused = kernels.merge3_bf16(vb, vo, vt, self.strategy, self.weights) if o.dtype == "BF16" else None
            if fused is not None:  # one pass in C, the same bytes as _merge_elements
                merged, n = fused
            else:
                merged, n = self._merge_elements(o.dtype, vb, vo, vt, thresholds)
            data = memoryview(merged).cast("B")
            oid, stored = self.ing.encode_made(data, fs, [o.chunks[i], t.chunks[i], b.chunks[i]])
            return oid, stored, data, n, at

        def finish(fut) -> int:
            oid, stored, data, n, at = fut.result()
            self.ing.add_encoded(oid, stored)
            chunks.append(oid.hex())
            if at is not None:  # here, not on the workers: two writers of one file wait on its lock
                try:
                    pwrite_all(self._scratch_fd, [data], at)
                    res.locations[oid.hex()] = (res.prepared[path], at, len(data))
                except OSError:  # a full disk: the checkout decodes this chunk from the store
                    pass
            self.progress.advance(nbytes=len(data))
            if n and self.strategy:
                res.elements_resolved += n
                return 0
            return n

        pending: deque = deque()
        at = self._scratch_at.get(name) if self._scratch_fd is not None else None
        for i, cb in enumerate(self.mat.chunks(b.chunks)):
            pending.append(self.ing.pool.submit(merge_chunk, i, cb, at))
            if at is not None:
                at += len(cb)
            while len(pending) > 2:  # one chunk merging on each worker, one waiting
                conflicts += finish(pending.popleft())
        while pending:
            conflicts += finish(pending.popleft())
        if conflicts:
            res.conflicts.append(Conflict(path, name, conflicts, "changed on both sides"))
        res.merged_tensors += 1
        made = Tensor(o.dtype, o.shape, CHUNK_SIZE, tuple(chunks))
        tid = self.ing.add_meta(made)
        self._made[tid] = made
        return tid

    def _merge_elements(self, dtype: str, vb, vo, vt, thresholds):
        """(merged elements, conflicts) of one chunk in numpy: a side's change is taken, and where
        both changed to different values the strategy (if any) decides."""
        oc, tc = vo != vb, vt != vb
        merged = np.where(oc, vo, vt)
        clash = oc & tc & (vo != vt)
        n = int(np.count_nonzero(clash))
        if n and self.strategy:
            if n > clash.size // 8:  # most elements clash: whole-array math beats gather/scatter
                full = resolve_elements(self.strategy, dtype, vb, vo, vt, self.weights, thresholds)
                merged = np.where(clash, full, merged)
            else:
                merged[clash] = resolve_elements(self.strategy, dtype, vb[clash], vo[clash], vt[clash],
                                                 self.weights, thresholds)
        return merged, n

    def _ties_thresholds(self, b: Tensor, o: Tensor, t: Tensor) -> tuple[float, float]:
        """Per task vector, the magnitude of its k-th largest delta, k = ceil(density * numel)."""
        k = max(1, math.ceil(self.density * math.prod(o.shape)))

        def deltas(side: Tensor):
            def gen():
                pairs = zip(self.mat.chunks(b.chunks), self.mat.chunks(side.chunks), strict=True)
                view = _UINT[DTYPES[b.dtype][0]]
                for cb, cs in pairs:  # the same float type as ties_values compares them in
                    fs, fb = (to_float(b.dtype, np.frombuffer(c, dtype=view)) for c in (cs, cb))
                    yield np.nan_to_num(np.abs(fs - fb)).astype(np.float64)
            return gen

        return kth_largest(deltas(o), k), kth_largest(deltas(t), k)

    def _file_object(self, fo: File, ft: File, tensors: list[tuple[str, str]]) -> str:
        """A safetensors file for *tensors*: ours' header verbatim when layout allows, else a new one."""
        info = {n: self._tensor(tid) for n, tid in tensors}
        layout = [(n, info[n].dtype, info[n].shape) for n, _ in tensors]
        for f in (fo, ft):
            old = [(n, self._tensor(tid).dtype, self._tensor(tid).shape) for n, tid in f.tensors]
            if old == layout:
                return self.ing.add_meta(File("safetensors", f.size, f.chunks, tuple(tensors)))
        header_bytes = b"".join(self.odb.read(c, "chunk")[1] for c in fo.chunks)
        meta = json.loads(header_bytes[8:]).get("__metadata__")
        raw, _offsets, off = encode_header(layout, meta)
        hchunks = tuple(self.ing.add_chunk(raw[i:i + CHUNK_SIZE], 0) for i in range(0, len(raw), CHUNK_SIZE))
        return self.ing.add_meta(File("safetensors", len(raw) + off, hchunks, tuple(tensors)))


def check_weights(weights: tuple[float, ...] | None) -> tuple[float, float]:
    if weights is None:
        return (1.0, 1.0)
    if len(weights) != 2 or any(w < 0 for w in weights) or sum(weights) == 0:
        raise MvcError("--weights takes two non-negative numbers, not both zero (e.g. 0.7,0.3)")
    return (float(weights[0]), float(weights[1]))
