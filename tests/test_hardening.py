"""Defects an adversarial review found (issue: hardening), each pinned by a test that failed
before its fix."""

import json
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvc import Repo
from mvc.errors import DirtyWorkTreeError
from tests.helpers import mvc, mvc_proc, sha256


def _settle():
    """Let the racy window pass (a file changed within 100 ms of a command is not cached)."""
    time.sleep(0.15)


def test_a_copy_that_keeps_size_and_mtime_is_still_seen(tmp_path, rng):
    """`cp -p`, `touch -r` or an archive with fixed mtimes leaves size and mtime (and here the inode)
    as they were: only the change time moves, and status, commit and switch must see it."""
    root = tmp_path / "w"
    repo = Repo.init(root)
    path = root / "weights.bin"
    old = time.time_ns() - 10**9

    def put(data):
        with open(path, "r+b" if path.exists() else "wb") as f:  # in place: the inode stays
            f.write(data)
        os.utime(path, ns=(old, old))

    put(rng.bytes(4096))
    first = repo.commit("one")
    repo.create_branch("other", first)
    put(rng.bytes(4096))
    _settle()
    repo.commit("two")
    assert repo.status().clean  # and the stat cache now holds the file
    put(rng.bytes(4096))  # a third content: same size, same mtime, same inode
    _settle()
    repo.close()
    st = json.loads(mvc("status", "--json", cwd=root).output)
    assert st["modified"] == ["weights.bin"], st
    h = sha256(path)
    res = mvc_proc("switch", "other", cwd=root)
    assert res.returncode != 0 and "Traceback" not in res.stderr  # a dirty tree is refused
    assert sha256(path) == h
    mvc("commit", "-m", "three", cwd=root)
    mvc("checkout", "-f", "HEAD~1", cwd=root)
    mvc("checkout", "-f", "main", cwd=root)
    assert sha256(path) == h


def test_paths_longer_than_an_lmdb_key_are_cached(tmp_path, rng):
    """LMDB keys end at 511 bytes; the stat cache keys a path by its hash, so a 650-byte path
    commits, shows clean and checks out (it failed with MDB_BAD_VALSIZE)."""
    root = tmp_path / "w"
    repo = Repo.init(root)
    deep = root / ("a" * 200) / ("b" * 200) / ("c" * 200)
    deep.mkdir(parents=True)
    f = deep / ("d" * 40 + ".bin")
    f.write_bytes(rng.bytes(1000))
    old = time.time_ns() - 10**9
    os.utime(f, ns=(old, old))
    _settle()
    assert len(os.path.relpath(f, root).encode()) > 600
    repo.commit("deep")
    assert repo.status().clean
    assert repo.status().clean  # from the cache this time
    repo.close()
    h = sha256(f)
    os.remove(f)
    mvc("checkout", "-f", "main", cwd=root)
    assert sha256(f) == h


def test_the_weight_hash_hook_sees_a_copy_that_keeps_size_and_mtime(tmp_path, rng):
    from mvc.hooks import weighthash as W
    from tests.helpers import write_safetensors

    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"a": ("F32", (256,), rng.bytes(1024))})
    cache = W.StatCache(str(tmp_path / "cache.json"))
    W.run(str(tmp_path), ["m.safetensors"], True, cache)
    st = p.stat()
    with open(p, "r+b") as f:  # another weight, same size, mtime put back
        f.seek(st.st_size - 4)
        f.write(b"\x01\x02\x03\x04")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    reports, hashed = W.run(str(tmp_path), ["m.safetensors"], False, W.StatCache(str(tmp_path / "cache.json")))
    assert hashed == 1 and [r.path for r in reports] == ["m.safetensors"]


def test_a_killed_checkout_leaves_no_temporary_files_behind(tmp_path, rng):
    """A checkout killed while writing leaves `.<name>.<pid>.mvc-tmp`; the next command that
    takes the repository lock removes them (and nothing else)."""
    root = tmp_path / "w"
    repo = Repo.init(root)
    (root / "sub").mkdir()
    (root / "sub" / "a.bin").write_bytes(rng.bytes(100))
    repo.commit("one")
    repo.close()
    left = [root / ".model.safetensors.4242.mvc-tmp", root / "sub" / ".a.bin.77.mvc-tmp"]
    for p in left:
        p.write_bytes(b"half a file")
    keep = [root / "notes.mvc-tmp.txt", root / ".mvc" / ".x.1.mvc-tmp"]
    for p in keep:
        p.write_bytes(b"mine")
    assert json.loads(mvc("status", "--json", cwd=root).output)["clean"] is False  # notes.mvc-tmp.txt
    mvc("checkout", "-f", "main", cwd=root)
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in keep)


def _one_line_error(res, *words):
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


def test_a_safetensors_header_nested_too_deeply_is_one_line(tmp_path):
    """Defect 6: 100,000 nested arrays in the header made json raise RecursionError."""
    import struct

    root = tmp_path / "w"
    Repo.init(root).close()
    h = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    h += b" " * (-len(h) % 8)
    (root / "m.safetensors").write_bytes(struct.pack("<Q", len(h)) + h)
    _one_line_error(mvc_proc("commit", "-m", "x", cwd=root), "m.safetensors", "nested too deeply")


def test_a_file_name_that_is_not_utf8_is_named_and_can_be_ignored(tmp_path):
    """Defect 6: a non-UTF-8 name raised UnicodeEncodeError in status and commit."""
    root = tmp_path / "w"
    Repo.init(root).close()
    (root / "ok.bin").write_bytes(b"x")
    with open(os.path.join(os.fsencode(root), b"bad\xffname.bin"), "wb") as f:
        f.write(b"y")
    for args in (["status"], ["commit", "-m", "x"]):
        _one_line_error(mvc_proc(*args, cwd=root), "bad\\xffname.bin", "not UTF-8", ".mvcignore")
    (root / ".mvcignore").write_text("bad*\n")
    assert mvc_proc("commit", "-m", "x", cwd=root).returncode == 0
    assert json.loads(mvc_proc("status", "--json", cwd=root).stdout)["clean"]


def test_metadata_objects_must_be_canonical_and_in_range():
    """Defects 6 and 9: a commit `tz` of 1e400, a tz given as a string, and an object with an
    unknown key (whose id matches its bytes, as a remote can serve) were accepted or crashed."""
    import pytest

    from mvc.errors import CorruptObjectError
    from mvc.store.objects import Commit, encode_object, parse_object

    raw = encode_object(Commit("a" * 64, (), "x <x@y>", 1, 60, "m\n", None))
    assert parse_object("commit", raw, "c").tz == 60
    good = json.loads(raw)
    for change in ({"tz": "1e400"}, {"tz": "60"}, {"tz": 5000}, {"tz": 1.5}, {"time": 1e300},
                   {"unknown": 1}):
        d = dict(good, **change)
        text = json.dumps(d, sort_keys=True, separators=(",", ":")).replace('"1e400"', "1e400")
        with pytest.raises(CorruptObjectError, match="malformed commit"):
            parse_object("commit", text.encode(), "c")
    with pytest.raises(CorruptObjectError, match="canonical"):  # same content, other spelling
        parse_object("commit", json.dumps(good, indent=1).encode(), "c")


def test_a_remote_format_that_is_not_a_number_is_one_line(tmp_path, rng):
    from tests.helpers import bf16, write_safetensors

    a = tmp_path / "a"
    Repo.init(a).close()
    write_safetensors(a / "m.safetensors", {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    mvc_proc("commit", "-m", "one", cwd=a, check=True)
    remote = tmp_path / "remote"
    mvc_proc("remote", "add", "origin", f"file://{remote}", cwd=a, check=True)
    mvc_proc("push", cwd=a, check=True)
    (remote / "mvc-remote.json").write_text('{"format": "1"}')
    _one_line_error(mvc_proc("fetch", cwd=a), "mvc-remote.json is damaged")


def test_damaged_records_in_the_local_store_are_one_line_or_healed(tmp_path, rng):
    """Defect 6: a ref that is not a commit id, a config `remotes` of the wrong shape, the object
    counters and a reflog entry, each damaged behind mvc's back."""
    from mvc.state import KV_STATS
    from mvc.store.lmdb_backend import LmdbBackend

    root = tmp_path / "w"
    repo = Repo.init(root)
    (root / "a.bin").write_bytes(rng.bytes(100_000))
    repo.commit("one")
    stats = repo.backend.stats()
    repo.close()
    be = LmdbBackend(str(root / ".mvc" / "store"))
    with be.env.begin(write=True) as txn:
        txn.put(KV_STATS, b"\x01\x02\x03", db=be._kv)  # counters: three bytes instead of sixteen
        txn.put(b"HEAD\x00" + bytes(8), b"\xff{not json", db=be._reflog)
    with Repo(root) as r:
        assert r.backend.stats() == stats  # counted again
        assert r.refs.reflog()[0]["msg"] == "(damaged reflog entry)"
    with be.env.begin(write=True) as txn:
        good = txn.get(b"refs/heads/main", db=be._refs)
        txn.put(b"refs/heads/main", b"\xfe" * 64, db=be._refs)
    _one_line_error(mvc_proc("log", cwd=root), "ref refs/heads/main is damaged")
    with be.env.begin(write=True) as txn:
        txn.put(b"refs/heads/main", good, db=be._refs)
    cfg = json.loads((root / ".mvc" / "config.json").read_text())
    for remotes in (5, {"origin": "file:///x"}, {"origin": {"url": 7}}):
        (root / ".mvc" / "config.json").write_text(json.dumps(dict(cfg, remotes=remotes)))
        _one_line_error(mvc_proc("remote", "list", cwd=root), "remotes is damaged")
    (root / ".mvc" / "config.json").write_text(json.dumps(dict(cfg, format="3")))
    _one_line_error(mvc_proc("status", cwd=root), "format must be a number")


def test_a_path_no_file_system_can_hold_is_refused_before_writing():
    """Defect 6: a 300-byte path component from a remote ended a checkout with ENAMETOOLONG."""
    import pytest

    from mvc.errors import UnsafePathError
    from mvc.store.objects import check_path

    assert check_path("a/" + "x" * 255) and check_path("/".join(["y" * 200] * 20))
    for bad in ("a/" + "x" * 256, "/".join(["y" * 200] * 21), "é" * 128, "bad\udcffname"):
        with pytest.raises(UnsafePathError):
            check_path(bad)


def test_a_shape_whose_product_overflows_is_refused_as_safetensors_does():
    """Defect 9: [2^62, 2^62, 0, 2^62] has zero elements, and the safetensors library refuses it
    (its running product overflows); mvc accepted it, in a file and in a tensor object."""
    import struct

    import pytest

    from mvc.errors import CorruptObjectError, InvalidFileError
    from mvc.formats.safetensors import parse_header
    from mvc.store.objects import canonical_json, parse_object

    big = 1 << 62
    head = json.dumps({"t": {"dtype": "F32", "shape": [big, big, 0, big], "data_offsets": [0, 0]}}).encode()
    head += b" " * (-len(head) % 8)
    raw = struct.pack("<Q", len(head)) + head
    with pytest.raises(InvalidFileError, match="overflows"):
        parse_header(raw, len(raw), "m.safetensors")
    ok = json.dumps({"t": {"dtype": "F32", "shape": [big, 0, 4], "data_offsets": [0, 0]}}).encode()
    ok += b" " * (-len(ok) % 8)
    assert parse_header(struct.pack("<Q", len(ok)) + ok, 8 + len(ok), "m").entries[0].shape == (big, 0, 4)
    tensor = canonical_json({"chunk_size": 4 << 20, "chunks": [], "dtype": "F32", "shape": [big, big, 0, big]})
    with pytest.raises(CorruptObjectError, match="overflows"):
        parse_object("tensor", tensor, "t")


def test_forced_checkout_and_hard_reset_repair_a_truncated_model(tmp_path, rng):
    """Defect 8, first half: both parsed the damaged file before overwriting it, and failed."""
    from tests.helpers import bf16, write_safetensors

    root = tmp_path / "w"
    Repo.init(root).close()
    model = root / "m.safetensors"
    write_safetensors(model, {f"l{i}": ("BF16", (256, 256), bf16(rng, (256, 256))) for i in range(3)})
    mvc_proc("commit", "-m", "one", cwd=root, check=True)
    good = sha256(model)
    for args in (["checkout", "--force", "main"], ["reset", "--hard", "HEAD"]):
        with open(model, "r+b") as f:
            f.truncate(1000)
        res = mvc_proc(*args, cwd=root)
        assert res.returncode == 0, res.stderr
        assert sha256(model) == good
    res = mvc_proc("checkout", "main", cwd=root)  # not forced: the truncation is still reported first
    assert res.returncode == 0
    with open(model, "r+b") as f:
        f.truncate(1000)
    assert mvc_proc("checkout", "main", cwd=root).returncode != 0


def test_a_repository_made_again_at_the_same_path_in_one_process(tmp_path, rng):
    """Found by the kill campaign: LMDB environments were cached by path, so a process that
    deleted a repository and made a new one where it was kept writing to the deleted file, and
    the new repository had no store."""
    import shutil

    from mvc.maintenance import fsck
    from tests.helpers import bf16, write_safetensors

    root = tmp_path / "r"
    for i in range(2):
        with Repo.init(root) as r:
            write_safetensors(root / "m.safetensors", {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
            made = r.commit(f"round {i}")
        with Repo(root) as r:
            assert r.refs.head_commit() == made and fsck(r).ok
        shutil.rmtree(root)


def test_a_touched_file_is_not_read_again_and_an_edit_still_shows(tmp_path, rng, monkeypatch):
    """Defect 10 in part: a file whose stat changed but whose bytes did not (touch, `cp -p` of the
    same file, an archive restored) is recognised by the digest of its bytes in the stat cache,
    without parsing it tensor by tensor again; a same-size edit is still seen."""
    from mvc.pipeline import Ingestor
    from tests.helpers import bf16, write_safetensors

    root = tmp_path / "r"
    model = root / "m.safetensors"
    with Repo.init(root) as r:
        write_safetensors(model, {f"t{i}": ("BF16", (8,), bf16(rng, (8,))) for i in range(500)})
        time.sleep(0.2)  # out of the racy window, so the commit caches it
        r.commit("one")
    later = time.time_ns() + 5 * 10**9
    os.utime(model, ns=(later, later))

    def no_read(*_a, **_k):
        raise AssertionError("the touched file was read tensor by tensor again")

    with monkeypatch.context() as m:
        m.setattr(Ingestor, "ingest", no_read)
        with Repo(root) as r:
            assert r.status().clean
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    os.utime(model, ns=(later, later))
    with Repo(root) as r:
        assert r.status().modified == ["m.safetensors"]


def test_a_checkout_run_again_after_a_kill_is_not_blocked_by_its_own_writes(tmp_path, rng):
    """Found by the kill campaign: a checkout killed after it had written a file (HEAD not moved
    yet) could not be run again without --force — the file it had written counted as an
    uncommitted change. A file that already is what the target has is no change to lose."""
    from tests.helpers import bf16, write_safetensors

    root = tmp_path / "r"
    model = root / "m.safetensors"
    with Repo.init(root) as r:
        write_safetensors(model, {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
        old = r.commit("one")
        write_safetensors(model, {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
        r.commit("two")
        (root / "config.json").write_text("{}")
        r.commit("three")
        r.checkout(old, paths=[str(model)])  # where a killed `checkout <old>` leaves the model
        (root / "config.json").unlink()  # and the file the target does not have, removed
        r.checkout(old)  # not blocked
        assert r.refs.head_commit() == old and r.status().clean
        write_safetensors(model, {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})  # a real edit still blocks
        with pytest.raises(DirtyWorkTreeError):
            r.checkout("main")


def _json_text(draw_pairs):
    """JSON object text from (key, value) pairs, keys possibly repeated; values are numbers,
    strings, lists or objects given the same way."""
    def value(v):
        if isinstance(v, list) and v and isinstance(v[0], tuple):
            return _json_text(v)
        if isinstance(v, list):
            return "[" + ",".join(value(x) for x in v) + "]"
        return json.dumps(v)
    return "{" + ",".join(f"{json.dumps(k)}:{value(v)}" for k, v in draw_pairs) + "}"


_keys = st.sampled_from(["a", "b", "a:b", "{", "x\"y", "dtype", "é", "\\u003a"])
_leaf = st.one_of(st.integers(-5, 5), _keys, st.lists(st.integers(0, 3), max_size=3))
_pairs = st.recursive(st.lists(st.tuples(_keys, _leaf), max_size=4),
                      lambda inner: st.lists(st.tuples(_keys, st.one_of(_leaf, inner, st.lists(inner, max_size=2))),
                                             max_size=4), max_leaves=12)


@given(_pairs)
@settings(max_examples=300, deadline=None)
def test_header_json_refuses_every_repeated_key_as_the_checking_parser_does(pairs):
    """The safetensors header's fast duplicate-key check (count pairs and objects outside strings)
    accepts and refuses exactly what the parser that checks every object does."""
    from mvc.formats.safetensors import _load, _no_dupes

    text = _json_text(pairs)
    try:
        want = json.loads(text, object_pairs_hook=_no_dupes)
    except ValueError:
        with pytest.raises(ValueError):
            _load(text)
        return
    assert _load(text) == want
