"""Corruption is reported, never passed on; checkout never writes outside the work tree."""

import json
import os
from pathlib import Path

import pytest

from mvc import Repo
from mvc.errors import UnsafePathError
from mvc.store import codec
from mvc.store.ids import TYPE_CODE, hash_object
from mvc.store.objects import Commit, File, canonical_json
from tests.helpers import bf16, mvc_proc, sha256, write_safetensors


def flip_stored_byte(repo: Repo, oid_hex: str) -> None:
    """Flip one byte of an object's stored value in the file that holds it (bit rot): LMDB's data
    file or, for a large value, its pack. Every copy of it there is flipped: a later transaction
    that touched the same LMDB page leaves the page's old copy in the file (copy-on-write) until
    the page is reused, and which copy is live is LMDB's business."""
    stored = repo.backend.get(bytes.fromhex(oid_hex))
    mid = len(stored) // 2
    needle = stored[mid:mid + 48]
    store = os.path.join(repo.root, ".mvc", "store")
    packs = os.path.join(store, "packs")
    files = [os.path.join(store, "data.mdb")] + ([os.path.join(packs, p) for p in os.listdir(packs)]
                                                 if os.path.isdir(packs) else [])
    found = 0
    for path in files:
        with open(path, "r+b") as f:
            data = f.read()
            pos = data.find(needle)
            while pos >= 0:
                found += 1
                f.seek(pos + 10)
                f.write(bytes([data[pos + 10] ^ 0x01]))
                pos = data.find(needle, pos + 1)
    assert found >= 1


def test_flipped_chunk_byte_is_found_and_never_checked_out(repo, rng):
    root = Path(repo.root)
    write_safetensors(root / "m.safetensors", {f"w{i}": ("BF16", (256, 256), bf16(rng, (256, 256))) for i in range(3)})
    good = sha256(root / "m.safetensors")
    repo.commit("one")
    f = repo.odb.get(repo.tree_of("HEAD").entries[0].oid, "file")
    victim = repo.odb.get(f.tensors[1][1], "tensor").chunks[0]
    flip_stored_byte(repo, victim)

    res = mvc_proc("fsck", cwd=root)
    assert res.returncode == 1
    assert victim in res.stdout

    os.remove(root / "m.safetensors")
    res = mvc_proc("checkout", "-f", "main", cwd=root)
    assert res.returncode != 0
    assert victim in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # never a wrong file: nothing at the path, and no temporary left behind
    assert not (root / "m.safetensors").exists()
    assert [p for p in os.listdir(root) if p != ".mvc"] == []
    assert good  # the original hash is what a repaired store would give back


def test_corrupt_metadata_object_named(repo, rng):
    root = Path(repo.root)
    write_safetensors(root / "m.safetensors", {"w": ("BF16", (512, 512), bf16(rng, (512, 512)))})
    repo.commit("one")
    tree_oid = repo.commit_obj(repo.resolve("HEAD")).tree
    # rewrite the stored tree through the backend with a damaged body
    stored = bytearray(repo.backend.get(bytes.fromhex(tree_oid)))
    stored[-3] ^= 0x20
    with repo.backend.env.begin(write=True) as txn:
        txn.put(bytes.fromhex(tree_oid), bytes(stored), db=repo.backend._objects)
    res = mvc_proc("fsck", "--json", cwd=root)
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert tree_oid in report["corrupt"]


def put_raw(repo, kind: str, content: bytes) -> str:
    oid = hash_object(kind, content)
    repo.backend.put_many([(oid, codec.encode(TYPE_CODE[kind], content))])
    return oid.hex()


def evil_commit(repo, paths: list[str]) -> str:
    """A commit whose tree names *paths* (bypassing validation, as a hostile remote could)."""
    chunk = put_raw(repo, "chunk", b"pwned\n")
    fid = repo.odb.put(File("raw", 6, (chunk,)))
    entries = [[p, 0o100644, fid] for p in sorted(paths, key=str.encode)]
    tree = put_raw(repo, "tree", canonical_json({"entries": entries}))
    c = Commit(tree, (), "evil <e@x>", 0, 0, "evil\n")
    oid = repo.odb.put(c)
    repo.refs.set_ref("refs/heads/evil", oid, None, "test")
    return oid


@pytest.mark.parametrize("bad", ["../x", "/tmp/abs-mvc-test", ".mvc/config.json", ".MVC/config.json",
                                 "a/../../x", ".git/config", "sub/.Mvc./x"])
def test_hostile_tree_paths_never_written(repo, tmp_path, bad):
    root = Path(repo.root)
    cfg = sha256(root / ".mvc" / "config.json")
    evil_commit(repo, ["ok.txt", bad])
    res = mvc_proc("checkout", "evil", cwd=root)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "unsafe path" in res.stderr
    assert not (tmp_path / "x").exists() and not Path("/tmp/abs-mvc-test").exists()
    assert sha256(root / ".mvc" / "config.json") == cfg
    assert not (root / "ok.txt").exists()  # refused before anything was written


def test_checkout_never_writes_through_symlink(repo, tmp_path):
    root = Path(repo.root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "keep.txt").write_text("x")
    repo.commit("base")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    evil_commit(repo, ["sub/f.txt"])
    with pytest.raises(UnsafePathError):
        repo.checkout("evil", force=True)
    assert list(outside.iterdir()) == []
    with pytest.raises(UnsafePathError):
        repo.checkout("evil", paths=[str(root / "sub")])
    assert list(outside.iterdir()) == []


def test_symlinked_file_is_committed_as_content(repo, tmp_path):
    root = Path(repo.root)
    target = tmp_path / "blob.bin"
    target.write_bytes(b"weights")
    (root / "model.bin").symlink_to(target)
    repo.commit("link")
    os.remove(root / "model.bin")
    repo.checkout("main", force=True)
    assert (root / "model.bin").read_bytes() == b"weights" and not (root / "model.bin").is_symlink()
