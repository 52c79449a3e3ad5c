"""Run the mvc CLI and report this process's own peak RSS.

    python -m bench.peak OUTFILE -- MVC-ARGS...

``wait4()``/``ru_maxrss`` of a child includes its parent's high-water mark (Linux
carries it across fork and exec), so the child reads its own ``VmHWM`` from
/proc/self/status at exit and writes it, in bytes, to OUTFILE.
"""

from __future__ import annotations

import sys


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    out, sep, *args = sys.argv[1:]
    assert sep == "--"
    from mvc.cli.main import main as mvc_main

    sys.argv = ["mvc", *args]
    try:
        mvc_main()
    finally:
        with open(out, "w") as f:
            f.write(str(vm_hwm()))


if __name__ == "__main__":
    main()
