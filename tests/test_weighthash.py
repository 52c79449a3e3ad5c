"""The pre-commit weight-hash hook, run by the real pre-commit framework in a temp repository."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from mvc.hooks import weighthash as W
from tests.helpers import bf16, mvc_cmd, sha256, write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mvc_exe() -> str:
    """The mvc command as one shell word list, for pre-commit's `entry:`."""
    return " ".join(mvc_cmd())


def run(cwd, *args, env=None, check=True):
    res = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"{args}: {res.stdout}{res.stderr}")
    return res


def test_hashes_match_sha256sum(tmp_path, rng):
    p = tmp_path / "m.safetensors"
    ts = {"a": ("BF16", (8, 8), bf16(rng, (8, 8))), "b": ("F32", (3,), b"\0" * 12)}
    write_safetensors(p, ts, metadata={"format": "pt"})
    h = W.hash_file(str(p), "m.safetensors")
    assert h["sha256"] == sha256(p) and h["size"] == p.stat().st_size
    assert h["tensors"]["a"]["sha256"] == hashlib.sha256(ts["a"][2]).hexdigest()
    assert h["tensors"]["b"] == {"dtype": "F32", "shape": [3], "sha256": hashlib.sha256(b"\0" * 12).hexdigest()}
    n = int.from_bytes(p.read_bytes()[:8], "little")
    assert h["metadata_sha256"] == hashlib.sha256(p.read_bytes()[:8 + n]).hexdigest()


def test_manifest_is_sorted_and_stable(tmp_path, rng):
    write_safetensors(tmp_path / "b.safetensors", {"z": ("F32", (1,), b"\0" * 4), "a": ("F32", (1,), b"\1" * 4)})
    (tmp_path / "a.bin").write_bytes(b"abc")
    cache = W.StatCache(None)
    W.run(str(tmp_path), ["b.safetensors", "a.bin"], True, cache)
    text = (tmp_path / W.MANIFEST).read_text()
    W.run(str(tmp_path), ["a.bin", "b.safetensors"], True, W.StatCache(None))
    assert (tmp_path / W.MANIFEST).read_text() == text
    data = json.loads(text)
    assert list(data["files"]) == ["a.bin", "b.safetensors"]
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"


def test_unchanged_files_not_rehashed(tmp_path, rng):
    write_safetensors(tmp_path / "m.safetensors", {"w": ("BF16", (16, 16), bf16(rng, (16, 16)))})
    cache = W.StatCache(str(tmp_path / "cache.json"))
    _, hashed = W.run(str(tmp_path), ["m.safetensors"], True, cache)
    assert hashed == 1
    _, hashed = W.run(str(tmp_path), ["m.safetensors"], False, W.StatCache(str(tmp_path / "cache.json")))
    assert hashed == 0


def test_corrupt_file_named(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 12)
    res = run(tmp_path, *mvc_exe().split(), "hook", "weight-hash", "bad.safetensors", check=False)
    assert res.returncode != 0 and "bad.safetensors" in res.stderr and "Traceback" not in res.stderr


def test_hooks_file_declares_the_hook():
    hooks = yaml.safe_load(open(os.path.join(ROOT, ".pre-commit-hooks.yaml")))
    (h,) = [h for h in hooks if h["id"] == "mvc-weight-hash"]
    assert h["entry"] == "mvc hook weight-hash" and "safetensors" in h["files"]


@pytest.mark.skipif(subprocess.run([sys.executable, "-m", "pre_commit", "--version"],
                                   capture_output=True).returncode != 0, reason="pre-commit not installed")
def test_pre_commit_blocks_until_manifest_updated(tmp_path, rng):
    repo = tmp_path / "r"
    repo.mkdir()
    env = dict(os.environ, PRE_COMMIT_HOME=str(tmp_path / "pc-home"), GIT_AUTHOR_NAME="T",
               GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="T", GIT_COMMITTER_EMAIL="t@x")
    hook = yaml.safe_load(open(os.path.join(ROOT, ".pre-commit-hooks.yaml")))[0]
    hook = dict(hook, entry=f"{mvc_exe()} hook weight-hash", language="system")
    (repo / ".pre-commit-config.yaml").write_text(yaml.safe_dump({"repos": [{"repo": "local", "hooks": [hook]}]}))
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, sys.executable, "-m", "pre_commit", "install", env=env)
    model = repo / "model.safetensors"
    tensors = {f"w{i}": ("BF16", (32, 32), bf16(rng, (32, 32))) for i in range(3)}
    write_safetensors(model, tensors)
    run(repo, *mvc_exe().split(), "hook", "weight-hash", "--update", "model.safetensors")
    run(repo, "git", "add", ".")
    run(repo, "git", "commit", "-q", "-m", "base", env=env)
    # change one tensor without updating the manifest: the commit is blocked, naming the tensor
    tensors["w1"] = ("BF16", (32, 32), bf16(rng, (32, 32)))
    write_safetensors(model, tensors)
    run(repo, "git", "add", "model.safetensors")
    res = run(repo, "git", "commit", "-m", "tune w1", env=env, check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "model.safetensors: changed" in out and "~ w1: data changed" in out and "w0" not in out
    run(repo, *mvc_exe().split(), "hook", "weight-hash", "--update")
    run(repo, "git", "add", ".weight_hashes.json")
    run(repo, "git", "commit", "-q", "-m", "tune w1", env=env)
    manifest = json.loads((repo / ".weight_hashes.json").read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256(model)
