"""Bit-exact round trips of every kind of file the issue lists, proven with SHA-256."""

import json
import os

import numpy as np
import pytest
import torch

from mvc import Repo
from tests.helpers import bf16, f32, mvc, sha256, tree_hashes, write_safetensors


def mixed_tensors(rng, scale=1.0):
    t = {
        "bf16": ("BF16", (64, 33), bf16(rng, (64, 33))),
        "fp16": ("F16", (17, 5), np.float16(rng.standard_normal(85) * scale).tobytes()),
        "fp32": ("F32", (1000,), f32(rng, (1000,))),
        "int8": ("I8", (3, 7), rng.integers(-128, 127, 21, dtype=np.int8).tobytes()),
        "int64": ("I64", (9,), rng.integers(-2**62, 2**62, 9, dtype=np.int64).tobytes()),
        "mask": ("BOOL", (5, 5), (rng.random(25) > 0.5).astype(np.uint8).tobytes()),
        "empty": ("F32", (0, 4), b""),
    }
    if hasattr(torch, "float8_e4m3fn"):
        x = torch.randn(48).to(torch.float8_e4m3fn)
        t["fp8"] = ("F8_E4M3", (48,), x.view(torch.uint8).numpy().tobytes())
    return t


def make_tree(root, rng):
    write_safetensors(root / "model.safetensors", mixed_tensors(rng), metadata={"format": "pt", "note": "x"})
    # a sharded model: index JSON + 2 shards
    shards = {}
    for s in (1, 2):
        name = f"model-0000{s}-of-00002.safetensors"
        ts = {f"layers.{s}.{k}": ("BF16", (128, 64), bf16(rng, (128, 64))) for k in ("q", "k", "v")}
        write_safetensors(root / "sharded" / name, ts, metadata={"format": "pt"})
        shards.update({k: name for k in ts})
    (root / "sharded" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 6 * 128 * 64 * 2}, "weight_map": shards}, indent=2))
    torch.save({"w": torch.randn(10, 10), "b": torch.arange(5), "h": torch.randn(3).bfloat16()},
               root / "weights.pt")
    (root / "config.json").write_text(json.dumps({"hidden_size": 64, "architectures": ["X"]}))
    (root / "bin.dat").write_bytes(rng.bytes(5 * 1024 * 1024 + 17))  # > one chunk of raw bytes


def test_commit_modify_checkout_bit_exact(repo, rng):
    root = repo.root
    from pathlib import Path

    root = Path(root)
    make_tree(root, rng)
    before = tree_hashes(root)
    first = repo.commit("first")
    # modify every kind of file
    write_safetensors(root / "model.safetensors", mixed_tensors(rng), metadata={"format": "pt"})
    write_safetensors(root / "sharded" / "model-00002-of-00002.safetensors",
                      {"layers.2.q": ("BF16", (128, 64), bf16(rng, (128, 64)))})
    torch.save({"w": torch.zeros(2)}, root / "weights.pt")
    (root / "config.json").write_text("{}")
    os.remove(root / "bin.dat")
    (root / "new.txt").write_text("new")
    second = repo.commit("second")
    assert second != first
    assert tree_hashes(root) != before
    repo.checkout(first)
    assert tree_hashes(root) == before
    assert repo.status().clean
    repo.checkout("main")
    assert (root / "new.txt").read_text() == "new" and not (root / "bin.dat").exists()


def test_cli_round_trip_and_load(tmp_path, rng):
    work = tmp_path / "w"
    mvc("init", work)
    make_tree(work, rng)
    before = tree_hashes(work)
    mvc("commit", "-m", "one", cwd=work)
    with Repo(work) as r:
        loaded = r.load("HEAD", "model.safetensors")
        from safetensors.torch import load_file

        ref = load_file(work / "model.safetensors")
        assert loaded.keys() == ref.keys()
        for k in ref:
            assert loaded[k].dtype == ref[k].dtype and loaded[k].shape == ref[k].shape
            assert torch.equal(loaded[k].view(torch.uint8), ref[k].view(torch.uint8)) if ref[k].numel() else True
        pt = r.load("HEAD", "weights.pt")
        assert torch.equal(pt["w"], torch.load(work / "weights.pt", weights_only=True)["w"])
    for p in before:
        os.remove(work / p)
    mvc("checkout", "-f", "main", cwd=work)
    assert tree_hashes(work) == before


def test_checkout_paths_restores_only_those(repo, rng):
    from pathlib import Path

    root = Path(repo.root)
    make_tree(root, rng)
    repo.commit("one")
    h = sha256(root / "config.json")
    (root / "config.json").write_text("changed")
    (root / "weights.pt").write_bytes(b"changed too")
    repo.checkout("HEAD", paths=[str(root / "config.json")])
    assert sha256(root / "config.json") == h
    assert (root / "weights.pt").read_bytes() == b"changed too"


def test_save_and_load_api(repo):
    sd = {"a": torch.randn(4, 4), "b": torch.randn(3).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3)}
    oid = repo.save(sd, "m/model.safetensors", "saved")
    assert repo.log()[0].oid == oid
    got = repo.load(oid)
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k])


def test_load_does_not_touch_work_tree(repo, rng):
    from pathlib import Path

    root = Path(repo.root)
    write_safetensors(root / "m.safetensors", {"w": ("F32", (4,), f32(rng, (4,)))})
    repo.commit("one")
    write_safetensors(root / "m.safetensors", {"w": ("F32", (4,), f32(rng, (4,)))})
    h = sha256(root / "m.safetensors")
    old = repo.load("HEAD")
    assert sha256(root / "m.safetensors") == h
    assert old["w"].shape == (4,)


@pytest.mark.parametrize("exe", [True, False])
def test_mode_round_trip(repo, exe):
    from pathlib import Path

    p = Path(repo.root) / "run.sh"
    p.write_text("#!/bin/sh\n")
    os.chmod(p, 0o755 if exe else 0o644)
    repo.commit("m")
    os.remove(p)
    repo.checkout("main", force=True)
    assert bool(os.stat(p).st_mode & 0o100) == exe


def test_repo_over_memory_backend(tmp_path, rng):
    """Repo is composed from parts: the same workflow runs on the in-memory backend."""
    from mvc.store.backend import MemoryBackend

    r = Repo.init(tmp_path / "m", backend=MemoryBackend())
    root = tmp_path / "m"
    write_safetensors(root / "x.safetensors", {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    h = sha256(root / "x.safetensors")
    first = r.commit("one")
    write_safetensors(root / "x.safetensors", {"w": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    r.commit("two")
    r.checkout(first)
    assert sha256(root / "x.safetensors") == h
    assert not os.path.exists(root / ".mvc" / "store")


def test_checkout_places_chunks_and_falls_back_for_odd_plain_chunks(tmp_path, rng):
    """Checkout writes each chunk at its place from the workers; a plain file stored in chunks
    that are not 4 MiB (another writer's layout) is written in order instead, still exact."""
    from mvc.store.objects import File, Tree, TreeEntry

    root = tmp_path / "w"
    repo = Repo.init(root)
    data = rng.bytes(3 * 1024 * 1024 + 5)
    pieces = [data[i:i + 1000003] for i in range(0, len(data), 1000003)]  # four odd chunks
    chunks = tuple(repo.odb.put_chunk(p) for p in pieces)
    fid = repo.odb.put(File("raw", len(data), chunks))
    c = repo.write_commit(Tree((TreeEntry("odd.bin", 0o100644, fid),)), (), "odd chunks")
    repo.checkout(c, force=True)
    assert (root / "odd.bin").read_bytes() == data


def test_a_tensor_chunk_of_the_wrong_length_is_refused_and_nothing_written(tmp_path, rng):
    from mvc.store.objects import File, Tensor, Tree, TreeEntry

    root = tmp_path / "w"
    repo = Repo.init(root)
    write_safetensors(root / "m.safetensors", {"w": ("F32", (1000,), f32(rng, (1000,)))})
    repo.commit("good")
    before = sha256(root / "m.safetensors")
    good = repo.odb.get(repo.tree_of("HEAD").entries[0].oid, "file")
    short = repo.odb.put_chunk(rng.bytes(3996))  # the tensor needs 4000 bytes
    tid = repo.odb.put(Tensor("F32", (1000,), 4 * 1024 * 1024, (short,)))
    fid = repo.odb.put(File("safetensors", good.size, good.chunks, (("w", tid),)))
    bad = repo.write_commit(Tree((TreeEntry("m.safetensors", 0o100644, fid),)), (repo.resolve("HEAD"),), "short")
    with pytest.raises(Exception, match="bytes where its tensor needs 4000"):
        repo.checkout(bad, force=True)
    assert sha256(root / "m.safetensors") == before
    assert not [p for p in os.listdir(root) if p.endswith(".mvc-tmp")]


def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, rng, monkeypatch):
    """Checkout reserves a file's space before writing it: a full disk is refused there, with the
    old file in place and no temporary left behind."""
    import errno

    from mvc.errors import MvcError

    root = tmp_path / "w"
    repo = Repo.init(root)
    write_safetensors(root / "m.safetensors", {"w": ("F32", (1000,), f32(rng, (1000,)))})
    first = repo.commit("one")
    write_safetensors(root / "m.safetensors", {"w": ("F32", (1000,), f32(rng, (1000,)))})
    repo.commit("two")
    before = sha256(root / "m.safetensors")

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(MvcError, match="no space left"):
        repo.checkout(first, force=True)
    assert sha256(root / "m.safetensors") == before
    assert not [p for p in os.listdir(root) if p.endswith(".mvc-tmp")]


def test_many_tiny_tensors_between_large_ones(repo, rng):
    """Tiny tensors (read in runs, written in runs) between ones the workers take: bit-exact both
    ways, a recommit stores nothing, and an edit of one tiny tensor is the one change."""
    from pathlib import Path

    root = Path(repo.root)
    tensors = {}
    for i in range(300):
        tensors[f"t{i:03d}.bias"] = ("F32", (7,), f32(rng, (7,)))
        if i % 50 == 0:  # a large one now and then (over the main thread's inline limit)
            tensors[f"t{i:03d}.weight"] = ("BF16", (256, 160), bf16(rng, (256, 160)))
    tensors["zero"] = ("F32", (0,), b"")
    write_safetensors(root / "m.safetensors", tensors)
    before = sha256(root / "m.safetensors")
    first = repo.commit("tiny")
    stored = repo.odb.backend.stats()["stored_bytes"]
    os.utime(root / "m.safetensors", (1, 1))  # hashed again, not taken from the stat cache
    repo.commit("again", allow_empty=True)
    assert repo.odb.backend.stats()["stored_bytes"] - stored < 1024  # a tree and a commit, no tensors
    tensors["t123.bias"] = ("F32", (7,), f32(rng, (7,)))
    write_safetensors(root / "m.safetensors", tensors)
    (change,) = repo.diff(None, None)
    assert change.path == "m.safetensors"
    assert [(t.name, t.status) for t in change.tensors] == [("t123.bias", "modified")]
    os.remove(root / "m.safetensors")
    repo.checkout(first, force=True)
    assert sha256(root / "m.safetensors") == before
