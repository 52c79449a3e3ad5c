"""Pack files: large values live in append-only packs that LMDB indexes (mvc/store/packs.py)."""

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import time

import pytest

from mvc import Repo
from mvc.store.lmdb_backend import LmdbBackend
from mvc.store.packs import HEADER, LOC_SIZE, PACK_MIN, parse_locator
from tests.helpers import bf16, mvc_cmd, mvc_proc, write_safetensors


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def oid(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=32).digest()


def packs_of(root) -> list:
    d = root / ".mvc" / "store" / "packs"
    return sorted(d.glob("pack-*.pack")) if d.exists() else []


def model(root, rng, n=6, rows=512):
    write_safetensors(root / "m.safetensors",
                      {f"l{i}": ("BF16", (rows, 1024), bf16(rng, (rows, 1024))) for i in range(n)}
                      | {"norm": ("BF16", (16,), bf16(rng, (16,)))})
    return sha256(root / "m.safetensors")


def test_a_commit_puts_chunk_payloads_in_a_pack_and_checks_them_out_bit_exact(tmp_path, rng):
    root = tmp_path / "w"
    repo = Repo.init(root)
    assert json.loads((root / ".mvc" / "config.json").read_text())["format"] == 4
    h = model(root, rng)
    c = repo.commit("one")
    [pack] = packs_of(root)
    assert pack.read_bytes()[:len(HEADER)] == HEADER
    be = repo.backend
    packed = small = 0
    with be.env.begin() as txn:
        for _k, v in txn.cursor(db=be._objects):
            loc = parse_locator(v) if len(v) == LOC_SIZE else None
            if loc is None:
                assert len(v) < PACK_MIN  # metadata and the small tensor stay in LMDB
                small += 1
            else:
                packed += 1
                assert loc[1] + loc[2] <= pack.stat().st_size
    assert packed == 6 and small >= 4  # six 1 MiB tensors; norm, file, tree, commit
    assert be.stats()["stored_bytes"] == sum(len(be.get(o)) for o in be.iter_oids())
    os.unlink(root / "m.safetensors")
    repo.checkout(c, force=True)
    assert sha256(root / "m.safetensors") == h
    repo.close()


def test_a_packed_value_s_view_outlives_its_read_and_a_mapped_one_s_does_not(tmp_path, rng):
    """Backend.lasting: a view of a pack's map stays valid after read_with returns (checkout keeps
    one for a difference's low nibbles), bytes do too; a view of LMDB's map ends with the read."""
    root = tmp_path / "w"
    repo = Repo.init(root)
    model(root, rng, n=1)
    repo.commit("one")
    be = repo.backend
    kept = {}
    with be.env.begin() as txn:
        for k, v in txn.cursor(db=be._objects):
            kept[bytes(k)] = len(v) == LOC_SIZE and parse_locator(v) is not None
    assert set(kept.values()) == {True, False}
    for key, packed in kept.items():
        view = be.read_with(key, lambda v: v)
        assert be.lasting(view) is packed
        if packed:
            assert bytes(view) == be.get(key)  # still readable, after the read
    assert be.lasting(b"value") is True
    repo.close()

def test_a_second_process_appends_to_the_same_pack(tmp_path, rng):
    root = tmp_path / "w"
    Repo.init(root).close()
    versions = []
    for i in range(3):
        h = model(root, rng)
        mvc_proc("-q", "commit", "-m", f"v{i}", cwd=root, check=True)
        versions.append((mvc_proc("rev-parse", "HEAD", cwd=root, check=True).stdout.strip(), h))
    assert len(packs_of(root)) == 1  # each commit reused the pack the last one left unlocked
    for c, h in versions:
        mvc_proc("checkout", "-f", c, cwd=root, check=True)
        assert sha256(root / "m.safetensors") == h


def committed(tmp_path, rng):
    """A repository with one commit of a model, closed; (its root, its one pack)."""
    root = tmp_path / "w"
    with Repo.init(root) as repo:
        model(root, rng)
        repo.commit("one")
    [pack] = packs_of(root)
    return root, pack


def test_truncated_pack_is_named_by_fsck_and_checkout_writes_nothing_wrong(tmp_path, rng):
    root, pack = committed(tmp_path, rng)
    good = root / "m.safetensors"
    os.unlink(good)
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size - 1000)
    fsck = mvc_proc("fsck", cwd=root)
    assert fsck.returncode != 0 and "truncated" in fsck.stdout + fsck.stderr and pack.name in fsck.stdout + fsck.stderr
    co = mvc_proc("checkout", "-f", "HEAD", cwd=root)
    assert co.returncode != 0 and "Traceback" not in co.stderr
    assert len(co.stderr.strip().splitlines()) == 1 and "truncated" in co.stderr
    assert not good.exists()  # no partial model left where the file was
    assert not [p for p in root.iterdir() if p.name.endswith(".mvc-tmp")]


def test_altered_pack_byte_is_caught_by_the_id_check(tmp_path, rng):
    root, pack = committed(tmp_path, rng)
    data = bytearray(pack.read_bytes())
    data[len(HEADER) + 40 + 5000] ^= 0x40  # inside the first record's value
    pack.write_bytes(bytes(data))
    rep = json.loads(mvc_proc("fsck", "--json", cwd=root).stdout)
    assert not rep["ok"] and len(rep["corrupt"]) == 1
    os.unlink(root / "m.safetensors")
    co = mvc_proc("checkout", "-f", "HEAD", cwd=root)
    assert co.returncode != 0 and "Traceback" not in co.stderr and "corrupt" in co.stderr
    assert not (root / "m.safetensors").exists()


def test_missing_pack_is_a_clear_error(tmp_path, rng):
    root, pack = committed(tmp_path, rng)
    os.unlink(pack)
    fsck = mvc_proc("fsck", cwd=root)
    assert fsck.returncode != 0 and "missing" in fsck.stdout and "Traceback" not in fsck.stderr


def test_compaction_gives_back_deleted_values_and_keeps_the_rest(tmp_path):
    be = LmdbBackend(str(tmp_path / "s"), create=True)
    values = {oid(i): os.urandom(PACK_MIN + 1000 * i) for i in range(40)}
    be.put_many(list(values.items()))
    [pack] = be.packs.list()
    before = be.packs.list()[pack]
    be.packs.close()  # as if that process had exited: its pack is idle
    dropped = [o for i, o in enumerate(values) if i % 4]
    be.delete_many(dropped)
    rep = be.compact()
    assert rep.rewritten == 1 and rep.removed == 1
    [new] = be.packs.list()
    assert new != pack and be.packs.list()[new] < before / 3
    assert rep.freed_bytes == before - be.packs.list()[new]
    for i, (o, v) in enumerate(values.items()):
        assert be.get(o) == (None if i % 4 else v)
    assert be.stats()["stored_bytes"] == sum(len(v) for i, v in enumerate(values.values()) if not i % 4)
    be.packs.close()
    assert be.compact().rewritten == 0  # nothing left to give back


def test_compaction_leaves_a_pack_that_another_writer_holds(tmp_path):
    path = str(tmp_path / "s")
    writer = LmdbBackend(path, create=True)
    writer.put_many([(oid(i), os.urandom(PACK_MIN)) for i in range(8)])
    writer.delete_many([oid(i) for i in range(8)])  # all garbage, but its writer may append more
    other = LmdbBackend(path)
    assert other.compact().removed == 0 and len(writer.packs.list()) == 1
    writer.put_many([(oid(100), b"y" * PACK_MIN)])  # the writer goes on appending
    assert other.get(oid(100)) == b"y" * PACK_MIN
    writer.packs.close()
    assert other.compact().removed == 1 and other.get(oid(100)) == b"y" * PACK_MIN


def test_a_reader_follows_a_value_that_compaction_moved(tmp_path):
    path = str(tmp_path / "s")
    a = LmdbBackend(path, create=True)
    keep = os.urandom(PACK_MIN)
    a.put_many([(oid(0), keep)] + [(oid(i), os.urandom(PACK_MIN)) for i in range(1, 9)])
    a.packs.close()
    a.delete_many([oid(i) for i in range(1, 9)])
    reader = LmdbBackend(path)
    assert reader.compact().rewritten == 1
    assert a.get(oid(0)) == keep  # a's old locator is gone; it reads the new one


def test_a_format_2_repository_is_raised_by_its_first_commit(tmp_path, rng):
    root = tmp_path / "w"
    Repo.init(root).close()
    cfg = root / ".mvc" / "config.json"
    cfg.write_text(json.dumps({"format": 2}))
    model(root, rng)
    with Repo(root) as repo:
        assert repo.backend.pack_writes is False
        repo.commit("one")
    assert json.loads(cfg.read_text())["format"] == 4 and len(packs_of(root)) == 1  # packs and NIBBLES
    cfg.write_text(json.dumps({"format": 5}))
    st = mvc_proc("status", cwd=root)
    assert st.returncode != 0 and "newer than this mvc understands" in st.stderr


def add_garbage(path: str, tag: int, n: int = 24) -> None:
    """Values put and deleted straight through the backend, by a writer that then goes away."""
    be = LmdbBackend(path)
    junk = [(oid(1000 * tag + i), os.urandom(1 << 20)) for i in range(n)]
    be.put_many(junk)
    be.delete_many([o for o, _ in junk])
    be.close()


def test_gc_rewrites_a_pack_that_is_mostly_garbage(tmp_path, rng):
    root = tmp_path / "w"
    Repo.init(root).close()
    h = model(root, rng)
    mvc_proc("-q", "commit", "-m", "keep", cwd=root, check=True)
    add_garbage(str(root / ".mvc" / "store"), 0)
    [pack] = packs_of(root)
    size = pack.stat().st_size
    rep = json.loads(mvc_proc("gc", "--json", cwd=root, check=True).stdout)
    [new] = packs_of(root)
    assert rep["packs_rewritten"] == 1 and new != pack and new.stat().st_size < size / 4
    assert rep["disk_freed"] == size - new.stat().st_size
    assert json.loads(mvc_proc("fsck", "--json", cwd=root).stdout)["ok"]
    mvc_proc("checkout", "-f", "HEAD", cwd=root, check=True)
    assert sha256(root / "m.safetensors") == h


@pytest.mark.slow
def test_sigkilled_gc_while_it_compacts_never_loses_an_object(tmp_path, rng):
    random.seed(11)
    root = tmp_path / "w"
    path = str(root / ".mvc" / "store")
    Repo.init(root).close()
    h = model(root, rng, n=12)
    mvc_proc("-q", "commit", "-m", "keep", cwd=root, check=True)
    kills = 0
    for run in range(30):
        add_garbage(path, run)
        t = time.monotonic()
        p = subprocess.Popen(mvc_cmd() + ["-q", "gc"], cwd=root, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(0, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        assert time.monotonic() - t < 60
        rep = json.loads(mvc_proc("fsck", "--json", cwd=root).stdout)
        assert rep["ok"], (run, rep)
    assert kills >= 5
    mvc_proc("checkout", "-f", "HEAD", cwd=root, check=True)
    assert sha256(root / "m.safetensors") == h
    mvc_proc("gc", cwd=root, check=True)
    assert len(packs_of(root)) == 1


def test_locator_is_not_a_stored_value():
    # every stored value starts with a type code below 0xff, so a locator can never be misread
    from mvc.store.ids import TYPES

    assert len(TYPES) < 0xFF
    assert parse_locator(b"\xffP" + bytes(20)) == (0, 0, 0)
    assert parse_locator(b"\x00P" + bytes(20)) is None
    assert struct.calcsize("<2sQQI") == LOC_SIZE == 22


def test_repack_gives_back_the_space_of_the_encodings_it_replaced(tmp_path, rng):
    """repack appends its re-encodings to the pack it writes, often the very pack that holds the
    old ones: compaction must take that pack too, or the store grows by what was re-encoded."""
    import numpy as np

    root = tmp_path / "w"
    Repo.init(root).close()
    base = np.frombuffer(bf16(rng, (1024, 1024)), np.uint16)
    for i in range(4):  # a fine-tune chain: each version a DIFF against the one before
        write_safetensors(root / "m.safetensors", {"w": ("BF16", (1024, 1024), (base ^ (i * 3)).tobytes())})
        mvc_proc("-q", "commit", "-m", f"v{i}", cwd=root, check=True)
    size = sum(p.stat().st_size for p in packs_of(root))
    rep = json.loads(mvc_proc("repack", "--json", cwd=root, check=True).stdout)
    assert rep["tips_whole"] > 0
    after = sum(p.stat().st_size for p in packs_of(root))
    assert after <= 1.05 * size, (size, after)
    assert json.loads(mvc_proc("fsck", "--json", cwd=root).stdout)["ok"]


def test_a_value_in_parts_is_stored_as_its_joined_bytes(tmp_path):
    """encode(..., joined=True) hands the backend a codec.Joined: appended to a pack part by part
    (one pwritev) when large, joined into LMDB when small, and read back as the joined bytes."""
    from mvc.store.codec import Joined

    be = LmdbBackend(str(tmp_path / "store"), create=True)
    rnd = random.Random(5)
    big = [bytes([0]), os.urandom(PACK_MIN), memoryview(bytearray(rnd.randbytes(777))), b"", b"tail"]
    small = [bytes([0]), b"x" * 100, memoryview(b"yz")]
    items = [(oid(1), Joined(big)), (oid(2), Joined(small)), (oid(3), b"\x00plain")]
    assert len(items[0][1]) == 1 + PACK_MIN + 777 + 4
    be.put_many(items)
    for i, value in ((1, big), (2, small)):
        assert bytes(be.get(oid(i))) == b"".join(bytes(p) for p in value)
    assert bytes(be.get(oid(3))) == b"\x00plain"
    in_packs = {o for entries in be._pack_usage(be.packs.list()).values() for o, _loc in entries}
    assert in_packs == {oid(1)}  # the small ones live in LMDB
    be.close()
