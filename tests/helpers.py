"""Test helpers: write safetensors files without torch, hash files, run the CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from mvc.cli.main import cli
from mvc.filehash import sha256_file


def write_safetensors(path, tensors: dict, metadata: dict | None = None, pad: bool = True) -> None:
    """tensors: name -> (dtype name, shape, raw bytes), written in the given order."""
    header, off, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(bytes(data))
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_f32(path, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file of float32 numpy arrays (name -> array)."""
    write_safetensors(path, {k: ("F32", v.shape, v.astype("<f4").tobytes()) for k, v in tensors.items()},
                      metadata=metadata)


def bf16(rng, shape, std=0.02) -> bytes:
    x = (rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * std).view(np.uint32) >> 16
    return x.astype("<u2").tobytes()


def f32(rng, shape, std=0.02) -> bytes:
    return (rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * std).astype("<f4").tobytes()


sha256 = sha256_file

def tree_hashes(root) -> dict[str, str]:
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in (".mvc", ".git")]
        for name in files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = sha256(p)
    return out


def mvc(*args, cwd=None, ok=True):
    """Run the CLI in-process (fast). Returns the click Result."""
    runner = CliRunner()
    argv = (["-C", str(cwd)] if cwd is not None else []) + [str(a) for a in args]
    res = runner.invoke(cli, argv, catch_exceptions=False)
    if ok and res.exit_code != 0:
        raise AssertionError(f"mvc {' '.join(argv)} failed ({res.exit_code}): {res.output}")
    return res


def mvc_cmd() -> list[str]:
    """The real `mvc` console command of this environment, as an argv prefix."""
    exe = os.path.join(os.path.dirname(sys.executable), "mvc")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "mvc"]


def mvc_proc(*args, cwd=None, check=False, env=None, **kw) -> subprocess.CompletedProcess:
    """Run the real `mvc` console command in a subprocess."""
    return subprocess.run(mvc_cmd() + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          check=check, env=env, **kw)


def open_repo(path):
    """Repo at *path*, with user paths relative to it (as `mvc -C path` has them)."""
    from mvc import Repo

    r = Repo(str(path))
    r.cwd = str(path)
    return r
