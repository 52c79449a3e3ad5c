"""What every campaign shares: the real `mvc` command, models to commit, the result record."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from mvc.synth import bf16_normal


def mvc_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "mvc")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "mvc"]


def mvc(*args, cwd, env=None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(mvc_cmd() + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise Failure(f"mvc {' '.join(map(str, args))} exited {res.returncode}: {_tail(res.stderr)}")
    return res


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return " / ".join(lines[-3:])[:400]


def start_moto(extra_env: dict | None = None):
    """moto's standalone S3 server on a free port of 127.0.0.1: (process, endpoint URL)."""
    import socket
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **(extra_env or {})))
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise Failure("the moto server did not start")


class Failure(Exception):
    """An invariant did not hold (a campaign counts these; it never stops on one)."""


def write_model(root: str, rng: np.random.Generator, tensors: int = 8, side: int = 1024,
                name: str = "model.safetensors", change: int | None = None) -> None:
    """A bf16 safetensors model of *tensors* square tensors, written then renamed into place; with
    *change*, only that tensor differs from a fixed base (a commit then stores one tensor, as a
    fine-tune of one layer would)."""
    base = np.random.default_rng(1234)
    header, parts, off = {}, [], 0
    for i in range(tensors):
        t = bf16_normal(base, side * side)
        if change is None or i == change:
            t = bf16_normal(rng, side * side)
        header[f"layers.{i}.weight"] = {"dtype": "BF16", "shape": [side, side], "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
        parts.append(t)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path = os.path.join(root, name)
    tmp = os.path.join(os.path.dirname(os.path.abspath(root)), f".{name}.{os.getpid()}.tmp")  # not in the work tree
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for t in parts:
            f.write(t.tobytes())
    os.replace(tmp, path)


# -- checks through the Python API (in process: a check costs no interpreter start) ------------
def _repo(root: str):
    from mvc import Repo

    return Repo(root)


def head(root: str) -> str | None:
    with _repo(root) as r:
        return r.refs.head_commit()


def rev(root: str, spec: str) -> str | None:
    from mvc.errors import MvcError

    with _repo(root) as r:
        try:
            return r.resolve(spec)
        except MvcError:
            return None


def branch(root: str) -> str | None:
    with _repo(root) as r:
        return r.refs.current_branch()


def fsck(root: str) -> None:
    """The checks of `mvc fsck`: every object intact, every ref reaching complete history."""
    from mvc.maintenance import fsck as run_fsck

    with _repo(root) as r:
        rep = run_fsck(r)
    if not rep.ok:
        why = {k: dict(list(v.items())[:2]) for k, v in (("corrupt", rep.corrupt), ("missing", rep.missing),
                                                          ("bad refs", rep.bad_refs)) if v}
        raise Failure(f"fsck failed in {root}: {json.dumps(why)[:500]}")


def clean(root: str) -> None:
    with _repo(root) as r:
        st = r.status()
    if not st.clean:
        raise Failure(f"work tree not clean: {st}"[:400])


def commit(root: str, message: str) -> str:
    with _repo(root) as r:
        return r.commit(message)


@dataclass
class Result:
    campaign: str
    command: str
    runs: int = 0
    failures: int = 0
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)  # what happened, by kind (e.g. old/new HEAD per command)
    examples: list = field(default_factory=list)  # the first few failures, one line each

    def fail(self, what: str) -> None:
        self.failures += 1
        if len(self.examples) < 20:
            self.examples.append(what[:600])

    def count(self, *keys: str) -> None:
        d = self.counts
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = d.get(keys[-1], 0) + 1

    def as_dict(self) -> dict:
        return asdict(self)
