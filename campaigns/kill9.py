"""SIGKILL at random moments of commit, checkout, switch, merge, gc, repack, push, fetch, clone
and a compression step. After every kill: `fsck` passes, HEAD (or the remote ref) is the old or
the new one, and running the same command again completes without --force, leaving a clean
work tree. Workspaces start afresh every EPOCH runs, so a long campaign's store stays small."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import time

import numpy as np

from .common import Failure, Result, branch, clean, commit, fsck, head, mvc, mvc_cmd, rev, write_model

CASES = ["commit", "checkout", "switch", "merge", "gc", "repack", "push", "fetch", "clone", "compress"]
EPOCH = 50
TENSORS, SIDE = 8, 1024  # a 16 MiB bf16 model: each command has real work to be killed in


def edit_model(root: str, rng, k: int) -> None:
    """Replace tensor *k* of the work tree's model with new values (the rest stay as they are)."""
    from mvc.synth import bf16_normal

    path = os.path.join(root, "model.safetensors")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + n])[f"layers.{k}.weight"]["data_offsets"]
    data[8 + n + start:8 + n + end] = bf16_normal(rng, (end - start) // 2).tobytes()
    tmp = os.path.join(os.path.dirname(root), ".edit.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Workspace:
    def __init__(self, work: str, rng, demo_template: str | None):
        self.work = work
        self.rng = rng
        self.repo = os.path.join(work, "repo")
        self.remote = os.path.join(work, "remote")
        self.url = "file://" + self.remote
        self.peer = os.path.join(work, "peer")
        self.demo = os.path.join(work, "demo")
        self.n = 0
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(self.repo)
        from mvc import Repo
        from mvc.remote.backends import FileRemote
        from mvc.remote.sync import add_remote, clone, push

        Repo.init(self.repo).close()
        write_model(self.repo, rng, TENSORS, SIDE)
        commit(self.repo, "base")
        with Repo(self.repo) as r:
            r.create_branch("side")
        self.commit("main 1")
        with Repo(self.repo) as r:
            r.switch("side")
        self.commit("side 1")
        with Repo(self.repo) as r:
            r.switch("main")
            add_remote(r, "origin", self.url)
            push(r, FileRemote(self.remote, create=True), "origin", "main")
        clone(self.url, self.peer).close()
        if demo_template:
            shutil.copytree(demo_template, self.demo, symlinks=True)

    def commit(self, msg: str, root: str | None = None) -> str:
        root = root or self.repo
        self.n += 1
        edit_model(root, self.rng, self.n % TENSORS)
        return commit(root, msg)


def _remote_ref(ws: Workspace) -> str | None:
    p = os.path.join(ws.remote, "refs", "heads", "main")
    return open(p).read().strip() if os.path.exists(p) else None


def _remote_complete(ws: Workspace, tip: str) -> None:
    """Every object the remote ref reaches is listed by the remote's indexes."""
    from mvc import Repo
    from mvc.graph import closure
    from mvc.remote.backends import FileRemote
    from mvc.remote.sync import remote_index

    with Repo(ws.repo) as r:
        have = remote_index(r, FileRemote(ws.remote), "origin")
        lacking = [o for o in closure(r.odb.get, [(tip, "commit")]) if o not in have]
    if lacking:
        raise Failure(f"the remote ref names {tip[:12]} but the remote lacks {len(lacking)} of its objects")


def _rerun(argv: list[str], cwd: str, ok_if: str | None = None) -> subprocess.CompletedProcess:
    res = mvc(*argv, cwd=cwd, check=False)
    if "Traceback" in res.stderr:
        raise Failure(f"re-run of mvc {' '.join(argv)} printed a traceback: {res.stderr.strip()[-300:]}")
    if res.returncode != 0 and not (ok_if and ok_if in res.stderr):
        raise Failure(f"re-run of mvc {' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()[-300:]}")
    return res


class Case:
    """prepare() sets the scene and returns (argv, cwd); check(outcome) verifies after the kill."""

    def __init__(self, ws: Workspace, i: int):
        self.ws, self.i = ws, i


class Commit(Case):
    def prepare(self):
        self.old = head(self.ws.repo)
        edit_model(self.ws.repo, self.ws.rng, self.i % TENSORS)
        return ["-q", "commit", "-m", f"c{self.i}"], self.ws.repo

    def check(self):
        fsck(self.ws.repo)
        h = head(self.ws.repo)
        if h != self.old:
            if rev(self.ws.repo, "HEAD~1") != self.old:
                raise Failure(f"HEAD {h[:12]} is neither the old commit nor a child of it")
            _rerun(["-q", "commit", "-m", f"c{self.i}"], self.ws.repo, ok_if="nothing to commit")
            return "new"
        _rerun(["-q", "commit", "-m", f"c{self.i}"], self.ws.repo)
        return "old"


class Checkout(Case):
    def prepare(self):
        self.old = head(self.ws.repo)
        self.target = rev(self.ws.repo, "HEAD~1")
        return ["-q", "checkout", self.target], self.ws.repo

    def check(self):
        fsck(self.ws.repo)
        h = head(self.ws.repo)
        if h not in (self.old, self.target):
            raise Failure(f"HEAD {h} is neither {self.old[:12]} nor {self.target[:12]}")
        _rerun(["-q", "checkout", self.target], self.ws.repo)
        clean(self.ws.repo)
        _switch(self.ws.repo, "main")
        return "old" if h == self.old else "new"


def _switch(root: str, name: str) -> None:
    from mvc import Repo

    with Repo(root) as r:
        r.switch(name)


class Switch(Case):
    def prepare(self):
        return ["-q", "switch", "side"], self.ws.repo

    def check(self):
        fsck(self.ws.repo)
        b = branch(self.ws.repo)
        if b not in ("main", "side"):
            raise Failure(f"HEAD is on {b!r}, neither main nor side")
        _rerun(["-q", "switch", "side"], self.ws.repo)
        clean(self.ws.repo)
        _switch(self.ws.repo, "main")
        return "old" if b == "main" else "new"


class Merge(Case):
    def prepare(self):
        from mvc import Repo

        ws, br = self.ws, f"m{self.i}"
        with Repo(ws.repo) as r:
            r.switch(br, create=True)
        edit_model(ws.repo, ws.rng, self.i % TENSORS)
        self.theirs = commit(ws.repo, f"on {br}")
        _switch(ws.repo, "main")
        edit_model(ws.repo, ws.rng, (self.i + TENSORS // 2) % TENSORS)
        self.old = commit(ws.repo, f"main before merging {br}")
        return ["-q", "merge", br, "-m", f"merge {br}"], ws.repo

    def check(self):
        ws = self.ws
        fsck(ws.repo)
        h = head(ws.repo)
        if h != self.old:
            parents = [rev(ws.repo, f"HEAD^{n}") for n in (1, 2)]
            if parents != [self.old, self.theirs]:
                raise Failure(f"HEAD {h[:12]} is neither the old commit nor the merge")
        _rerun(["-q", "merge", f"m{self.i}", "-m", f"merge m{self.i}"], ws.repo)
        if rev(ws.repo, "HEAD^2") != self.theirs:
            raise Failure("the re-run merge is not a merge of the branch")
        clean(ws.repo)
        return "old" if h == self.old else "new"


class Maintenance(Case):
    cmd = "gc"

    def prepare(self):
        self.old = head(self.ws.repo)
        return ["-q", self.cmd], self.ws.repo

    def check(self):
        fsck(self.ws.repo)
        if head(self.ws.repo) != self.old:
            raise Failure(f"{self.cmd} moved HEAD")
        _rerun(["-q", self.cmd], self.ws.repo)
        fsck(self.ws.repo)
        return "done"


class Repack(Maintenance):
    cmd = "repack"


class Push(Case):
    def prepare(self):
        self.old_remote = _remote_ref(self.ws)
        self.new = self.ws.commit(f"p{self.i}")
        return ["-q", "push"], self.ws.repo

    def check(self):
        fsck(self.ws.repo)
        ref = _remote_ref(self.ws)
        if ref not in (self.old_remote, self.new):
            raise Failure(f"remote ref {ref} is neither the old nor the pushed commit")
        _remote_complete(self.ws, ref)
        _rerun(["-q", "push"], self.ws.repo)
        if _remote_ref(self.ws) != self.new:
            raise Failure("the re-run push did not move the remote ref")
        _remote_complete(self.ws, self.new)
        return "old" if ref == self.old_remote else "new"


class Fetch(Case):
    def prepare(self):
        from mvc import Repo
        from mvc.remote.backends import FileRemote
        from mvc.remote.sync import push

        self.new = self.ws.commit(f"f{self.i}")
        with Repo(self.ws.repo) as r:
            push(r, FileRemote(self.ws.remote), "origin", "main")
        return ["-q", "fetch"], self.ws.peer

    def check(self):
        fsck(self.ws.peer)
        _rerun(["-q", "fetch"], self.ws.peer)
        if rev(self.ws.peer, "origin/main") != self.new:
            raise Failure("after the re-run fetch, origin/main is not the remote's commit")
        fsck(self.ws.peer)
        return "done"


class Clone(Case):
    def prepare(self):
        self.dest = os.path.join(self.ws.work, f"clone{self.i}")
        self.want = _remote_ref(self.ws)
        return ["-q", "clone", self.ws.url, self.dest], self.ws.work

    def check(self):
        interrupted = os.path.exists(os.path.join(self.dest, ".mvc", "cloning"))
        if os.path.exists(self.dest) and os.listdir(self.dest) and not interrupted:
            outcome = "new"  # it had finished
        else:
            _rerun(["-q", "clone", self.ws.url, self.dest], self.ws.work)
            outcome = "resumed" if interrupted else "old"
        fsck(self.dest)
        if head(self.dest) != self.want:
            raise Failure("the clone's HEAD is not the remote's commit")
        clean(self.dest)
        shutil.rmtree(self.dest)
        return outcome


class Compress(Case):
    def prepare(self):
        self.old = head(self.ws.demo)
        return ["-q", "compress", "prune", "--method", "magnitude", "--sparsity", "0.3", "--max-drop", "off"], \
            self.ws.demo

    def check(self):
        fsck(self.ws.demo)
        h = head(self.ws.demo)
        if h != self.old and rev(self.ws.demo, "HEAD~1") != self.old:
            raise Failure(f"HEAD {h[:12]} is neither the old commit nor a child of it")
        _rerun(["-q", "compress", "prune", "--method", "magnitude", "--sparsity", "0.3", "--max-drop", "off"],
               self.ws.demo)
        clean(self.ws.demo)
        return "old" if h == self.old else "new"


KINDS = {"commit": Commit, "checkout": Checkout, "switch": Switch, "merge": Merge, "gc": Maintenance,
         "repack": Repack, "push": Push, "fetch": Fetch, "clone": Clone, "compress": Compress}


def run(runs: int, work: str, seed: int = 0, cases: list[str] | None = None, log=print) -> Result:
    cases = list(cases or CASES)
    if "compress" in cases and importlib.util.find_spec("torch") is None:
        cases.remove("compress")  # the compress extra is not installed
        log("kill9: no torch here, so no compression step")
    os.makedirs(work, exist_ok=True)
    res = Result("kill9", f"python -m campaigns kill9 --runs {runs} --seed {seed}")
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    t0 = time.monotonic()
    demo_template = None
    if "compress" in cases:
        demo_template = os.path.join(work, "demo-template")
        shutil.rmtree(demo_template, ignore_errors=True)
        mvc("init", "--demo", demo_template, cwd=work if os.path.isdir(work) else "/")
    ws_dir = os.path.join(work, "ws")
    others = [c for c in cases if c != "compress"]
    schedule = (others * (40 // max(1, len(others))))[:39] + ["compress"] if "compress" in cases else others
    if not others:
        schedule = ["compress"]
    durations: dict[str, float] = {}
    t = time.monotonic()
    mvc("--version", cwd=work)
    startup = time.monotonic() - t  # the interpreter and mvc's imports
    ws = None
    for n in range(runs):
        if n % EPOCH == 0:
            ws = Workspace(ws_dir, rng, demo_template)
            durations.clear()  # timed again in each workspace: the machine's load changes
        kind = schedule[n % len(schedule)]
        case = KINDS[kind](ws, n)
        try:
            argv, cwd = case.prepare()
            if kind not in durations:  # the first time: measure how long it takes, unkilled
                t = time.monotonic()
                mvc(*argv, cwd=cwd)
                durations[kind] = time.monotonic() - t
                case.check()  # and back to where a run starts
                case = KINDS[kind](ws, n + runs)
                argv, cwd = case.prepare()
            proc = subprocess.Popen(mvc_cmd() + argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # most kills land after the interpreter has started (where the work is), some before
            dur, start = durations[kind], min(startup, 0.8 * durations[kind])
            time.sleep(rnd.uniform(start, 1.05 * dur) if rnd.random() < 0.85 else rnd.uniform(0, start))
            proc.send_signal(signal.SIGKILL)
            finished = proc.wait() == 0
            outcome = case.check()
            res.count(kind, "finished before the kill" if finished else outcome)
        except Failure as e:
            res.fail(f"{kind} (run {n}): {e}")
            log(f"kill9: FAILED {kind} (run {n}): {e}")
            res.count(kind, "FAILED")
            ws = Workspace(ws_dir, rng, demo_template)  # a broken workspace would fail every later run
        res.runs += 1
        if (n + 1) % 50 == 0:
            log(f"kill9: {n + 1}/{runs} runs, {res.failures} failures, {time.monotonic() - t0:.0f} s")
    res.seconds = round(time.monotonic() - t0, 1)
    res.counts["durations_s (last workspace)"] = {k: round(v, 2) for k, v in durations.items()}
    res.counts["killed while running"] = res.runs - sum(v.get("finished before the kill", 0)
                                                        for k, v in res.counts.items() if k in KINDS)
    shutil.rmtree(work, ignore_errors=True)
    return res
