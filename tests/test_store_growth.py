"""Dedup and compression, measured by the store's own byte count."""

from pathlib import Path

import numpy as np
import pytest

from mvc.errors import NothingToCommitError
from mvc.store import codec
from tests.helpers import bf16, f32, write_safetensors

KIB = 1024


def model(rng, n=8, shape=(512, 512), make=bf16, dtype="BF16"):
    return {f"layer{i}.weight": (dtype, shape, make(rng, shape)) for i in range(n)}


def test_changing_one_tensor_stores_about_that_tensor(repo, rng):
    root = Path(repo.root)
    tensors = model(rng)
    write_safetensors(root / "model.safetensors", tensors, metadata={"format": "pt"})
    repo.commit("base")
    before = repo.backend.stats()["stored_bytes"]
    new = bf16(rng, (512, 512))
    tensors["layer3.weight"] = ("BF16", (512, 512), new)
    write_safetensors(root / "model.safetensors", tensors, metadata={"format": "pt"})
    repo.commit("edit layer 3")
    added = repo.backend.stats()["stored_bytes"] - before
    one_tensor = sum(len(codec.encode(0, new[i:i + (4 << 20)], 2)) for i in range(0, len(new), 4 << 20))
    assert added <= one_tensor + 4 * KIB, (added, one_tensor)
    assert added >= one_tensor  # the new tensor really is stored


def test_unchanged_tree_adds_only_the_commit(repo, rng):
    root = Path(repo.root)
    write_safetensors(root / "model.safetensors", model(rng, 2))
    repo.commit("base")
    with pytest.raises(NothingToCommitError):
        repo.commit("again")
    before = repo.backend.stats()
    repo.commit("empty", allow_empty=True)
    after = repo.backend.stats()
    assert after["objects"] == before["objects"] + 1  # the commit object; tree is shared
    assert after["stored_bytes"] - before["stored_bytes"] < 1 * KIB


@pytest.mark.parametrize("make,dtype,limit", [(bf16, "BF16", 0.70), (f32, "F32", 0.86)])
def test_store_ratio_normal_weights(repo, rng, make, dtype, limit):
    root = Path(repo.root)
    tensors = model(rng, n=4, shape=(1024, 1024), make=make, dtype=dtype)
    write_safetensors(root / "model.safetensors", tensors)
    raw = (root / "model.safetensors").stat().st_size
    repo.commit("base")
    assert repo.backend.stats()["stored_bytes"] / raw <= limit


def test_same_tensor_in_two_files_stored_once(repo, rng):
    root = Path(repo.root)
    t = model(rng, 2)
    write_safetensors(root / "a.safetensors", t)
    write_safetensors(root / "b.safetensors", dict(reversed(list(t.items()))))
    repo.commit("two copies")
    stored = repo.backend.stats()["stored_bytes"]
    raw_one = sum(len(v[2]) for v in t.values())
    assert stored < 0.8 * raw_one


def test_status_and_noop_commit_rehash_nothing(repo, rng, monkeypatch):
    import os
    import time

    from mvc import pipeline

    root = Path(repo.root)
    write_safetensors(root / "model.safetensors", model(rng, 2))
    old = time.time() - 10  # outside the racy window
    os.utime(root / "model.safetensors", (old, old))
    time.sleep(0.15)  # utime moved the change time: let it leave the racy window too
    repo.commit("base")
    calls = []
    real = pipeline.Ingestor.ingest
    monkeypatch.setattr(pipeline.Ingestor, "ingest", lambda self, *a: calls.append(a) or real(self, *a))
    assert repo.status().clean
    with pytest.raises(NothingToCommitError):
        repo.commit("nothing")
    assert calls == []
    # a touched file with the same content is known by the digest of its bytes (docs/format.md §8):
    # still clean, not parsed again, and its entry renewed
    os.utime(root / "model.safetensors", (old + 1, old + 1))
    time.sleep(0.15)
    assert repo.status().clean and calls == []
    assert repo.status().clean and calls == []


def test_statcache_detects_same_size_edit(repo, rng):
    import os
    import time

    root = Path(repo.root)
    tensors = model(rng, 1, shape=(64, 64))
    write_safetensors(root / "m.safetensors", tensors)
    old = time.time() - 10
    os.utime(root / "m.safetensors", (old, old))
    repo.commit("base")
    data = bytearray((root / "m.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (root / "m.safetensors").write_bytes(bytes(data))
    assert repo.status().modified == ["m.safetensors"]


def test_pruned_commit_smaller_than_dense(repo, rng):
    root = Path(repo.root)
    w = np.frombuffer(bf16(rng, (1024, 1024)), dtype="<u2").copy()
    write_safetensors(root / "m.safetensors", {"w": ("BF16", (1024, 1024), w.tobytes())})
    repo.commit("dense")
    dense = repo.backend.stats()["stored_bytes"]
    w[rng.random(w.size) < 0.5] = 0
    write_safetensors(root / "m.safetensors", {"w": ("BF16", (1024, 1024), w.tobytes())})
    repo.commit("pruned")
    assert repo.backend.stats()["stored_bytes"] - dense < 0.8 * dense
