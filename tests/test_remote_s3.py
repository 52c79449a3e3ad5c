"""The same remote workflow against a real S3-compatible server (moto's standalone server on 127.0.0.1)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from mvc import Repo
from mvc.remote.s3 import S3Remote
from mvc.remote.sync import push
from tests.helpers import bf16, mvc_proc, sha256, tree_hashes, write_safetensors

pytest.importorskip("moto")
pytest.importorskip("boto3")

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def s3_server():
    proc, url = start_moto()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def start_moto(extra_env=None):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **(extra_env or {})))
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("moto server did not start")


@pytest.fixture
def env(monkeypatch):
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    return dict(os.environ, **CREDS)


@pytest.fixture
def bucket(s3_server, env, request):
    import boto3

    name = "mvc-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def make_repo(root, rng, n=4):
    Repo.init(root).close()
    tensors = {f"w{i}": ("BF16", (512, 512), bf16(rng, (512, 512))) for i in range(n)}
    write_safetensors(root / "m.safetensors", tensors)
    (root / "config.json").write_text("{}")
    assert mvc_proc("commit", "-m", "one", cwd=root).returncode == 0
    return tensors


def run(cwd, *args, env=None):
    res = mvc_proc(*args, cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    return res


def pushed_repo(tmp_path, rng, url, s3_server, env):
    """A repository at tmp_path/a with one commit, pushed to *url* through the CLI."""
    a = tmp_path / "a"
    make_repo(a, rng)
    run(a, "remote", "add", "origin", url, "--endpoint-url", s3_server, env=env)
    run(a, "push", env=env)
    return a


def test_push_clone_bit_exact(s3_server, bucket, env, tmp_path, rng):
    url = f"s3://{bucket}/models/x"
    a = pushed_repo(tmp_path, rng, url, s3_server, env)
    run(tmp_path, "clone", url, "b", "--endpoint-url", s3_server, env=env)
    assert tree_hashes(tmp_path / "b") == tree_hashes(a)
    logs = [json.loads(run(d, "log", "--json", env=env).stdout) for d in (a, tmp_path / "b")]
    assert [e["id"] for e in logs[0]] == [e["id"] for e in logs[1]]
    # no secret is written into the repository
    assert "testing" not in (tmp_path / "b" / ".mvc" / "config.json").read_text()


def test_second_push_uploads_about_the_new_tensor(s3_server, bucket, env, tmp_path, rng):
    a = tmp_path / "a"
    tensors = make_repo(a, rng)
    url = f"s3://{bucket}/m"
    with Repo(a) as r:
        push(r, S3Remote(url, endpoint_url=s3_server), "origin", "main")
    tensors["w1"] = ("BF16", (512, 512), bf16(rng, (512, 512)))
    write_safetensors(a / "m.safetensors", tensors)
    with Repo(a) as r:
        before = r.backend.stats()["stored_bytes"]
        r.commit("two")
        added = r.backend.stats()["stored_bytes"] - before
        remote = S3Remote(url, endpoint_url=s3_server)
        res = push(r, remote, "origin", "main")
    assert res.bytes_sent <= 1.05 * added + 4096, (res.bytes_sent, added)


def test_concurrent_diverging_pushes_exactly_one_wins(s3_server, bucket, env, tmp_path, rng):
    a = tmp_path / "a"
    make_repo(a, rng, n=2)
    url = f"s3://{bucket}/c"
    run(a, "remote", "add", "origin", url, "--endpoint-url", s3_server, env=env)
    run(a, "push", env=env)
    for name in ("b", "c"):
        run(tmp_path, "clone", url, name, "--endpoint-url", s3_server, env=env)
        (tmp_path / name / "config.json").write_text(json.dumps({"who": name}))
        run(tmp_path / name, "commit", "-m", name, env=env)
    results = {}

    def go(name):
        results[name] = mvc_proc("push", cwd=tmp_path / name, env=env)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.returncode for r in results.values())
    assert codes[0] == 0 and codes[1] != 0, {k: v.stderr for k, v in results.items()}
    loser = next(r for r in results.values() if r.returncode != 0)
    assert "rejected" in loser.stderr and "Traceback" not in loser.stderr


def test_corrupt_object_on_remote_refused(s3_server, bucket, env, tmp_path, rng):
    import boto3

    url = f"s3://{bucket}/k"
    pushed_repo(tmp_path, rng, url, s3_server, env)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"].endswith(".pack")]
    big = max(keys, key=lambda k: s3.head_object(Bucket=bucket, Key=k)["ContentLength"])
    data = bytearray(s3.get_object(Bucket=bucket, Key=big)["Body"].read())
    data[len(data) // 2] ^= 0x08
    s3.put_object(Bucket=bucket, Key=big, Body=bytes(data))
    res = mvc_proc("clone", url, "b", "--endpoint-url", s3_server, cwd=tmp_path, env=env)
    assert res.returncode != 0 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "b").exists()


def test_bad_remote_inputs(s3_server, bucket, env, tmp_path, rng):
    a = tmp_path / "a"
    make_repo(a, rng, n=1)
    cfg = (a / ".mvc" / "config.json").read_text()
    # an endpoint where nothing listens: a clear error, quickly, no hang
    dead = f"http://127.0.0.1:{free_port()}"
    run(a, "remote", "add", "dead", f"s3://{bucket}/x", "--endpoint-url", dead, env=env)
    t = time.monotonic()
    res = mvc_proc("push", "dead", cwd=a, env=env)
    assert res.returncode != 0 and "cannot reach" in res.stderr and time.monotonic() - t < 60
    # a missing bucket
    run(a, "remote", "add", "nobucket", "s3://no-such-bucket-here/x", "--endpoint-url", s3_server, env=env)
    res = mvc_proc("push", "nobucket", cwd=a, env=env)
    assert res.returncode != 0 and "does not exist" in res.stderr
    # CR/LF/NUL in a URL, an unknown remote
    res = mvc_proc("remote", "add", "evil", "s3://b/x\r\nHost: evil", cwd=a, env=env)
    assert res.returncode != 0 and "CR, LF or NUL" in res.stderr
    res = mvc_proc("fetch", "nope", cwd=a, env=env)
    assert res.returncode != 0 and "no remote named" in res.stderr and "Traceback" not in res.stderr
    run(a, "remote", "remove", "dead", env=env)
    run(a, "remote", "remove", "nobucket", env=env)
    assert (a / ".mvc" / "config.json").read_text() == cfg
    assert sha256(a / "m.safetensors")


def test_rejected_credentials(env, tmp_path, rng):
    # a server that checks credentials (moto with authentication on): ours are unknown to it
    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        a = tmp_path / "a"
        make_repo(a, rng, n=1)
        run(a, "remote", "add", "origin", "s3://mvc-auth/x", "--endpoint-url", url, env=env)
        res = mvc_proc("push", cwd=a, env=env)
        assert res.returncode != 0 and "rejected the credentials" in res.stderr and "Traceback" not in res.stderr
        res = mvc_proc("clone", "s3://mvc-auth/x", "b", "--endpoint-url", url, cwd=tmp_path, env=env)
        assert res.returncode != 0 and "rejected the credentials" in res.stderr
        assert not (tmp_path / "b").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
