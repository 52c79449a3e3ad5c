"""One conformance suite for every backend (memory and LMDB)."""

import pytest

from mvc.errors import RefConflictError
from mvc.store.backend import MemoryBackend
from mvc.store.lmdb_backend import LmdbBackend


@pytest.fixture(params=["memory", "lmdb", "lmdb-packed", "lmdb-unpacked"])
def backend(request, tmp_path):
    if request.param == "memory":
        return MemoryBackend()
    if request.param == "lmdb-packed":  # every value in a pack file
        return LmdbBackend(str(tmp_path / "store"), create=True, pack_min=1)
    return LmdbBackend(str(tmp_path / "store"), create=True, packs=request.param == "lmdb")


def oid(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_put_get_dedup_and_counts(backend):
    assert backend.stats() == {"objects": 0, "stored_bytes": 0}
    assert backend.put_many([(oid(1), b"abc"), (oid(2), b"defg")]) == 7
    assert backend.put_many([(oid(1), b"abc"), (oid(3), b"h")]) == 1  # oid 1 already there
    assert backend.stats() == {"objects": 3, "stored_bytes": 8}
    assert backend.get(oid(2)) == b"defg" and backend.has(oid(3)) and not backend.has(oid(9))
    assert backend.get(oid(9)) is None
    assert backend.delete_many([oid(2), oid(9)]) == 4
    assert backend.stats() == {"objects": 2, "stored_bytes": 4}


def test_replace_keeps_ids_and_counts(backend):
    backend.put_many([(oid(1), b"abcdef"), (oid(2), b"xy")])
    assert backend.replace_many([(oid(1), b"ab"), (oid(9), b"zzz")]) == -4  # 9 is absent: skipped
    assert backend.get(oid(1)) == b"ab" and not backend.has(oid(9))
    assert backend.stats() == {"objects": 2, "stored_bytes": 4}


def test_iter_with_prefix(backend):
    keys = [bytes([0xAB, i]) + bytes(30) for i in range(5)] + [bytes([0xAC]) + bytes(31)]
    backend.put_many([(k, b"x") for k in keys])
    assert list(backend.iter_oids(b"\xab")) == sorted(keys[:5])
    assert len(list(backend.iter_oids())) == 6
    assert list(backend.iter_oids(b"\xff")) == []


def test_refs_compare_and_swap(backend):
    backend.update_refs([("refs/heads/main", None, "1" * 64)], [("refs/heads/main", {"msg": "a"})])
    assert backend.get_ref("refs/heads/main") == "1" * 64
    with pytest.raises(RefConflictError):
        backend.update_refs([("refs/heads/main", "0" * 64, "2" * 64)], [])
    assert backend.get_ref("refs/heads/main") == "1" * 64
    # all-or-nothing: one failing expectation leaves every ref as it was
    with pytest.raises(RefConflictError):
        backend.update_refs([("refs/heads/x", None, "3" * 64), ("refs/heads/main", None, "4" * 64)], [])
    assert backend.get_ref("refs/heads/x") is None
    backend.update_refs([("refs/heads/main", "1" * 64, "2" * 64)], [("refs/heads/main", {"msg": "b"})])
    assert [e["msg"] for e in backend.reflog("refs/heads/main")] == ["a", "b"]
    backend.update_refs([("refs/tags/t", None, "5" * 64)], [])
    assert backend.list_refs("refs/heads/") == {"refs/heads/main": "2" * 64}
    assert set(backend.list_refs()) == {"refs/heads/main", "refs/tags/t"}
    backend.update_refs([("refs/heads/main", "2" * 64, None)], [])
    assert backend.get_ref("refs/heads/main") is None and backend.reflog("refs/heads/main") == []


def test_reflog_many_entries_in_order(backend):
    backend.update_refs([("HEAD", None, "x")], [])
    for i in range(300):
        backend.update_refs([], [("HEAD", {"i": i})])
    assert [e["i"] for e in backend.reflog("HEAD")] == list(range(300))


def test_kv(backend):
    backend.kv_put_many({b"a": b"1", b"b": b"2"})
    assert backend.kv_get(b"a") == b"1"
    backend.kv_put_many({b"a": None})
    assert backend.kv_get(b"a") is None and backend.kv_get(b"b") == b"2"


def test_lmdb_grows_its_map(tmp_path):
    be = LmdbBackend(str(tmp_path / "s"), create=True, packs=False)  # large values in the map itself
    start = be.env.info()["map_size"]
    big = b"x" * (8 << 20)
    n = start // len(big) + 4
    for i in range(n):
        be.put_many([(oid(i), big[:-1] + bytes([i % 256]))])
    assert be.env.info()["map_size"] > start
    assert be.stats()["objects"] == n


def test_batch_reads_match_single_reads(backend):
    backend.put_many([(oid(i), bytes([i]) * (i + 1)) for i in range(1, 6)])
    asked = [oid(3), oid(9), oid(1), oid(5)]
    assert backend.get_many(asked) == [backend.get(o) for o in asked] == [b"\x03" * 4, None, b"\x01" * 2, b"\x05" * 6]
    assert backend.has_many(asked) == {oid(3), oid(1), oid(5)}
    assert backend.get_many([]) == [] and backend.has_many([]) == set()


def test_stored_size_without_reading(backend):
    backend.put_many([(oid(1), b"x" * 70_000), (oid(2), b"abc")])
    assert backend.stored_size(oid(1)) == 70_000 and backend.stored_size(oid(2)) == 3
    assert backend.stored_size(oid(9)) is None
