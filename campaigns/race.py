"""Diverging pushes to one ref of a bucket on a real S3-compatible server (moto on 127.0.0.1):
each round, every pusher commits its own change on the remote's tip and all push at once with
the real `mvc push`. Exactly one may win; the remote ref is the winner's commit and its history
is complete; every loser is refused in one line, no traceback."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from .common import Result, commit, mvc, start_moto, write_model

CREDS = {"AWS_ACCESS_KEY_ID": "campaign", "AWS_SECRET_ACCESS_KEY": "campaign", "AWS_DEFAULT_REGION": "us-east-1"}


def run(rounds: int, pushers: int, work: str, seed: int = 0, log=print) -> Result:
    import boto3

    from mvc import Repo
    from mvc.remote.backends import open_remote
    from mvc.remote.sync import add_remote, fetch, push

    saved = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)  # the pushes' processes inherit them
    res = Result("race", f"python -m campaigns race --rounds {rounds} --pushers {pushers} --seed {seed}")
    proc, endpoint = start_moto()
    t0 = time.monotonic()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="race")
        url = "s3://race/models"
        rng = np.random.default_rng(seed)
        base = os.path.join(work, "base")
        os.makedirs(base)
        Repo.init(base).close()
        write_model(base, rng, 2, 256)
        commit(base, "base")
        with Repo(base) as r:
            add_remote(r, "origin", url, endpoint)
            push(r, open_remote(url, endpoint_url=endpoint), "origin", "main")
        roots = []
        for k in range(pushers):
            root = os.path.join(work, f"p{k}")
            mvc("clone", url, root, "--endpoint-url", endpoint, cwd=work)
            roots.append(root)
        remote = open_remote(url, endpoint_url=endpoint)
        for n in range(rounds):
            heads = {}
            for k, root in enumerate(roots):  # each on the remote's tip, with a change of its own
                with Repo(root) as r:
                    fetch(r, remote, "origin")
                    r.reset("origin/main", hard=True)
                with open(os.path.join(root, "config.json"), "w") as f:
                    json.dump({"round": n, "pusher": k}, f)
                heads[k] = commit(root, f"round {n} pusher {k}")
            outs = {}

            def go(k, outs=outs):
                outs[k] = mvc("push", cwd=roots[k], check=False)

            threads = [threading.Thread(target=go, args=(k,)) for k in range(pushers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [k for k, p in outs.items() if p.returncode == 0]
            res.runs += 1
            tip = remote.get("refs/heads/main").decode().strip()
            problems = []
            if len(winners) != 1:
                problems.append(f"{len(winners)} pushes won")
            elif tip != heads[winners[0]]:
                problems.append("the remote ref is not the winner's commit")
            for k, p in outs.items():
                if p.returncode != 0 and ("Traceback" in p.stderr or "rejected" not in p.stderr):
                    problems.append(f"pusher {k} refused badly: {p.stderr.strip()[-200:]}")
            if problems:
                res.fail(f"round {n}: " + "; ".join(problems))
                res.count("rounds", "FAILED")
            else:
                res.count("rounds", "exactly one won")
            if (n + 1) % 10 == 0:
                log(f"race: {n + 1}/{rounds} rounds, {res.failures} failures")
        with Repo(roots[0]) as r:  # the winners' history on the remote is complete
            fetch(r, remote, "origin")
        mvc("fsck", cwd=roots[0])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    res.seconds = round(time.monotonic() - t0, 1)
    return res
