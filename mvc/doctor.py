"""Environment and repository health checks, each with a fix suggestion. Returns data only."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from .errors import MvcError


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


REQUIRED = ["safetensors", "numpy", "zstandard", "blake3", "click", "lmdb", "pathspec", "tqdm", "pygit2",
            "boto3"]
#: the `compress` extra: only compression and evaluation need it
COMPRESS = ["torch", "transformers", "bitsandbytes", "accelerate", "peft", "pyyaml"]


def _tool_version(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment_checks(check_cuda: bool = True) -> list[Check]:
    out = []
    v = sys.version_info
    out.append(Check("python", "ok" if v >= (3, 11) else "fail", sys.version.split()[0],
                     "" if v >= (3, 11) else "install Python 3.11 or newer"))
    for pkg in REQUIRED + COMPRESS:
        try:
            out.append(Check(pkg, "ok", md.version(pkg)))
        except md.PackageNotFoundError:
            if pkg in COMPRESS:
                out.append(Check(f"{pkg} (compress extra)", "warn", "not installed: versioning works, "
                                 "compression and evaluation do not",
                                 "pip install -c constraints.txt 'mvc[compress]'  (torch pinned to the CPU build)"))
            else:
                out.append(Check(pkg, "fail", "not installed", f"pip install -c constraints.txt {pkg}"))
    git = _tool_version(["git", "--version"])
    out.append(Check("git", "ok" if git else "fail", git or "not found",
                     "" if git else "install git (apt-get install git)"))
    lfs = _tool_version(["git", "lfs", "version"]) if git else None
    out.append(Check("git-lfs (optional)", "ok" if lfs else "warn", lfs or "not found",
                     "" if lfs else "only needed for side-by-side benchmarks: apt-get install git-lfs"))
    if check_cuda:
        try:
            import torch

            cuda = torch.cuda.is_available()
            out.append(Check("CUDA (optional)", "ok" if cuda else "warn",
                             torch.cuda.get_device_name(0) if cuda else "no GPU; everything runs on the CPU"))
        except Exception as e:  # torch missing or broken: already reported above
            out.append(Check("CUDA (optional)", "warn", f"cannot ask torch ({type(e).__name__})"))
    return out


def repository_checks(path: str) -> list[Check]:
    from .graph import reachable
    from .maintenance import FsckReport
    from .repo import Repo
    from .state import CFG_FORMAT, REPO_DIR, TMP_SUFFIX

    try:
        repo = Repo(path)
    except MvcError as e:
        return [Check("repository", "warn" if "not an mvc repository" in str(e) else "fail", str(e),
                      e.hint or "")]
    out = [Check("repository", "ok", f"{repo.root} (format {repo.config[CFG_FORMAT]})")]
    stats = repo.backend.stats()
    out.append(Check("store", "ok", f"{stats['objects']} objects, {stats['stored_bytes']} bytes stored"))
    pack_stats = getattr(repo.backend, "pack_stats", None)
    if pack_stats is not None:
        ps = pack_stats()
        garbage = ps["pack_bytes"] - ps["packed_bytes"]
        heavy = ps["pack_bytes"] > 64 << 20 and garbage > ps["pack_bytes"] // 2
        out.append(Check("packs", "warn" if heavy else "ok",
                         f"{ps['packs']} pack files, {ps['pack_bytes']} bytes, {ps['packed_bytes']} of them in use",
                         "run `mvc gc` to give the rest back" if heavy else ""))
    head = repo.refs.head_commit()
    where = head[:12] if head else "(no commits)"
    out.append(Check("HEAD", "ok", f"{repo.refs.current_branch() or 'detached'} at {where}"))
    rep = FsckReport()
    try:
        reachable(repo, rep)
    except MvcError as e:
        rep.corrupt["?"] = str(e)
    bad = len(rep.missing) + len(rep.corrupt)
    out.append(Check("connectivity", "ok" if not bad else "fail",
                     "every ref reaches complete history" if not bad else f"{bad} objects missing or damaged",
                     "" if not bad else "run `mvc fsck` for the list"))
    tmp = [os.path.join(d, f) for d, _, fs in os.walk(repo.root) if REPO_DIR not in d
           for f in fs if f.endswith(TMP_SUFFIX)]
    if tmp:
        out.append(Check("leftovers", "warn", f"{len(tmp)} temporary files from an interrupted checkout",
                         "delete the *.mvc-tmp files"))
    return out
