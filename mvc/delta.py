"""Where a new version of a tensor finds the chunks it may be stored against (delta bases).

A base is the tensor of the same file path and name, with the same dtype, shape and chunk size,
in one of a list of commits, nearest first: an explicit ``--delta-base`` revision, the parents
(for a merge: every parent and the merge base), the revision a compression step started from,
then up to ``ANCESTORS`` first-parent ancestors, so that a version made from an older one (a
fine-tune restarted from a checkpoint) finds it. Chunk i of the new tensor is tried against
chunk i of each candidate (pipeline.encode_with_bases), and only chunks, never identities, change.
"""

from __future__ import annotations

from .store.odb import ObjectDB

DEFAULT_MAX_DEPTH = 10  # the longest delta chain a read follows (config: delta.max_depth)
ANCESTORS = 8  # first-parent ancestors searched after the named commits
MAX_CANDIDATES = 4  # candidate tensors per new tensor


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
            self._files[key] = tensors
        return self._files[key]

    def chunks_for(self, path: str, name: str, dtype: str, shape, chunk_size: int) -> list[tuple[str, ...]]:
        """Per candidate base tensor (nearest first, distinct), its chunk ids."""
        out, seen = [], set()
        for commit in self.commits:
            tid = self._tensors(commit, path).get(name)
            if tid is None or tid in seen:
                continue
            seen.add(tid)
            t = self.odb.get(tid, "tensor")
            if t.dtype == dtype and tuple(t.shape) == tuple(shape) and t.chunk_size == chunk_size and t.chunks:
                out.append(t.chunks)
                if len(out) == MAX_CANDIDATES:
                    break
        return out


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
