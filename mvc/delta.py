"""Where a new version of a tensor finds the chunks it may be stored against (delta bases).

A base is the tensor of the same file path and name, with the same dtype, shape and chunk size,
in one of a list of commits, nearest first: an explicit ``--delta-base`` revision, the parents
(for a merge: every parent and the merge base), the revision a compression step started from,
then up to ``ANCESTORS`` first-parent ancestors, so that a version made from an older one (a
fine-tune restarted from a checkpoint) finds it. Chunk i of the new tensor is tried against
chunk i of each candidate (pipeline.encode_with_bases), and only chunks, never identities, change.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from dataclasses import dataclass

from .store.odb import ObjectDB

#: parent dtype name -> the code PREDICT values record (codec.PARENT_DTYPES)
_PARENT_CODES = {"F32": 0, "F16": 1, "BF16": 2}
QWEIGHT, SCALES = ".qweight", ".scales"


@dataclass(frozen=True)
class Prediction:
    """Where one chunk of int8 codes (``X.qweight``) is predicted from: the parent's float tensor
    ``X`` (its chunks *bases*, from element *skip* of the first) and per-row *scales* (float32
    bytes, from the chunk's first row on); the chunk starts at column *col0* of rows of *cols*."""

    bases: tuple[str, ...]
    pdtype: int
    skip: int
    cols: int
    col0: int
    scales: bytes

#: tensor objects of a candidate file read ahead in one transaction (ObjectDB keeps 4096 parsed)
_PREFETCH = 1024
DEFAULT_MAX_DEPTH = 10  # the longest delta chain a read follows (config: delta.max_depth)
ANCESTORS = 8  # first-parent ancestors searched after the named commits
MAX_CANDIDATES = 4  # candidate tensors per new tensor
#: a base one level deeper must give a delta this much smaller (per level) to be chosen: every
#: level is one more chunk decoded by each read (Git's pack-objects asks the same of deep bases)
DEPTH_COST = 0.15
FULL = -1  # BaseChooser's outcome "no delta: stored in full"


class BaseChooser:
    """Which candidate wins, learnt over the chunks of one commit, so that the others are not
    decoded for every chunk: a version made one way from one base (a fine-tune, a merge, a prune)
    makes every chunk's best base the same commit. Candidates are known by *rank*, the place of
    the commit they come from in DeltaBases' list. The first PROBE_FIRST chunks with a choice, and
    then one in PROBE_EVERY, try every candidate; the others try the winner of the last WINDOW such
    trials first (or go straight to a full encoding when that is what won), and try the rest only
    when the winner gives them nothing. What the trials saw also spares the others the trial
    coding of samples (hint): the winner's delta kind, and how large a full encoding came out.
    Thread-safe: the workers of a commit share one."""

    PROBE_FIRST, PROBE_EVERY, WINDOW = 8, 16, 8

    def __init__(self):
        self._lock = threading.Lock()
        self._seen = 0
        self._won: deque[int] = deque(maxlen=self.WINDOW)
        self._kinds: deque[tuple[int, bool]] = deque(maxlen=self.WINDOW)
        self._full: deque[float] = deque(maxlen=self.WINDOW)

    def leader(self) -> int | None:
        """The rank to try first (FULL: none), or None: try every candidate."""
        with self._lock:
            self._seen += 1
            if self._seen <= self.PROBE_FIRST or self._seen % self.PROBE_EVERY == 0 or not self._won:
                return None
            rank, _ = Counter(self._won).most_common(1)[0]
            return rank

    def record(self, rank: int, sparse: bool = False, full_ratio: float | None = None) -> None:
        """What a chunk that tried every candidate chose (a rank, or FULL), whether that delta was
        SPARSE, and its full encoding's estimated size over its raw size."""
        with self._lock:
            self._won.append(rank)
            if rank != FULL:
                self._kinds.append((rank, sparse))
            if full_ratio is not None:
                self._full.append(full_ratio)

    def hint(self, rank: int) -> tuple[bool, float] | None:
        """For a leading *rank*: (is its delta SPARSE, the largest full-encoding ratio lately
        seen), or None when the trials have not told."""
        with self._lock:
            kinds = [sparse for r, sparse in self._kinds if r == rank]
            if not kinds or not self._full:
                return None
            return kinds.count(True) * 2 > len(kinds), max(self._full)


class DeltaBases:
    def __init__(self, odb: ObjectDB, commits: list[str], max_depth: int = DEFAULT_MAX_DEPTH):
        self.odb = odb
        self.commits = list(dict.fromkeys(c for c in commits if c))
        self.max_depth = max_depth
        self._files: dict[tuple[str, str], dict[str, str]] = {}

    def _tensors(self, commit: str, path: str) -> dict[str, str]:
        """name -> tensor id of the safetensors file at *path* in *commit* (empty if none)."""
        key = (commit, path)
        if key not in self._files:
            tree = self.odb.get(self.odb.get(commit, "commit").tree, "tree")
            entry = tree.as_dict().get(path)
            tensors: dict[str, str] = {}
            if entry is not None:
                f = self.odb.get(entry.oid, "file")
                tensors = dict(f.tensors) if f.format == "safetensors" else {}
                # every tensor of the file in one read of the store (chunks_for asks for them one by one)
                self.odb.get_many(list(dict.fromkeys(tensors.values()))[:_PREFETCH], "tensor")
            self._files[key] = tensors
        return self._files[key]

    def chunks_for(self, path: str, name: str, dtype: str, shape, chunk_size: int) -> list[tuple[int, tuple[str, ...]]]:
        """Per candidate base tensor (nearest first, distinct): (rank, its chunk ids), the rank
        being the place in this list of commits of the first commit that holds it."""
        out, seen = [], set()
        for rank, commit in enumerate(self.commits):
            tid = self._tensors(commit, path).get(name)
            if tid is None or tid in seen:
                continue
            seen.add(tid)
            t = self.odb.get(tid, "tensor")
            if t.dtype == dtype and tuple(t.shape) == tuple(shape) and t.chunk_size == chunk_size and t.chunks:
                out.append((rank, t.chunks))
                if len(out) == MAX_CANDIDATES:
                    break
        return out

    def rtn_prediction(self, path: str, qname: str, shape, scales: bytes, chunk_size: int):
        """For an int8 tensor ``X.qweight`` with per-row float32 *scales*: chunk index -> Prediction
        from the nearest float tensor ``X`` of the same size, or None when there is none."""
        if not qname.endswith(QWEIGHT) or len(shape) != 2 or len(scales) != 4 * shape[0]:
            return None
        name, n = qname[:-len(QWEIGHT)], math.prod(shape)
        for commit in self.commits:
            tid = self._tensors(commit, path).get(name)
            if tid is None:
                continue
            t = self.odb.get(tid, "tensor")
            if t.dtype in _PARENT_CODES and math.prod(t.shape) == n and t.chunks:
                break
        else:
            return None
        per = t.chunk_size // (2 if t.dtype != "F32" else 4)  # parent elements per chunk
        cols = shape[1]

        def at(i: int, length: int) -> Prediction:
            e0 = i * chunk_size
            first, last = e0 // per, (e0 + length - 1) // per
            r0, r1 = e0 // cols, (e0 + length - 1) // cols
            return Prediction(tuple(t.chunks[first:last + 1]), _PARENT_CODES[t.dtype], e0 - first * per, cols,
                              e0 % cols, scales[4 * r0:4 * (r1 + 1)])

        return at


def scales_of(name: str, dtype: str, shape) -> str | None:
    """The per-row scales tensor that int8 codes *name* (``X.qweight``, I8, 2-D) are stored beside."""
    if dtype != "I8" or len(shape) != 2 or not name.endswith(QWEIGHT):
        return None
    return name[:-len(QWEIGHT)] + SCALES


def scales_fit(dtype: str, shape, qshape) -> bool:
    """Whether a tensor of *dtype* and *shape* holds one float32 scale per row of *qshape*."""
    return dtype == "F32" and tuple(shape) == (qshape[0],)


def with_ancestors(odb: ObjectDB, commits: list[str]) -> list[str]:
    """*commits*, then up to ANCESTORS first-parent ancestors of the first of them."""
    out = [c for c in commits if c]
    if not out:
        return out
    c = out[0]
    for _ in range(ANCESTORS):
        parents = odb.get(c, "commit").parents
        if not parents:
            break
        c = parents[0]
        out.append(c)
    return out
