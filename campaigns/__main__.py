"""python -m campaigns {kill9,fuzz,concurrency,race} [count flags] [--out results.json]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m campaigns", description=__doc__)
    sub = ap.add_subparsers(dest="campaign", required=True)
    k = sub.add_parser("kill9", help="SIGKILL at random moments of ten commands")
    k.add_argument("--runs", type=int, default=1000)
    k.add_argument("--cases", default=None, help="comma-separated subset of " + ",".join(
        ["commit", "checkout", "switch", "merge", "gc", "repack", "push", "fetch", "clone", "compress"]))
    f = sub.add_parser("fuzz", help="every parser of outside bytes, with hypothesis")
    f.add_argument("--cases", type=int, default=10000, help="examples per parser")
    f.add_argument("--parsers", default=None, help="comma-separated subset")
    c = sub.add_parser("concurrency", help="processes committing, fetching, gc-ing and checking out at once")
    c.add_argument("--seconds", type=float, default=120)
    c.add_argument("--procs", type=int, default=4)
    r = sub.add_parser("race", help="diverging pushes to one S3 ref (a moto server on 127.0.0.1)")
    r.add_argument("--rounds", type=int, default=100)
    r.add_argument("--pushers", type=int, default=3)
    for p in (k, f, c, r):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=None, help="write the result as JSON here")
        p.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    a = ap.parse_args(argv)
    work = a.work or tempfile.mkdtemp(prefix=f"mvc-{a.campaign}-")
    os.makedirs(work, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.campaign == "kill9":
        from .kill9 import run
        res = run(a.runs, work, a.seed, a.cases.split(",") if a.cases else None, log)
    elif a.campaign == "fuzz":
        from .fuzz import run
        res = run(a.cases, a.seed, a.parsers.split(",") if a.parsers else None, log)
    elif a.campaign == "concurrency":
        from .concurrency import run
        res = run(a.seconds, a.procs, work, a.seed, log)
    else:
        from .race import run
        res = run(a.rounds, a.pushers, work, a.seed, log)
    out = json.dumps(res.as_dict(), indent=2)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(out + "\n")
    print(out)
    return 0 if res.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
