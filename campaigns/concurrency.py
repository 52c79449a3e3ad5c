"""Processes committing, fetching, gc-ing, repacking and checking out in one repository for a fixed
time. A command may be refused (the repository is busy: exit 4, or nothing to commit), never
crash; at the end fsck passes (no torn ref, every object whole) and every commit a command
reported is still in main's history (no reachable object lost)."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import numpy as np

from .common import Failure, Result, commit, fsck, mvc, write_model


def run(seconds: float, procs: int, work: str, seed: int = 0, log=print) -> Result:
    from mvc import Repo
    from mvc.remote.backends import FileRemote
    from mvc.remote.sync import add_remote, push

    res = Result("concurrency", f"python -m campaigns concurrency --seconds {seconds:g} --procs {procs} --seed {seed}")
    rng = np.random.default_rng(seed)
    repo, upstream = os.path.join(work, "repo"), os.path.join(work, "upstream")
    remote = os.path.join(work, "remote")
    for root in (repo, upstream):
        os.makedirs(root)
        Repo.init(root).close()
    committers = max(1, procs - 3)
    for k in range(committers):
        write_model(repo, rng, 4, 512, name=f"m{k}.safetensors")
    commit(repo, "base")
    write_model(upstream, rng, 4, 512, name="up.safetensors")
    commit(upstream, "upstream base")
    with Repo(upstream) as r:
        push(r, FileRemote(remote, create=True), "origin", "main")
    with Repo(repo) as r:
        add_remote(r, "origin", "file://" + remote)

    lock = threading.Lock()
    committed: list[str] = []
    deadline = time.monotonic() + seconds

    def note(kind: str, proc) -> None:
        with lock:
            if "Traceback" in proc.stderr:
                res.fail(f"{kind}: traceback: {proc.stderr.strip()[-300:]}")
                res.count(kind, "TRACEBACK")
            elif proc.returncode == 0:
                res.count(kind, "ok")
            else:
                first = (proc.stderr.strip().splitlines() or ["?"])[0]
                if len(proc.stderr.strip().splitlines()) > 2:
                    res.fail(f"{kind}: more than a one-line error: {proc.stderr.strip()[-300:]}")
                res.count(kind, f"refused (exit {proc.returncode}): {first[:70]}")
            res.runs += 1

    def committer(k: int) -> None:
        r = np.random.default_rng(seed + 100 + k)
        while time.monotonic() < deadline:
            write_model(repo, r, 4, 512, name=f"m{k}.safetensors")
            p = mvc("commit", "-m", f"c{k}", "--json", f"m{k}.safetensors", cwd=repo, check=False)
            note("commit", p)
            if p.returncode == 0:
                with lock:
                    committed.append(json.loads(p.stdout)["id"])

    def pusher() -> None:  # a teammate: upstream commits and pushes, so fetch has something new
        r = np.random.default_rng(seed + 7)
        while time.monotonic() < deadline:
            write_model(upstream, r, 4, 512, name="up.safetensors")
            commit(upstream, "upstream")
            note("push (upstream)", mvc("push", cwd=upstream, check=False))
            note("fetch", mvc("fetch", cwd=repo, check=False))

    def maintainer() -> None:
        rnd = random.Random(seed + 1)
        while time.monotonic() < deadline:
            cmd = "repack" if rnd.random() < 0.25 else "gc"
            note(cmd, mvc(cmd, cwd=repo, check=False))

    def checker() -> None:
        rnd = random.Random(seed + 2)
        while time.monotonic() < deadline:
            if rnd.random() < 0.5:
                note("checkout REV -- PATH", mvc("checkout", "HEAD~1", "--", "m0.safetensors", cwd=repo, check=False))
            else:
                note("status", mvc("status", "--json", cwd=repo, check=False))

    with Repo(upstream) as r:
        add_remote(r, "origin", "file://" + remote)
    threads = [threading.Thread(target=committer, args=(k,)) for k in range(committers)]
    threads += [threading.Thread(target=f) for f in (pusher, maintainer, checker)][: max(1, procs - committers)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        fsck(repo)
        with Repo(repo) as r:
            main = r.resolve("main")
            lost = [c for c in committed if not r.is_ancestor(c, main)]
        if lost:
            raise Failure(f"{len(lost)} reported commits are not in main's history (first {lost[0][:12]})")
        res.counts["commits recorded"] = len(committed)
    except Failure as e:
        res.fail(str(e))
    res.seconds = round(time.monotonic() - t0, 1)
    log(f"concurrency: {res.runs} commands, {len(committed)} commits, {res.failures} failures")
    return res
