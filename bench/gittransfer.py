"""Models through `git push` and `git clone`: mvc's filter with a paired file:// mvc remote against
Git LFS with its file:// transfer, on the same model and the same one-tensor edit. Bytes are
counted where the server keeps them (the mvc remote's directory; the bare origin's lfs/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import numpy as np

from mvc.filehash import sha256_file as sha256
from mvc.synth import bf16_normal, write_model


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _edit_one_tensor(path: str, seed: int) -> str:
    """Give the middle tensor of the model new values; returns its name."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        names = sorted(k for k in header if k != "__metadata__")
        name = names[len(names) // 2]
        start, end = header[name]["data_offsets"]
        f.seek(8 + n + start)
        f.write(bf16_normal(np.random.default_rng(seed), (end - start) // 2).tobytes())
    return name


def _sh(args, cwd, env):
    subprocess.run(args, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_git_transfer(size_mib: int, workdir: str, mvc_cmd: list[str]) -> dict:
    env = dict(os.environ, HOME=os.path.join(workdir, "home"), GIT_CONFIG_NOSYSTEM="1")
    os.makedirs(env["HOME"])
    _sh(["git", "config", "--global", "user.email", "b@example.com"], workdir, env)
    _sh(["git", "config", "--global", "user.name", "bench"], workdir, env)
    v1 = os.path.join(workdir, "v1.safetensors")
    write_model(v1, size_mib, seed=0)
    v2 = os.path.join(workdir, "v2.safetensors")
    shutil.copyfile(v1, v2)
    edited = _edit_one_tensor(v2, 1)
    out = {"size_bytes": os.path.getsize(v1), "edited_tensor": edited}
    for system in ("mvc", "git-lfs"):
        if system == "git-lfs" and shutil.which("git-lfs") is None:
            out[system] = {"failed": "git-lfs is not installed"}
            continue
        root = os.path.join(workdir, system)
        origin, a, b = os.path.join(root, "origin.git"), os.path.join(root, "a"), os.path.join(root, "b")
        os.makedirs(a)
        _sh(["git", "init", "-q", "--bare", "-b", "main", origin], root, env)
        _sh(["git", "init", "-q", "-b", "main"], a, env)
        _sh(["git", "remote", "add", "origin", "file://" + origin], a, env)
        if system == "mvc":
            server = os.path.join(root, "mvc-remote")
            _sh(mvc_cmd + ["git", "install"], a, env)
            _sh(mvc_cmd + ["git", "track", "*.safetensors"], a, env)
            _sh(mvc_cmd + ["remote", "add", "origin", "file://" + server], a, env)
            _sh(["git", "add", ".mvcconfig"], a, env)
        else:
            server = os.path.join(origin, "lfs")
            _sh(["git", "lfs", "install"], a, env)
            _sh(["git", "lfs", "track", "*.safetensors"], a, env)
        _sh(["git", "add", ".gitattributes"], a, env)
        r = {}
        for i, src in enumerate((v1, v2)):
            shutil.copyfile(src, os.path.join(a, "model.safetensors"))
            _sh(["git", "add", "model.safetensors"], a, env)
            _sh(["git", "commit", "-q", "-m", f"v{i + 1}"], a, env)
            before = _tree_bytes(server) if os.path.exists(server) else 0
            t = time.perf_counter()
            _sh(["git", "push", "-q", "origin", "main"], a, env)
            r[f"push_v{i + 1}_s"] = time.perf_counter() - t
            r[f"push_v{i + 1}_bytes"] = _tree_bytes(server) - before
        t = time.perf_counter()
        _sh(["git", "clone", "-q", "file://" + origin, b], root, env)
        if system == "mvc":
            _sh(mvc_cmd + ["git", "install"], b, env)
        r["clone_s"] = time.perf_counter() - t
        r["clone_bit_exact"] = sha256(os.path.join(b, "model.safetensors")) == sha256(v2)
        t = time.perf_counter()
        _sh(["git", "checkout", "-q", "HEAD~1", "--", "model.safetensors"], b, env)
        r["checkout_previous_s"] = time.perf_counter() - t
        r["previous_bit_exact"] = sha256(os.path.join(b, "model.safetensors")) == sha256(v1)
        out[system] = r
    return out


def render(res: dict) -> str:
    lines = [f"model: {res['size_bytes'] / 2**20:.0f} MiB of bf16; v2 = v1 with `{res['edited_tensor']}` changed", "",
             "| system | v1 push: bytes at the server | time | v2 (one tensor) push: bytes | time | clone + files | "
             "older version on demand | bit-exact |", "|---|---|---|---|---|---|---|---|"]
    for system in ("mvc", "git-lfs"):
        r = res.get(system, {})
        if "failed" in r:
            lines.append(f"| {system} | {r['failed']} | | | | | | |")
            continue
        exact = "yes" if r["clone_bit_exact"] and r["previous_bit_exact"] else "no"
        lines.append(f"| {system} | {r['push_v1_bytes'] / 2**20:.1f} MiB | {r['push_v1_s']:.1f} s | "
                     f"{r['push_v2_bytes'] / 2**20:.2f} MiB | {r['push_v2_s']:.1f} s | {r['clone_s']:.1f} s | "
                     f"{r['checkout_previous_s']:.1f} s | {exact} |")
    return "\n".join(lines)
