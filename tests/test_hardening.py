"""Defects an adversarial review found (issue: hardening), each pinned by a test that failed
before its fix."""

import json
import os
import time

from mvc import Repo
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
