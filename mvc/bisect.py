"""Bisect: find the commit that introduced a regression, by Git's rules.

State lives in the store (kv key ``bisect``) so it survives between commands.
Candidates are the commits reachable from the bad one and from no good one; the
next candidate is the one that splits them most evenly, so a linear history of
N commits takes about log2(N) evaluations.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from .errors import MvcError, UsageError
from .state import KV_BISECT


@dataclass
class BisectState:
    start: str  # what HEAD was when bisect started: "ref: refs/heads/x" or a commit id
    bad: str | None = None
    good: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


@dataclass
class Step:
    """Where bisect stands: the next candidate to test, or the answer."""

    candidate: str | None = None
    remaining: int = 0  # candidates left (bad included)
    steps_left: int = 0  # about log2(remaining)
    first_bad: str | None = None
    maybe: list[str] = field(default_factory=list)  # only skipped commits left: any of these
    evaluations: int = 0


def load_state(repo) -> BisectState | None:
    raw = repo.backend.kv_get(KV_BISECT)
    return BisectState(**json.loads(raw)) if raw else None


def _save(repo, st: BisectState | None) -> None:
    repo.backend.kv_put_many({KV_BISECT: json.dumps(vars(st)).encode() if st else None})


def _require(repo) -> BisectState:
    st = load_state(repo)
    if st is None:
        raise UsageError("not bisecting", hint="start with `mvc bisect start [BAD [GOOD...]]`")
    return st


def next_step(repo, st: BisectState) -> Step:
    if st.bad is None or not st.good:
        return Step()
    excluded: set[str] = set()
    for g in st.good:
        excluded |= repo.ancestors(g)
    cands = repo.ancestors(st.bad) - excluded
    if st.bad in excluded:
        raise MvcError(f"the bad commit {st.bad[:12]} is an ancestor of a good one",
                       hint="check the good and bad marks (`mvc bisect log`)")
    testable = [c for c in cands if c != st.bad and c not in st.skip]
    if not testable:
        others = sorted(c for c in cands if c != st.bad)
        if not others:
            return Step(first_bad=st.bad, remaining=1)
        return Step(maybe=[*others, st.bad], remaining=len(cands))
    n = len(cands)
    best, best_score = None, -1
    for c in sorted(testable):  # sorted: the same choice every time
        w = len(repo.ancestors(c) & cands)
        score = min(w, n - w)
        if score > best_score:
            best, best_score = c, score
    return Step(candidate=best, remaining=n, steps_left=max(0, math.ceil(math.log2(n))) if n > 1 else 0)


def start(repo, bad: str | None, good: list[str]) -> Step:
    if load_state(repo) is not None:
        raise UsageError("a bisect is already running", hint="`mvc bisect reset` ends it")
    head = repo.backend.get_ref("HEAD") or ""
    st = BisectState(start=head)
    st.log.append("bisect start")
    if bad:
        st.bad = repo.resolve(bad)
        st.log.append(f"bisect bad {st.bad}")
    for g in good:
        st.good.append(repo.resolve(g))
        st.log.append(f"bisect good {st.good[-1]}")
    step = next_step(repo, st)  # validates the marks before anything is saved
    _save(repo, st)
    return _go(repo, step)


def mark(repo, term: str, rev: str | None) -> Step:
    st = _require(repo)
    oid = repo.resolve(rev or "HEAD")
    if term == "bad":
        st.bad = oid
    elif term == "good":
        st.good.append(oid)
    elif term == "skip":
        st.skip.append(oid)
    else:
        raise UsageError(f"unknown bisect term {term!r}")
    step = next_step(repo, st)
    st.log.append(f"bisect {term} {oid}")
    _save(repo, st)
    return _go(repo, step)


def _go(repo, step: Step) -> Step:
    if step.candidate is not None and repo.refs.head_commit() != step.candidate:
        repo.checkout(step.candidate)
    return step


def reset(repo) -> str | None:
    """End the bisect and go back to where it started (the branch, if HEAD was on one)."""
    st = _require(repo)
    if st.start.startswith("ref: refs/heads/"):
        branch = st.start[len("ref: refs/heads/"):]
        if repo.refs.get("refs/heads/" + branch) is not None:
            repo.checkout(branch)
    elif st.start:
        repo.checkout(st.start)
    _save(repo, None)
    return st.start


def classify(code: int) -> str:
    """Git's bisect-run contract: 0 good, 125 skip, 1-127 bad, anything else aborts."""
    if code == 0:
        return "good"
    if code == 125:
        return "skip"
    if 1 <= code <= 127:
        return "bad"
    return "abort"


def evaluate(repo, argv: list[str], env: dict, metric: bool, threshold: float | None,
             higher_is_better: bool) -> tuple[str, str]:
    """Run the user's command on the checked-out candidate; (verdict, detail)."""
    try:
        res = subprocess.run(argv, cwd=repo.root, env=env, capture_output=metric, text=True)
    except OSError as e:
        raise MvcError(f"cannot run {argv[0]!r}: {e.strerror}") from e
    if not metric:
        verdict = classify(res.returncode)
        return verdict, f"exit {res.returncode}"
    if res.returncode != 0:
        return "skip", f"metric command exited {res.returncode}"
    lines = res.stdout.strip().splitlines()
    try:
        value = float(lines[-1].split()[-1])
    except (IndexError, ValueError):
        return "skip", f"metric command printed no number ({(lines or [''])[-1][:60]!r})"
    ok = value >= threshold if higher_is_better else value <= threshold
    return ("good" if ok else "bad"), f"metric {value:g} ({'>=' if higher_is_better else '<='} {threshold:g}: {ok})"


def run(repo, argv: list[str], env: dict, metric: bool = False, threshold: float | None = None,
        higher_is_better: bool = False, on_step=None, evaluator=None) -> Step:
    """Evaluate candidates until the first bad commit is known. *on_step(oid, verdict, detail)* reports.

    *evaluator(oid) -> (verdict, detail)*, when given, replaces running *argv* (the repository's
    default evaluation, measured from the store).
    """
    st = _require(repo)
    if metric and threshold is None:
        raise UsageError("--metric needs --threshold")
    step = next_step(repo, st)
    if step.candidate is None and step.first_bad is None and not step.maybe:
        raise UsageError("bisect run needs a bad and at least one good commit",
                         hint="`mvc bisect bad REV` and `mvc bisect good REV` first")
    if evaluator is None:
        exe = argv[0] if argv else ""
        found = (os.access(os.path.join(repo.root, exe), os.X_OK) if "/" in exe
                 else shutil.which(exe, path=env.get("PATH")) is not None)
        if not found:
            raise UsageError(f"bisect run: command {exe!r} not found or not executable")
    evaluations = 0
    while step.candidate is not None:
        oid = step.candidate
        if evaluator is not None:
            verdict, detail = evaluator(oid)
        else:
            verdict, detail = evaluate(repo, argv, dict(env, MVC_BISECT_REV=oid), metric, threshold,
                                       higher_is_better)
        evaluations += 1
        if on_step:
            on_step(oid, verdict, detail)
        if verdict == "abort":
            raise MvcError(f"bisect run stopped: {detail} on {oid[:12]} is outside 0-127",
                           hint="exit 0 = good, 1-127 (not 125) = bad, 125 = skip")
        step = mark(repo, verdict, oid)
    step.evaluations = evaluations
    return step
