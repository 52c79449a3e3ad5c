#!/usr/bin/env python3
"""Set up and run mvc with only Python >= 3.11 and git on the machine.

    python3 dev.py demo [ARGS]   create .venv if needed, then the main job on bundled defaults (versioning,
                                 then the bird-bone compression recipe on the demo model)
    python3 dev.py test [ARGS]   create .venv if needed, then lint and run the test suite
    python3 dev.py bench [ARGS]  create .venv if needed, then run the benchmarks

The virtual environment is (re)installed when pyproject.toml, constraints.txt, setup.py,
the C kernels (mvc/store/_kernels.c) or this file change. torch is pinned through constraints.txt: unpinned, pip would
pull a multi-GB CUDA build.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
PY = os.path.join(VENV, "bin", "python")
STAMP = os.path.join(VENV, ".deps-stamp")


def deps_hash() -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt", "dev.py", "setup.py", "mvc/store/_kernels.c"):
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py itself may run on an older python3
        sys.exit(f"mvc needs Python 3.11 or newer (this is {sys.version.split()[0]})")
    want = deps_hash()
    if os.path.exists(PY) and os.path.exists(STAMP) and open(STAMP).read() == want:
        return
    if not os.path.exists(PY):
        print(f"creating {VENV}", flush=True)
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(f"could not create {VENV} ({e}); on Debian/Ubuntu: apt-get install python3-venv")
    print("installing mvc and its dependencies (torch pinned to the CPU build)", flush=True)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["-c", "constraints.txt", "torch==2.13.0", "-e", ".[compress,dev,report]"], cwd=ROOT,
                   check=True)
    with open(STAMP, "w") as f:
        f.write(want)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "bench"):
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    ensure_venv()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if cmd == "demo":
        run = [[PY, "-m", "mvc.cli.demo", *args]]
    elif cmd == "bench":
        run = [[PY, "-m", "bench", *args]]
    else:
        run = [[PY, "-m", "ruff", "check", "mvc", "tests", "bench", "campaigns", "dev.py"], [PY, "-m", "pytest", *args]]
    for c in run:
        rc = subprocess.run(c, cwd=ROOT, env=env).returncode
        if rc:
            sys.exit(rc)


if __name__ == "__main__":
    main()
