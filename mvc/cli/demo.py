"""The README's main job on bundled defaults, as `python3 dev.py demo` runs it.

1. Versioning: snapshot a generated model, edit one tensor, diff, and a bit-exact checkout.
2. Compression: the shipped demo model through the bird-bone recipe (shed, prune in waves, heal,
   NF4), each step a guarded commit, with its table of perplexity and size.

Run with ``python -m mvc.cli.demo [DIR]``. Every step is a real ``mvc`` command, echoed as it runs.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

from ..filehash import sha256_file as _sha256
from ..synth import bf16_normal, write_model


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


def run_compression(workdir: str) -> None:
    """The demo model through the bird-bone recipe (needs the compress extra)."""
    from ..compress import EXTRA

    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        print(f"# skipping compression: the 'compress' extra is not installed ({missing[0]} is missing); "
              "pip install 'mvc[compress]'")
        return
    repo = os.path.join(workdir, "bird-bone")
    print("# the shipped demo model (a 1.1 M-parameter Llama) through the bird-bone recipe")
    _mvc(workdir, "init", "--demo", repo)
    _mvc(repo, "eval")
    _mvc(repo, "compress", "run", "bird-bone")
    _mvc(repo, "log", "--oneline")
    print("# done: each step is a commit with its op record (`mvc show HEAD`); `mvc revert` undoes any of them")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mvc.cli.demo", description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", help="where to work (default: a new temporary directory)")
    ap.add_argument("--size-mib", type=int, default=256, help="size of the generated model (versioning part)")
    ap.add_argument("--versioning-only", action="store_true", help="skip the compression part")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mvc-demo-") as tmp:
        d = args.dir or tmp
        os.makedirs(d, exist_ok=True)
        run(d, args.size_mib)
        if not args.versioning_only:
            run_compression(d)


if __name__ == "__main__":
    main()
