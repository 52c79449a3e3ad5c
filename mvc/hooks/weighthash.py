"""The weight-hash manifest: SHA-256 of each weight file, of its header and of each tensor.

`.weight_hashes.json` (sorted, stable) lets a reviewer see in a diff which tensors a
commit changed, and lets anyone compare with `sha256sum` and with the oids that Git
LFS and model hubs publish. Files are hashed in one streaming pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from ..errors import InvalidFileError
from ..formats import safetensors as stf

MANIFEST = ".weight_hashes.json"
SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf")
_BLOCK = 4 << 20


def hash_file(path: str, rel: str) -> dict:
    """{"size", "sha256"} for any weight file; plus "metadata_sha256" and "tensors" for safetensors."""
    whole = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not rel.endswith(".safetensors"):
                while block := f.read(_BLOCK):
                    whole.update(block)
                return {"size": size, "sha256": whole.hexdigest()}
            raw, header = stf.read_header(f, size, rel)
            whole.update(raw)
            tensors = {}
            for e in header.entries:
                th = hashlib.sha256()
                left = e.end - e.begin
                while left:
                    block = f.read(min(_BLOCK, left))
                    if not block:
                        raise InvalidFileError(rel, "file shrank while being hashed")
                    th.update(block)
                    whole.update(block)
                    left -= len(block)
                tensors[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "sha256": th.hexdigest()}
            return {"size": size, "sha256": whole.hexdigest(),
                    "metadata_sha256": hashlib.sha256(raw).hexdigest(), "tensors": tensors}
    except OSError as e:
        raise InvalidFileError(rel, f"cannot read ({e.strerror})") from e


def load_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return dict(data["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidFileError(MANIFEST, f"not a valid manifest ({e}); fix it or delete it and run --update") from e


def write_manifest(root: str, files: dict) -> None:
    text = json.dumps({"version": 1, "files": files}, indent=2, sort_keys=True) + "\n"
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(root, MANIFEST))


@dataclass
class FileReport:
    path: str
    status: str  # added | removed | changed
    lines: list[str] = field(default_factory=list)


def compare(path: str, old: dict | None, new: dict | None) -> FileReport | None:
    """What changed in one file between its manifest entry and now (None if nothing)."""
    if old == new:
        return None
    if old is None:
        return FileReport(path, "added", [f"  {len(new.get('tensors', {}))} tensors, {new['size']} bytes"])
    if new is None:
        return FileReport(path, "removed")
    rep = FileReport(path, "changed", [f"  sha256 {old['sha256'][:12]} -> {new['sha256'][:12]}"])
    if old.get("metadata_sha256") != new.get("metadata_sha256"):
        rep.lines.append("  header (metadata) changed")
    a, b = old.get("tensors", {}), new.get("tensors", {})
    for name in sorted(a.keys() | b.keys()):
        ta, tb = a.get(name), b.get(name)
        if ta == tb:
            continue
        if ta is None:
            rep.lines.append(f"  + {name}: added {tb['dtype']}{tb['shape']}")
        elif tb is None:
            rep.lines.append(f"  - {name}: removed")
        elif (ta["dtype"], ta["shape"]) != (tb["dtype"], tb["shape"]):
            rep.lines.append(f"  ~ {name}: {ta['dtype']}{ta['shape']} -> {tb['dtype']}{tb['shape']}")
        else:
            rep.lines.append(f"  ~ {name}: data changed")
    return rep


class StatCache:
    """size + mtime + ctime + inode -> entry, so unchanged files are not hashed again (kept outside
    the work tree); ctime catches a copy that kept size and mtime (`cp -p`)."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict = {}
        if path and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    self.data = json.load(f)
            except ValueError:
                self.data = {}

    def get(self, rel: str, st: os.stat_result) -> dict | None:
        hit = self.data.get(rel)
        if not isinstance(hit, dict):
            return None
        seen = (hit.get("size"), hit.get("mtime_ns"), hit.get("ctime_ns"), hit.get("ino"))
        return hit.get("entry") if seen == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) else None

    def put(self, rel: str, st: os.stat_result, entry: dict) -> None:
        self.data[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
                          "entry": entry}

    def save(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(self.data, f)
            os.replace(self.path + ".tmp", self.path)


def run(root: str, files: list[str], update: bool, cache: StatCache) -> tuple[list[FileReport], int]:
    """Check (or with *update*, rewrite) the manifest for *files* (relative to root); (reports, hashed)."""
    manifest = load_manifest(root)
    current: dict[str, dict | None] = {}
    hashed = 0
    for rel in sorted(set(files)):
        if not rel.endswith(SUFFIXES):
            continue
        full = os.path.join(root, rel)
        if not os.path.exists(full):
            current[rel] = None
            continue
        st = os.stat(full)
        entry = cache.get(rel, st)
        if entry is None:
            entry = hash_file(full, rel)
            hashed += 1
            cache.put(rel, st, entry)
        current[rel] = entry
    reports = [r for rel, new in current.items() if (r := compare(rel, manifest.get(rel), new)) is not None]
    if update:
        for rel, new in current.items():
            if new is None:
                manifest.pop(rel, None)
            else:
                manifest[rel] = new
        write_manifest(root, manifest)
    cache.save()
    return reports, hashed
