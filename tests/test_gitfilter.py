"""Git integration with the real git binary: pointers in Git, bit-exact files in the work tree."""

import json
import os
import subprocess

import pytest

from mvc.hooks.git import pktline
from mvc.hooks.git.pointer import Pointer, parse
from tests.helpers import bf16, mvc_cmd, sha256, write_safetensors

pytestmark = pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
                                reason="git is not installed")


def git(cwd, *args, env=None, check=True):
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {res.stderr}")
    return res


def mvc(cwd, *args):
    res = subprocess.run(mvc_cmd() + list(args), cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def filter_starts(trace) -> int:
    """How many mvc filter processes Git started, from its GIT_TRACE2_EVENT log."""
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    return sum(1 for e in events
               if e.get("event") == "child_start" and "filter-process" in " ".join(e.get("argv", [])))


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


@pytest.mark.parametrize("bad", [b" 01f" + b"x" * 27, b"0x1f" + b"x" * 27, b"+01f" + b"x" * 27, b"-001", b"00"])
def test_a_malformed_pkt_line_is_a_one_line_mvc_error(bad):
    """Found by the fuzz campaign: int(head, 16) took " 01f", "0x1f" and "+01f" as lengths, and a
    ProtocolError was not an MvcError (the filter process died with a traceback)."""
    import io

    from mvc.errors import MvcError

    with pytest.raises(MvcError, match="pkt-line"):
        pktline.read_packet(io.BytesIO(bad))


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
    assert filter_starts(trace) == 1
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
    assert "is not in .git/mvc" in res.stderr and "mvc remote add" in res.stderr


def test_invalid_safetensors_refused_by_clean(gitrepo):
    (gitrepo / "bad.safetensors").write_bytes(b"\x10\x00\x00")
    res = git(gitrepo, "add", "bad.safetensors", check=False)
    assert res.returncode != 0 and "truncated" in res.stderr


def commit_model(gitrepo, rng, side: int, count: int) -> str:
    """Commit a bf16 model.safetensors of *count* (side × side) tensors; its SHA-256."""
    model = gitrepo / "model.safetensors"
    write_safetensors(model, {f"w{i}": ("BF16", (side, side), bf16(rng, (side, side))) for i in range(count)})
    git(gitrepo, "add", ".")
    git(gitrepo, "commit", "-q", "-m", "one")
    return sha256(model)


def test_clone_of_local_repository_fetches_from_origin_store(gitrepo, rng, tmp_path):
    want = commit_model(gitrepo, rng, 128, 3)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--no-checkout", str(gitrepo), str(clone))
    mvc(clone, "git", "install")
    git(clone, "checkout", "-q", "main")
    assert sha256(clone / "model.safetensors") == want
    assert git(clone, "status", "--porcelain").stdout == ""


def test_git_diff_shows_tensor_statistics(gitrepo, rng):
    model = gitrepo / "model.safetensors"
    tensors = {f"w{i}": ("BF16", (128, 128), bf16(rng, (128, 128))) for i in range(3)}
    write_safetensors(model, tensors)
    git(gitrepo, "add", ".")
    git(gitrepo, "commit", "-q", "-m", "one")
    tensors["w1"] = ("BF16", (128, 128), bf16(rng, (128, 128)))
    write_safetensors(model, tensors)
    out = git(gitrepo, "diff").stdout  # work tree against the index: a real file on one side
    assert "modified w1" in out and "changed" in out and "cosine" in out and "w0" not in out
    git(gitrepo, "commit", "-q", "-am", "two")
    out = git(gitrepo, "diff", "HEAD~1").stdout  # two pointers
    assert "modified w1" in out and "|delta|" in out
    log = git(gitrepo, "log", "-p", "-1").stdout  # textconv: the changed tensor's line
    assert "-w1  BF16[128, 128]" in log and "+w1  BF16[128, 128]" in log


def test_git_merge_through_the_tensor_merge(gitrepo, rng):
    import numpy as np

    model = gitrepo / "model.safetensors"
    base = {f"w{i}": np.frombuffer(bf16(rng, (64, 64)), "<u2").copy() for i in range(3)}

    def save(ts):
        write_safetensors(model, {k: ("BF16", v.shape, v.tobytes()) for k, v in ts.items()})

    save(base)
    git(gitrepo, "add", ".")
    git(gitrepo, "commit", "-q", "-m", "base")
    git(gitrepo, "checkout", "-q", "-b", "side")
    save(dict(base, w2=base["w2"] ^ 1))
    git(gitrepo, "commit", "-q", "-am", "side changes w2")
    git(gitrepo, "checkout", "-q", "main")
    save(dict(base, w0=base["w0"] ^ 1))
    git(gitrepo, "commit", "-q", "-am", "main changes w0")
    git(gitrepo, "merge", "-q", "--no-edit", "side")
    import torch
    from safetensors.torch import load_file

    got = {k: v.view(torch.int16).numpy().view("<u2") for k, v in load_file(model).items()}
    assert np.array_equal(got["w0"], base["w0"] ^ 1)
    assert np.array_equal(got["w2"], base["w2"] ^ 1)
    assert git(gitrepo, "status", "--porcelain").stdout == ""
    # overlapping edits: Git reports a conflict
    git(gitrepo, "checkout", "-q", "-b", "other", "HEAD~2")  # the base commit
    save(dict(base, w0=base["w0"] ^ 2))
    git(gitrepo, "commit", "-q", "-am", "other changes w0 too")
    git(gitrepo, "checkout", "-q", "main")
    res = git(gitrepo, "merge", "--no-edit", "other", check=False)
    assert res.returncode != 0
    assert "CONFLICT" in res.stdout and "tensor conflict in w0" in res.stderr


def test_git_status_does_not_clean_again(gitrepo, rng, tmp_path):
    import time

    write_safetensors(gitrepo / "m.safetensors", {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    past = time.time() - 10  # older than the index: not "racily clean" to Git, which would re-check it
    os.utime(gitrepo / "m.safetensors", (past, past))
    git(gitrepo, "add", ".")
    git(gitrepo, "commit", "-q", "-m", "one")
    git(gitrepo, "status")  # refreshes the index once
    trace = tmp_path / "t.json"
    git(gitrepo, "status", env=dict(os.environ, GIT_TRACE2_EVENT=str(trace)))
    assert filter_starts(trace) == 0


def test_git_fsck_and_gc_follow_git_history(gitrepo, rng):
    model = gitrepo / "model.safetensors"
    write_safetensors(model, {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    git(gitrepo, "add", ".")
    git(gitrepo, "commit", "-q", "-m", "one")
    write_safetensors(model, {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    git(gitrepo, "add", ".")  # staged only: the index keeps it alive
    write_safetensors(model, {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    git(gitrepo, "add", ".")  # replaces the staged version: that one is now garbage
    assert "checked 2 pointers: ok" in subprocess.run(mvc_cmd() + ["git", "fsck"], cwd=gitrepo,
                                                      capture_output=True, text=True).stderr
    out = mvc(gitrepo, "git", "gc")
    assert out.startswith("removed 3 objects")  # the dropped version's chunk, tensor and file
    git(gitrepo, "commit", "-q", "-m", "two")
    os.remove(model)
    git(gitrepo, "checkout", "--", "model.safetensors")
    git(gitrepo, "checkout", "-q", "HEAD~1", "--", "model.safetensors")
    assert git(gitrepo, "status", "--porcelain").stdout.strip().startswith("M")
    res = subprocess.run(mvc_cmd() + ["git", "fsck", "--json"], cwd=gitrepo, capture_output=True, text=True)
    assert json.loads(res.stdout)["ok"] is True


def test_pre_push_hook_installed_and_quiet_without_models(gitrepo, tmp_path):
    hook = gitrepo / ".git" / "hooks" / "pre-push"
    assert hook.exists() and os.access(hook, os.X_OK)
    bare = tmp_path / "bare.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    (gitrepo / "a.txt").write_text("a")
    git(gitrepo, "add", "a.txt")
    git(gitrepo, "commit", "-q", "-m", "a")
    res = git(gitrepo, "push", str(bare), "main")
    assert "mvc" not in res.stderr and not (bare / "mvc").exists()  # no model: nothing to upload


@pytest.mark.parametrize("damage", ["trailing", "short"])
def test_streamed_clean_validates_sizes(gitrepo, rng, damage):
    p = gitrepo / "m.safetensors"
    write_safetensors(p, {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    data = p.read_bytes()
    p.write_bytes(data + b"extra" if damage == "trailing" else data[:-10])
    res = git(gitrepo, "add", "m.safetensors", check=False)
    assert res.returncode != 0 and "m.safetensors" in res.stderr
    assert git(gitrepo, "status", "--porcelain").stdout.strip().startswith("??")


def test_plain_clone_then_install_gives_bit_exact_files(gitrepo, rng, tmp_path):
    want = commit_model(gitrepo, rng, 96, 2)
    clone = tmp_path / "plain"
    git(tmp_path, "clone", "-q", str(gitrepo), str(clone))
    assert parse((clone / "model.safetensors").read_bytes()) is not None  # no filter yet: a pointer
    out = mvc(clone, "git", "install")
    assert "checked out 1 model file" in out
    assert sha256(clone / "model.safetensors") == want
    assert git(clone, "status", "--porcelain").stdout == ""


def test_a_file_name_that_is_not_utf8_goes_through_the_filter(gitrepo, rng):
    """Hardening defect 6: Git's packets carry path names as bytes; a non-UTF-8 one ended the
    filter process with UnicodeDecodeError and `git add` exited 128."""
    name = b"m\xff.safetensors"
    path = os.path.join(os.fsencode(gitrepo), name)
    write_safetensors(os.fsdecode(path), {"w": ("BF16", (256, 256), bf16(rng, (256, 256)))})
    want = sha256(os.fsdecode(path))
    res = subprocess.run(["git", "add", ".gitattributes", os.fsdecode(name)], cwd=gitrepo, capture_output=True)
    assert res.returncode == 0, res.stderr
    git(gitrepo, "commit", "-q", "-m", "odd name")
    os.remove(path)
    subprocess.run(["git", "checkout", "--", os.fsdecode(name)], cwd=gitrepo, check=True, capture_output=True)
    assert sha256(os.fsdecode(path)) == want
