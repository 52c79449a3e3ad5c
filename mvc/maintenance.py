"""fsck (verify every object and every reference) and gc (drop what no ref reaches)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import MvcError, UnsafePathError
from .graph import reachable
from .store.objects import parse_object
from .store.odb import decode_verified


@dataclass
class FsckReport:
    objects: int = 0
    corrupt: dict[str, str] = field(default_factory=dict)  # oid -> what is wrong
    missing: dict[str, str] = field(default_factory=dict)  # oid -> who names it
    bad_refs: dict[str, str] = field(default_factory=dict)
    not_fetched: int = 0  # chunks a lazy clone has not downloaded yet

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.bad_refs)


def fsck(repo, progress=None) -> FsckReport:
    rep = FsckReport()
    for oid in repo.backend.iter_oids():
        rep.objects += 1
        stored = repo.backend.get(oid)
        if stored is None:
            continue
        try:
            kind, content = decode_verified(oid, stored)
            if kind != "chunk":
                parse_object(kind, bytes(content), oid.hex())
        except (MvcError, UnsafePathError) as e:
            rep.corrupt[oid.hex()] = str(e)
        if progress is not None:
            progress.advance(nbytes=len(stored))
    for name, value in repo.backend.list_refs("").items():
        if value.startswith("ref: "):
            continue
        if not repo.odb.has(value):
            rep.bad_refs[name] = f"points to missing commit {value}"
    reachable(repo, rep)
    return rep


@dataclass
class GcReport:
    kept: int
    removed: int
    freed_bytes: int


def gc(repo, dry_run: bool = False) -> GcReport:
    with repo.lock():
        keep = reachable(repo)
        keep_bytes = {bytes.fromhex(o) for o in keep}
        drop = [o for o in repo.backend.iter_oids() if o not in keep_bytes]
        freed = 0
        if not dry_run:
            for i in range(0, len(drop), 1024):
                freed += repo.backend.delete_many(drop[i:i + 1024])
        else:
            freed = sum(len(repo.backend.get(o) or b"") for o in drop)
        return GcReport(repo.backend.stats()["objects"] - (len(drop) if dry_run else 0), len(drop), freed)
