"""Git integration with the real git binary: pointers in Git, bit-exact files in the work tree."""

import json
import os
import subprocess
import sys

import pytest

from mvc.hooks import pktline
from mvc.hooks.pointer import Pointer, parse
from tests.helpers import bf16, sha256, write_safetensors

pytestmark = pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
                                reason="git is not installed")


def git(cwd, *args, env=None, check=True):
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {res.stderr}")
    return res


def mvc_bin():
    exe = os.path.join(os.path.dirname(sys.executable), "mvc")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "mvc"]


def mvc(cwd, *args):
    res = subprocess.run(mvc_bin() + list(args), cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture
def gitrepo(tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "T")
    mvc(root, "git", "install")
    mvc(root, "git", "track", "*.safetensors")
    return root


def test_pointer_has_one_encoding():
    p = Pointer("a" * 64, 123)
    raw = p.encode()
    assert parse(raw) == p and len(raw) < 1024
    for bad in (raw + b"\n", raw.replace(b"size 123", b"size 0123"), raw.replace(b"aaaa", b"AAAA", 1),
                raw[:-1], b"x" * 2000, raw.replace(b"version", b"Version")):
        assert parse(bad) is None


def test_pktline_round_trip():
    import io

    buf = io.BytesIO()
    pktline.write_text(buf, "a=b")
    pktline.write_packet(buf, b"x" * 70000)
    pktline.flush(buf)
    buf.seek(0)
    assert pktline.read_packet(buf) == b"a=b\n"
    assert pktline.read_packet(buf) == b"x" * pktline.MAX_PAYLOAD
    assert pktline.read_packet(buf) == b"x" * (70000 - pktline.MAX_PAYLOAD)
    assert pktline.read_packet(buf) is None


def test_add_commit_checkout_bit_exact(gitrepo, rng):
    model = gitrepo / "model.safetensors"
    write_safetensors(model, {f"w{i}": ("BF16", (256, 256), bf16(rng, (256, 256))) for i in range(4)},
                      metadata={"format": "pt"})
    first = sha256(model)
    git(gitrepo, "add", ".gitattributes", "model.safetensors")
    git(gitrepo, "commit", "-q", "-m", "one")
    blob = git(gitrepo, "cat-file", "-p", "HEAD:model.safetensors").stdout.encode()
    assert parse(blob) is not None and len(blob) < 1024  # Git holds only the pointer
    write_safetensors(model, {f"w{i}": ("BF16", (256, 256), bf16(rng, (256, 256))) for i in range(4)})
    git(gitrepo, "commit", "-q", "-am", "two")
    second = sha256(model)
    assert second != first
    git(gitrepo, "checkout", "HEAD~1", "--", "model.safetensors")
    assert sha256(model) == first
    git(gitrepo, "checkout", "HEAD", "--", "model.safetensors")
    assert sha256(model) == second
    os.remove(model)
    git(gitrepo, "checkout", "--", "model.safetensors")
    assert sha256(model) == second
    assert git(gitrepo, "status", "--porcelain").stdout == ""


def test_one_filter_process_for_twenty_files(gitrepo, rng, tmp_path):
    for i in range(20):
        write_safetensors(gitrepo / f"m{i:02d}.safetensors", {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    trace = tmp_path / "trace.json"
    env = dict(os.environ, GIT_TRACE2_EVENT=str(trace))
    git(gitrepo, "add", ".", env=env)
    starts = [json.loads(line) for line in trace.read_text().splitlines()]
    filters = [e for e in starts if e.get("event") == "child_start" and "filter-process" in " ".join(e.get("argv", []))]
    assert len(filters) == 1
    git(gitrepo, "commit", "-q", "-m", "twenty")
    for i in range(20):
        assert parse(git(gitrepo, "cat-file", "-p", f"HEAD:m{i:02d}.safetensors").stdout.encode())


def test_clean_is_idempotent_and_smudge_passes_non_pointers(gitrepo):
    # a file that already is a pointer is stored as itself
    ptr = Pointer("b" * 64, 5).encode()
    (gitrepo / "p.safetensors").write_bytes(ptr)
    # a tracked file that is not a pointer and not safetensors-valid would be refused; plain text passes smudge
    git(gitrepo, "add", "p.safetensors")
    assert git(gitrepo, "cat-file", "-p", ":p.safetensors").stdout.encode() == ptr


def test_missing_object_fails_clearly(gitrepo, rng, tmp_path):
    write_safetensors(gitrepo / "m.safetensors", {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    git(gitrepo, "add", ".")
    git(gitrepo, "commit", "-q", "-m", "one")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--no-checkout", str(gitrepo), str(clone))
    git(clone, "remote", "remove", "origin")  # no local origin store to fetch from
    mvc(clone, "git", "install")
    res = git(clone, "checkout", "main", check=False)
    assert res.returncode != 0
    assert "is missing from" in res.stderr and "hint" in res.stderr


def test_invalid_safetensors_refused_by_clean(gitrepo):
    (gitrepo / "bad.safetensors").write_bytes(b"\x10\x00\x00")
    res = git(gitrepo, "add", "bad.safetensors", check=False)
    assert res.returncode != 0 and "truncated" in res.stderr


def test_clone_of_local_repository_fetches_from_origin_store(gitrepo, rng, tmp_path):
    model = gitrepo / "model.safetensors"
    write_safetensors(model, {f"w{i}": ("BF16", (128, 128), bf16(rng, (128, 128))) for i in range(3)})
    want = sha256(model)
    git(gitrepo, "add", ".")
    git(gitrepo, "commit", "-q", "-m", "one")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--no-checkout", str(gitrepo), str(clone))
    mvc(clone, "git", "install")
    git(clone, "checkout", "-q", "main")
    assert sha256(clone / "model.safetensors") == want
    assert git(clone, "status", "--porcelain").stdout == ""
