"""Diff statistics against a numpy reference; unchanged tensors are never read."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mvc import Repo
from mvc.diff.stats import to_float64
from mvc.store.backend import MemoryBackend
from tests.helpers import mvc, write_safetensors

FLOATS = ["BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"]
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
         "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def reference(a: torch.Tensor, b: torch.Tensor) -> dict:
    x = a.to(torch.float64).numpy().ravel()
    y = b.to(torch.float64).numpy().ravel()
    d = y - x
    return {
        "numel": x.size,
        # elements whose bytes differ
        "changed": int((a.view(torch.uint8).reshape(x.size, -1)
                        != b.view(torch.uint8).reshape(x.size, -1)).any(1).sum()),
        "sparsity_old": float(np.mean(x == 0)), "sparsity_new": float(np.mean(y == 0)),
        "l2_delta": float(np.linalg.norm(d)), "l2_old": float(np.linalg.norm(x)), "l2_new": float(np.linalg.norm(y)),
        "rel_l2_delta": float(np.linalg.norm(d) / np.linalg.norm(x)),
        "max_abs_delta": float(np.abs(d).max()),
        "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
    }


@pytest.mark.parametrize("dtype", FLOATS)
def test_stats_match_numpy(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    n = 3 * 1024 * 1024 // {"F64": 4, "F32": 2}.get(dtype, 1)  # several chunks for wide dtypes
    a = (torch.randn(n, generator=g) * 0.5).to(TORCH[dtype])
    b = a.clone()
    idx = torch.randperm(n, generator=g)[: n // 3]
    b[idx] = (torch.randn(idx.numel(), generator=g) * 0.5).to(TORCH[dtype])
    b[:100] = 0
    root = tmp_path / "w"
    repo = Repo.init(root)
    write_safetensors(root / "m.safetensors", {"w": (dtype, (n,), raw(a))})
    repo.commit("a")
    write_safetensors(root / "m.safetensors", {"w": (dtype, (n,), raw(b))})
    repo.commit("b")
    (tc,) = repo.diff("HEAD~1", "HEAD", stats=True)[0].tensors
    ref = reference(a, b)
    for k, v in ref.items():
        assert math.isclose(tc.stats[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, tc.stats[k], v)
    # the work-tree side is read from the file itself and gives the same numbers
    repo.checkout("HEAD~1", force=True)
    write_safetensors(root / "m.safetensors", {"w": (dtype, (n,), raw(b))})
    (wt,) = repo.diff(None, None, stats=True)[0].tensors
    assert wt.stats == tc.stats


def test_to_float64_matches_torch_for_every_float8():
    allbytes = bytes(range(256))
    for dtype in ("F8_E4M3", "F8_E5M2"):
        ref = torch.frombuffer(bytearray(allbytes), dtype=TORCH[dtype]).to(torch.float64).numpy()
        ours = to_float64(dtype, allbytes)
        assert np.array_equal(np.isnan(ref), np.isnan(ours))
        assert np.array_equal(ref[~np.isnan(ref)], ours[~np.isnan(ours)])


class CountingBackend(MemoryBackend):
    def __init__(self):
        super().__init__()
        self.chunk_reads: list[bytes] = []

    def get(self, oid):
        v = super().get(oid)
        if v is not None and v[0] == 0:  # type code 0: chunk
            self.chunk_reads.append(oid)
        return v


def test_unchanged_tensors_are_never_read(tmp_path, rng):
    be = CountingBackend()
    root = tmp_path / "w"
    repo = Repo.init(root, backend=be)
    tensors = {f"t{i}": ("F32", (300_000,), rng.standard_normal(300_000).astype("<f4").tobytes()) for i in range(6)}
    write_safetensors(root / "m.safetensors", tensors)
    repo.commit("a")
    changed = rng.standard_normal(300_000).astype("<f4").tobytes()
    tensors["t4"] = ("F32", (300_000,), changed)
    write_safetensors(root / "m.safetensors", tensors)
    repo.commit("b")
    be.chunk_reads.clear()
    (fc,) = repo.diff("HEAD~1", "HEAD", stats=True)
    assert [t.name for t in fc.tensors] == ["t4"]
    t4_old, t4_new = fc.tensors[0].old, fc.tensors[0].new
    expected = {bytes.fromhex(c) for c in (*t4_old.chunks, *t4_new.chunks)}
    assert set(be.chunk_reads) == expected and len(be.chunk_reads) == len(expected)


def test_added_removed_and_reshaped(tmp_path, rng):
    root = tmp_path / "w"
    repo = Repo.init(root)
    w = rng.standard_normal(64).astype("<f4")
    write_safetensors(root / "m.safetensors", {"a": ("F32", (64,), w.tobytes()), "gone": ("F32", (2,), b"\0" * 8)})
    repo.commit("a")
    write_safetensors(root / "m.safetensors", {"a": ("F32", (8, 8), w.tobytes()), "new": ("F32", (4,), b"\0" * 16)})
    repo.commit("b")
    stats = {t.name: (t.status, t.stats) for t in repo.diff("HEAD~1", "HEAD", stats=True)[0].tensors}
    assert stats["gone"] == ("removed", {"numel": 2, "sparsity_old": 1.0, "l2_old": 0.0})
    assert stats["new"][1] == {"numel": 4, "sparsity_new": 1.0, "l2_new": 0.0}
    assert stats["a"][0] == "modified" and stats["a"][1]["numel_old"] == stats["a"][1]["numel_new"] == 64
    assert math.isclose(stats["a"][1]["l2_new"], float(np.linalg.norm(w.astype(np.float64))))


def test_cli_diff_outputs(tmp_path, rng):
    root = tmp_path / "w"
    mvc("init", root)
    w = rng.standard_normal(1000).astype("<f4")
    write_safetensors(root / "m.safetensors", {"w": ("F32", (1000,), w.tobytes())})
    mvc("commit", "-m", "a", cwd=root)
    w[:250] = 0
    write_safetensors(root / "m.safetensors", {"w": ("F32", (1000,), w.tobytes())})
    full = mvc("diff", cwd=root).output
    assert "changed 250/1000 (25%)" in full and "sparsity 0.0000 -> 0.2500" in full
    assert "25% changed" in mvc("diff", "--stat", cwd=root).output
    import json

    data = json.loads(mvc("diff", "--json", cwd=root).output)
    assert data[0]["tensors"][0]["stats"]["changed"] == 250
    assert Path(root / "m.safetensors").exists()
