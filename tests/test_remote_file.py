"""push, fetch, pull and clone through a file:// remote."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mvc import Repo
from mvc.remote.backends import FileRemote
from mvc.remote.sync import push
from tests.helpers import bf16, mvc, mvc_proc, sha256, tree_hashes, write_safetensors


@pytest.fixture
def origin(tmp_path, rng):
    root = tmp_path / "a"
    mvc("init", root)
    tensors = {f"w{i}": ("BF16", (512, 512), bf16(rng, (512, 512))) for i in range(4)}
    write_safetensors(root / "m.safetensors", tensors)
    (root / "config.json").write_text("{}")
    mvc("commit", "-m", "one", cwd=root)
    url = f"file://{tmp_path / 'remote'}"
    mvc("remote", "add", "origin", url, cwd=root)
    return root, url, tensors


def test_push_clone_bit_exact_same_log(origin, tmp_path):
    root, url, _ = origin
    mvc("push", cwd=root)
    mvc("clone", url, tmp_path / "b")
    b = tmp_path / "b"
    assert tree_hashes(b) == tree_hashes(root)
    log = lambda r: [e["id"] for e in json.loads(mvc("log", "--json", cwd=r).output)]  # noqa: E731
    assert log(b) == log(root)
    assert json.loads(mvc("status", "--json", cwd=b).output)["clean"]
    assert mvc_proc("fsck", cwd=b).returncode == 0


def test_second_push_sends_only_the_new_tensor(origin, tmp_path, rng):
    root, url, tensors = origin
    mvc("push", cwd=root)
    new = bf16(rng, (512, 512))
    tensors["w2"] = ("BF16", (512, 512), new)
    write_safetensors(root / "m.safetensors", tensors)
    before = Repo(root).backend.stats()["stored_bytes"]
    mvc("commit", "-m", "two", cwd=root)
    with Repo(root) as r:
        added = r.backend.stats()["stored_bytes"] - before
        res = push(r, FileRemote(url[len("file://"):]), "origin", "main")
    assert res.bytes_sent <= 1.05 * added + 4096, (res.bytes_sent, added)


def test_fetch_and_pull_fast_forward(origin, tmp_path, rng):
    root, url, tensors = origin
    mvc("push", cwd=root)
    mvc("clone", url, tmp_path / "b")
    tensors["w0"] = ("BF16", (512, 512), bf16(rng, (512, 512)))
    write_safetensors(root / "m.safetensors", tensors)
    mvc("commit", "-m", "two", cwd=root)
    mvc("push", cwd=root)
    b = tmp_path / "b"
    out = mvc("pull", cwd=b).output
    assert "Fast-forward" in out
    assert sha256(b / "m.safetensors") == sha256(root / "m.safetensors")
    assert mvc("rev-parse", "origin/main", cwd=b).output == mvc("rev-parse", "HEAD", cwd=root).output


def test_non_fast_forward_refused_unless_forced(origin, tmp_path, rng):
    root, url, tensors = origin
    mvc("push", cwd=root)
    mvc("clone", url, tmp_path / "b")
    b = tmp_path / "b"
    (b / "config.json").write_text('{"b": 1}')
    mvc("commit", "-m", "b side", cwd=b)
    mvc("push", cwd=b)
    (root / "config.json").write_text('{"a": 1}')
    mvc("commit", "-m", "a side", cwd=root)
    res = mvc_proc("push", cwd=root)
    assert res.returncode != 0 and "non-fast-forward" in res.stderr and "Traceback" not in res.stderr
    assert mvc_proc("push", "--force", cwd=root).returncode == 0


def test_corrupt_remote_object_never_stored(origin, tmp_path):
    root, url, _ = origin
    mvc("push", cwd=root)
    rdir = tmp_path / "remote"
    pack = max((rdir / "packs").glob("*.pack"), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x40
    pack.write_bytes(bytes(data))
    res = mvc_proc("clone", url, tmp_path / "c")
    assert res.returncode != 0 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "c").exists()  # a failed clone leaves nothing behind


@pytest.mark.parametrize("url", ["file:///tmp/x\nevil", "ftp://host/x", "file:///no/such/dir/at/all"])
def test_bad_remote_input(origin, url):
    root, _, _ = origin
    before = (root / ".mvc" / "config.json").read_text()
    res = mvc_proc("remote", "add", "bad", url, cwd=root)
    if res.returncode == 0:  # a well-formed URL is accepted; using it fails clearly
        res = mvc_proc("fetch", "bad", cwd=root)
        mvc_proc("remote", "remove", "bad", cwd=root)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert (root / ".mvc" / "config.json").read_text() == before
    res = mvc_proc("push", "nope", cwd=root)
    assert res.returncode != 0 and "no remote named 'nope'" in res.stderr


def test_killed_push_leaves_old_ref_and_resumes(origin, tmp_path, rng):
    root, url, tensors = origin
    mvc("push", cwd=root)
    for i in range(24):  # ~130 MiB compressed: several 64 MiB packs
        tensors[f"big{i}"] = ("BF16", (2048, 2048), bf16(rng, (2048, 2048)))
    write_safetensors(root / "m.safetensors", tensors)
    mvc("commit", "-m", "big", cwd=root)
    ref = tmp_path / "remote" / "refs" / "heads" / "main"
    old = ref.read_text()
    packs = tmp_path / "remote" / "packs"
    before = len(list(packs.glob("*.pack")))
    exe = os.path.join(os.path.dirname(sys.executable), "mvc")
    p = subprocess.Popen([exe, "push"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(packs.glob("*.pack"))) == before and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)  # midway: the first new pack has landed, more are coming
    p.wait()
    assert ref.read_text() == old
    assert mvc_proc("push", cwd=root).returncode == 0
    assert ref.read_text() != old
    mvc("clone", url, tmp_path / "c")
    assert sha256(tmp_path / "c" / "m.safetensors") == sha256(root / "m.safetensors")


def test_lazy_clone_fetches_only_what_is_read(tmp_path):
    from mvc.remote.sync import add_remote, fetch, lazy_fetcher
    from mvc.synth import write_model

    src = tmp_path / "src"
    src.mkdir()
    write_model(str(src / "model.safetensors"), 512, seed=0)
    mvc("init", src)
    mvc("commit", "-m", "one", cwd=src)
    url = f"file://{tmp_path / 'remote'}"
    mvc("remote", "add", "origin", url, cwd=src)
    mvc("push", cwd=src)
    size = (src / "model.safetensors").stat().st_size
    # the CLI's lazy clone checks nothing out
    res = mvc_proc("clone", "--filter=lazy", url, "lazy-cli", cwd=tmp_path)
    assert res.returncode == 0 and not (tmp_path / "lazy-cli" / "model.safetensors").exists()
    # through the API, with the remote's byte counter at hand
    dst = tmp_path / "dst"
    repo = Repo.init(dst)
    add_remote(repo, "origin", url)
    remote = FileRemote(str(tmp_path / "remote"))
    fetch(repo, remote, "origin", lazy=True)
    metadata_bytes = remote.received
    assert metadata_bytes < 1_000_000 < size
    repo.refs.set_ref("refs/heads/main", repo.resolve("origin/main"), None, "test")
    repo.odb.fetcher = lazy_fetcher(repo, "origin", remote)
    name = "model.layers.0.mlp.down_proj.weight"
    t = repo.load("HEAD", names=[name])[name]
    tensor_obj = repo.odb.get(dict(repo.odb.get(repo.tree_of("HEAD").entries[0].oid, "file").tensors)[name], "tensor")
    stored = sum(len(repo.backend.get(bytes.fromhex(c))) for c in tensor_obj.chunks)
    assert remote.received - metadata_bytes <= stored * 1.01 + 4096
    assert t.shape == (2048, 5632)
    # a full checkout then fetches the rest, bit-exact
    repo.checkout("main", force=True)
    assert sha256(dst / "model.safetensors") == sha256(src / "model.safetensors")
