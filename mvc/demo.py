"""The README's main job on a bundled default: snapshot, edit, diff, and a bit-exact checkout.

Run with ``python -m mvc.demo [DIR]``. Every step is a real ``mvc`` command, echoed as it runs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

from .filehash import sha256_file as _sha256
from .synth import bf16_normal, write_model


def _mvc(cwd: str, *args: str, capture: bool = False) -> str:
    print(f"$ mvc {shlex.join(args)}", flush=True)
    res = subprocess.run([sys.executable, "-m", "mvc", *args], cwd=cwd, text=True,
                         stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        raise SystemExit(f"demo step failed: mvc {shlex.join(args)} (exit {res.returncode})")
    if capture:
        print(res.stdout, end="")
    return res.stdout or ""


def edit_one_tensor(path: str, seed: int = 1) -> str:
    """Overwrite the first MLP tensor of a safetensors file in place with new values; returns its name."""
    import json
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        name = next(k for k in header if k.endswith("mlp.down_proj.weight"))
        begin, end = header[name]["data_offsets"]
        f.seek(8 + n + begin)
        f.write(bf16_normal(np.random.default_rng(seed), (end - begin) // 2).tobytes())
    return name


def run(workdir: str, size_mib: int = 256) -> None:
    env_author = os.environ.setdefault("MVC_AUTHOR", "mvc demo <demo@localhost>")
    del env_author
    model = os.path.join(workdir, "model.safetensors")
    print(f"# a {size_mib} MiB Llama-like bf16 model in {workdir}")
    _mvc(workdir, "init", ".")
    write_model(model, size_mib, seed=0)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write('{"architectures": ["LlamaForCausalLM"], "hidden_size": 2048}\n')
    first_hash = _sha256(model)
    _mvc(workdir, "commit", "-m", "base model")
    name = edit_one_tensor(model)
    print(f"# edited one tensor: {name}")
    _mvc(workdir, "status")
    _mvc(workdir, "commit", "-m", f"edit {name}")
    _mvc(workdir, "log", "--oneline")
    _mvc(workdir, "diff", "--stat", "HEAD~1", "HEAD")
    _mvc(workdir, "checkout", "HEAD~1")
    ok = _sha256(model) == first_hash
    print(f"# sha256 of the checked-out model {'matches' if ok else 'DOES NOT match'} the first version")
    _mvc(workdir, "switch", "main")
    _mvc(workdir, "fsck")
    if not ok:
        raise SystemExit(1)
    print("# done: the edit stored one tensor, and the first version came back bit-for-bit")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mvc.demo", description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", help="where to work (default: a new temporary directory)")
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args(argv)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        run(args.dir, args.size_mib)
    else:
        with tempfile.TemporaryDirectory(prefix="mvc-demo-") as d:
            run(d, args.size_mib)


if __name__ == "__main__":
    main()
