"""Bad input: one line on stderr, a non-zero exit, no traceback, and an unchanged repository."""

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from mvc import Repo
from tests.helpers import bf16, mvc_proc, write_safetensors


def snapshot(root):
    with Repo(root) as r:
        return (r.backend.stats(), r.backend.list_refs(""), len(r.refs.reflog()))


@pytest.fixture
def work(tmp_path, rng):
    root = tmp_path / "w"
    Repo.init(root).close()
    write_safetensors(root / "good.safetensors", {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    assert mvc_proc("commit", "-m", "base", cwd=root).returncode == 0
    return root


def assert_clean_failure(res, expect: str, code=None):
    assert res.returncode != 0, res.stdout
    if code is not None:
        assert res.returncode == code
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and expect in lines[0], lines[0]


def header(entries: dict) -> bytes:
    h = json.dumps(entries).encode()
    return struct.pack("<Q", len(h)) + h


BAD_FILES = {
    "truncated": (b"\x10\x00\x00", "truncated"),
    "header-past-end": (struct.pack("<Q", 10_000) + b"{}", "runs past the end"),
    "header-over-limit": (struct.pack("<Q", 100_000_001) + b"{}" + b" " * 64, "over the 100000000 byte limit"),
    "not-json": (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    "offsets-out-of-bounds": (header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + b"\0" * 8,
                              "out of bounds"),
    "overlap": (header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}) + b"\0" * 12, "overlaps"),
    "hole": (header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}) + b"\0" * 8, "hole"),
    "size-mismatch": (header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}) + b"\0" * 8,
                      "do not match"),
    "bad-dtype": (header({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}) + b"\0", "unknown dtype"),
    "truncated-data": (header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + b"\0" * 7,
                       "out of bounds"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_malformed_safetensors_refused(work, name):
    data, expect = BAD_FILES[name]
    (work / "bad.safetensors").write_bytes(data)
    before = snapshot(work)
    res = mvc_proc("commit", "-m", "bad", cwd=work)
    assert_clean_failure(res, expect)
    assert "bad.safetensors" in res.stderr
    assert snapshot(work) == before
    assert_clean_failure(mvc_proc("status", cwd=work), expect)


class Evil:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_pickled_callable_never_runs(work, tmp_path, kind):
    canary = tmp_path / "CANARY"
    path = work / "evil.pt"
    if kind == "zip":
        torch.save({"w": torch.zeros(2), "x": Evil(canary)}, path)
    else:
        path.write_bytes(pickle.dumps(Evil(canary)))
    before = snapshot(work)
    res = mvc_proc("commit", "-m", "evil", cwd=work)
    assert_clean_failure(res, "never runs pickled code")
    assert "posix.system" in res.stderr or "os.system" in res.stderr
    assert not canary.exists()
    assert snapshot(work) == before


def test_plain_pt_state_dict_is_accepted(work):
    torch.save({"w": torch.randn(3, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, work / "ok.pt")
    assert mvc_proc("commit", "-m", "ok", cwd=work).returncode == 0


def test_not_a_repository(tmp_path):
    res = mvc_proc("status", cwd=tmp_path)
    assert_clean_failure(res, "not an mvc repository", code=128)


@pytest.mark.parametrize("rev", ["nope", "HEAD~5", "main^2", "deadbeef"])
def test_unknown_revision(work, rev):
    before = snapshot(work)
    for cmd in (["checkout", rev], ["log", rev], ["rev-parse", rev], ["reset", "--hard", rev]):
        assert_clean_failure(mvc_proc(*cmd, cwd=work), "")
    assert snapshot(work) == before


def test_newer_format_refused(work):
    cfg = work / ".mvc" / "config.json"
    cfg.write_text(json.dumps({"format": 99}))
    res = mvc_proc("log", cwd=work)
    assert_clean_failure(res, "repository format 99 is newer", code=128)
    assert json.loads(cfg.read_text()) == {"format": 99}


def test_dirty_checkout_refused(work, rng):
    write_safetensors(work / "good.safetensors", {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    mvc_proc("commit", "-m", "two", cwd=work, check=True)
    changed = bf16(rng, (64, 64))
    write_safetensors(work / "good.safetensors", {"w": ("BF16", (64, 64), changed)})
    content = (work / "good.safetensors").read_bytes()
    res = mvc_proc("checkout", "HEAD~1", cwd=work)
    assert_clean_failure(res, "would overwrite uncommitted changes")
    assert (work / "good.safetensors").read_bytes() == content


def test_empty_message_and_bad_names(work):
    assert_clean_failure(mvc_proc("commit", "-m", " ", cwd=work), "empty commit message")
    assert_clean_failure(mvc_proc("branch", "a..b", cwd=work), "not a valid branch name")
    assert_clean_failure(mvc_proc("tag", "x y", cwd=work), "not a valid tag name")
    assert_clean_failure(mvc_proc("commit", "-m", "x", "nosuchfile", cwd=work), "did not match")


def test_init_twice_refused(work):
    assert_clean_failure(mvc_proc("init", ".", cwd=work), "already an mvc repository")


def test_missing_store_reported(tmp_path):
    root = Path(tmp_path) / "r"
    Repo.init(root).close()
    os.rename(root / ".mvc" / "store", root / ".mvc" / "store-moved")
    assert_clean_failure(mvc_proc("log", cwd=root), "missing")
