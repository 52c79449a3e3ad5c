"""Bad input: one line on stderr, a non-zero exit, no traceback, and an unchanged repository."""

import io
import json
import os
import pickle
import struct
import zipfile
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


def _u(s: str) -> bytes:  # SHORT_BINUNICODE
    return b"\x8c" + bytes([len(s)]) + s.encode()


_INNOCENT = _u("collections") + _u("OrderedDict") + b"00"  # pushed and popped: what the old scanner checked
_CALL = _u("touch CANARY") + b"\x85R."  # TUPLE1, REDUCE, STOP
BYPASSES = {  # the five ways past the string-tracking scanner (hardening defect 1), and one more
    "protocol-0": b"cos\nsystem\n(Vtouch CANARY\ntR.",
    "memo": b"\x80\x04" + _u("os") + b"\x940" + _u("system") + b"\x940" + _INNOCENT + b"h\x00h\x01\x93" + _CALL,
    "short-binstring": b"\x80\x02" + _INNOCENT + b"U\x02osU\x06system\x93" + _CALL,
    "binstring": b"\x80\x02" + _INNOCENT + b"T\x02\x00\x00\x00osT\x06\x00\x00\x00system\x93" + _CALL,
    "unicode": b"\x80\x02" + _INNOCENT + b"Vos\nVsystem\n\x93" + _CALL,
    "ext": b"\x80\x02\x82\x01" + _CALL,  # EXT1: a global through the copyreg registry
}


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_pickle_scanner_follows_the_stack_and_the_memo(work, tmp_path, name):
    import pickletools

    data = BYPASSES[name]
    pickletools.dis(data, out=open(os.devnull, "w"))  # a well-formed pickle, as the unpickler reads it
    (work / "evil.pt").write_bytes(data)
    before = snapshot(work)
    res = mvc_proc("commit", "-m", "evil", cwd=work)
    assert_clean_failure(res, "never runs pickled code" if name != "ext" else "extension registry")
    assert snapshot(work) == before


def _zip_with(tmp_path, members: dict, method=zipfile.ZIP_STORED) -> bytes:
    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path.read_bytes()


def test_every_pickle_of_a_torch_zip_is_scanned(work, tmp_path):
    """A torch zip whose first .pkl member is unreadable stopped the old scan before the second."""
    data = _zip_with(tmp_path, {"archive/a.pkl": b"\x80\x04garbage", "archive/data.pkl": BYPASSES["memo"]})
    (work / "evil.pt").write_bytes(data)
    res = mvc_proc("commit", "-m", "evil", cwd=work)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    ok = _zip_with(tmp_path, {"archive/a.pkl": pickle.dumps({"a": 1}), "archive/data.pkl": BYPASSES["memo"]})
    (work / "evil.pt").write_bytes(ok)
    assert_clean_failure(mvc_proc("commit", "-m", "evil", cwd=work), "never runs pickled code")


def test_a_zip_member_that_cannot_be_read_is_refused(work, tmp_path):
    """An unsupported compression method raised NotImplementedError; now it is one line."""
    data = bytearray(_zip_with(tmp_path, {"archive/data.pkl": pickle.dumps({"a": 1})}))
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # method field: local header +8, central header +10
        pos = data.find(sig)
        off = 8 if sig == b"PK\x03\x04" else 10
        data[pos + off:pos + off + 2] = (99).to_bytes(2, "little")
    (work / "odd.pt").write_bytes(bytes(data))
    before = snapshot(work)
    assert_clean_failure(mvc_proc("commit", "-m", "odd", cwd=work), "cannot be read")
    assert snapshot(work) == before


@pytest.mark.parametrize("data", [
    # found by the fuzz campaign: a central directory of zip version 6.4 made ZipFile() raise
    # NotImplementedError, which escaped as a traceback
    b"PKPK\x01\x02\x00\x00@" + b"\x00" * 54 + b"PK\x05\x06" + b"\x00" * 8 + b"=" + b"\x00" * 9,
    b"PK\x03\x04" + b"\x00" * 60,  # a local header and nothing a reader can list
])
def test_a_zip_python_cannot_list_is_refused(work, tmp_path, data):
    from mvc.errors import InvalidFileError
    from mvc.formats import torchfile

    with pytest.raises(InvalidFileError, match="cannot be read"):
        torchfile.check_file(io.BytesIO(data), "m.pt")


def test_plain_pt_state_dict_is_accepted(work):
    sd = {"w": torch.randn(3, 3), "b": torch.zeros(3, dtype=torch.bfloat16), "p": torch.nn.Parameter(torch.ones(2))}
    torch.save(sd, work / "ok.pt")
    torch.save(sd, work / "legacy.pt", _use_new_zipfile_serialization=False)
    for proto in (0, 2):
        torch.save(sd, work / f"p{proto}.bin", _use_new_zipfile_serialization=False, pickle_protocol=proto)
    (work / "blob.bin").write_bytes(bytes(range(256)) * 64)  # not a pickle at all: plain bytes
    res = mvc_proc("commit", "-m", "ok", cwd=work)
    assert res.returncode == 0, res.stderr


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


def test_pickle_scanner_fuzz():
    """Any bytes: the scanner ends with a verdict (an MvcError or nothing), never another exception."""
    import io

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mvc.errors import MvcError
    from mvc.formats import torchfile

    ops = st.sampled_from([b"\x8c\x02os", b"\x94", b"h\x00", b"\x93", b"(", b"0", b"1", b"t", b"R", b".",
                           b"N", b"]", b"e", b"U\x01a", b"q\x00", b"2", b"cos\nsystem\n", b"\x85", b"\x82\x01"])

    @given(st.one_of(st.binary(max_size=300), st.lists(ops, max_size=40).map(b"".join)))
    @settings(max_examples=400, deadline=None)
    def run(data):
        for blob in (data, b"\x80\x04" + data):
            try:
                torchfile.scan_pickle(io.BytesIO(blob), "f", count=5)
                torchfile.check_file(io.BytesIO(blob), "f")
            except MvcError:
                pass

    run()
