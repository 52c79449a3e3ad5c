"""Delta-coded chunks (docs/format.md §5.1): exact round trips for every dtype and every delta kind,
property tests on hostile bit patterns, how much each kind of version adds, chains kept bounded,
damaged bases named, gc keeping bases, and repack (killed at random moments, too)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mvc import Repo
from mvc.errors import CorruptObjectError
from mvc.graph import added_by
from mvc.store import codec, kernels
from mvc.store.ids import hash_object
from mvc.store.objects import DTYPES
from tests.helpers import mvc, mvc_cmd, mvc_proc, sha256, write_safetensors

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def roundtrip(new: np.ndarray, base: np.ndarray, k: int, is_float: bool) -> None:
    """Every delta kind of *new* against *base* decodes to *new*'s exact bytes."""
    bid = hash_object("chunk", base.tobytes())

    def bases(oid, kk):
        assert oid == bid and kk == k
        return base

    encodings = [codec.encode_diff(0, new, base, k, is_float, bid, 1),
                 codec.encode_sparse(0, new, base, k, is_float, bid, 1)]
    for stored in encodings:
        assert codec.delta_base(stored) == (bid, 1)
        _, out = codec.decode(stored, "x", bases)
        assert bytes(out) == new.tobytes()


# -- the codecs ---------------------------------------------------------------------------------
SPECIAL = {2: [0x7FC1, 0xFFC0, 0x8000, 0x0000, 0x0001, 0x7F80, 0xFF80, 0x7F81],  # bf16: NaNs, -0, subnormal, inf
           4: [0x7FC00001, 0xFFFFFFFF, 0x80000000, 0x00000001, 0x7F800000, 0xFF800000, 0x807FFFFF],
           8: [0x7FF8000000000001, 0x8000000000000000, 0x0000000000000001, 0x7FF0000000000000,
               0xFFF0000000000000, 0xFFFFFFFFFFFFFFFF],
           1: [0x00, 0x80, 0xFF, 0x7F, 0x01]}


@settings(max_examples=150, deadline=None)
@given(k=st.sampled_from([1, 2, 4, 8]), is_float=st.booleans(), n=st.integers(1, 3000),
       seed=st.integers(0, 2**32 - 1), changed=st.floats(0, 1), special=st.floats(0, 0.3))
def test_any_base_and_target_decode_exactly(k, is_float, n, seed, changed, special):
    rng = np.random.default_rng(seed)
    dt = UINT[k]
    base = rng.integers(0, np.iinfo(dt).max, size=n, dtype=dt, endpoint=True)
    specials = np.array(SPECIAL[k], dtype=dt)
    for arr in (base,):
        pick = rng.random(n) < special
        arr[pick] = rng.choice(specials, size=int(pick.sum()))
    new = base.copy()
    move = rng.random(n) < changed
    kind = rng.integers(0, 3)
    if kind == 0:  # small moves, as a fine-tune makes
        new[move] = new[move] + rng.integers(-3, 4, size=int(move.sum())).astype(dt)
    elif kind == 1:  # zeros, as a prune makes
        new[move] = 0
    else:  # anything, specials included
        new[move] = rng.choice(np.concatenate([specials, base]), size=int(move.sum()))
    roundtrip(new, base, k, is_float and k > 1)


def test_order_mapping_is_a_bijection_on_every_bf16_pattern():
    u = np.arange(1 << 16, dtype=np.uint16)
    m = kernels._order(u, 2)
    assert np.array_equal(kernels._unorder(m, 2), u)
    assert len(np.unique(m)) == 1 << 16
    # value order: -inf < -1 < -0 < +0 < 1 < inf  (bf16 bits)
    vals = np.array([0xFF80, 0xBF80, 0x8000, 0x0000, 0x3F80, 0x7F80], dtype=np.uint16)
    assert list(np.argsort(kernels._order(vals, 2))) == list(range(6))


def test_delta_value_without_its_base_is_refused():
    base = np.arange(1000, dtype=np.uint16)
    new = base + 1
    stored = codec.encode_diff(0, new, base, 2, True, hash_object("chunk", base.tobytes()), 1)
    with pytest.raises(CorruptObjectError, match="needs its base"):
        codec.decode(stored, "x")
    with pytest.raises(CorruptObjectError):
        codec.decode(stored[:-3], "x", lambda oid, k: base)


# -- repositories -------------------------------------------------------------------------------
def arrays(dtype: str, rng, n: int):
    """(base, fine-tuned, pruned) element arrays of a dtype, as the raw bits."""
    size, is_float = DTYPES[dtype]
    if dtype == "BOOL":
        base = rng.integers(0, 2, n).astype(np.uint8)
        ft = base.copy()
        ft[rng.random(n) < 0.05] ^= 1
        return base, ft, np.zeros_like(base)
    if not is_float or size == 1:
        dt = {"I8": np.int8, "U8": np.uint8, "I32": np.int32, "I64": np.int64, "F8_E4M3": np.uint8}[dtype]
        base = rng.integers(-100 if dt in (np.int8, np.int32, np.int64) else 0, 100, n).astype(dt)
        ft = base.copy()
        ft[rng.random(n) < 0.3] += 1
    else:
        f = {"BF16": np.float32, "F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]
        w = (0.02 * rng.standard_normal(n)).astype(f)
        moved = (w + 1e-3 * rng.standard_normal(n)).astype(f)
        if dtype == "BF16":
            base = (w.view(np.uint32) >> 16).astype(np.uint16)
            ft = (moved.view(np.uint32) >> 16).astype(np.uint16)
        else:
            base, ft = w, moved
    pruned = ft.copy()
    flat = pruned.reshape(-1).view(UINT[pruned.itemsize])
    flat[::2] = 0
    return base, ft, pruned


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3"])
def test_every_dtype_round_trips_through_delta_history(tmp_path, dtype):
    rng = np.random.default_rng(5)
    root = tmp_path / "w"
    repo = Repo.init(root)
    n = (3 << 20) // DTYPES[dtype][0] + 17  # a chunk boundary inside, and a short last chunk
    hashes, commits = [], []
    for version in arrays(dtype, rng, n):
        write_safetensors(root / "m.safetensors", {"t": (dtype, (n,), version.tobytes()),
                                                   "fixed": ("F32", (64,), np.ones(64, np.float32).tobytes())})
        commits.append(repo.commit(f"v{len(commits)}"))
        hashes.append(sha256(root / "m.safetensors"))
    encodings = {e for c in commits[1:] for e in added_by(repo, c)["encodings"]}
    assert encodings & {"diff", "sparse"}, encodings
    for c, h in zip(commits, hashes):
        repo.checkout(c, force=True)
        assert sha256(root / "m.safetensors") == h
    assert repo.config["format"] == 4
    assert json.loads(mvc("fsck", "--json", cwd=root).output)["ok"] is True


def commit_f32(repo, name: str, w: np.ndarray, message: str, **kw) -> str:
    """Write m.safetensors holding one float32 tensor *name* = *w* and commit it."""
    write_safetensors(f"{repo.root}/m.safetensors", {name: ("F32", (w.size,), w.astype(np.float32).tobytes())})
    return repo.commit(message, **kw)


def test_shape_and_dtype_changes_fall_back_to_full(tmp_path, rng):
    root = tmp_path / "w"
    repo = Repo.init(root)
    a = rng.standard_normal(4096).astype(np.float32)
    commit_f32(repo, "t", a, "f32")
    for dtype, shape, data in (("F16", (4096,), a.astype(np.float16).tobytes()),
                               ("F16", (2048,), a[:2048].astype(np.float16).tobytes())):
        write_safetensors(root / "m.safetensors", {"t": (dtype, shape, data)})
        c = repo.commit(f"{dtype} {shape}")
        h = sha256(root / "m.safetensors")
        assert "diff" not in added_by(repo, c)["encodings"]
        repo.checkout("HEAD~1", force=True)
        repo.checkout(c, force=True)
        assert sha256(root / "m.safetensors") == h


def history(root, rng, n_tensors=4, n=1 << 20):
    """base -> fine-tune -> 50 % prune -> heal of bf16 tensors; returns (commits, file hashes, raw bytes)."""
    def bf(x):
        u = x.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    def f32(b):
        return (b.astype(np.uint32) << 16).view(np.float32)

    repo = Repo.init(root)
    base = [bf(0.02 * rng.standard_normal(n, dtype=np.float32)) for _ in range(n_tensors)]
    ft = [bf(f32(b) + 1e-3 * rng.standard_normal(n, dtype=np.float32)) for b in base]
    pruned = []
    for t in ft:
        w = f32(t)
        thr = np.partition(np.abs(w), n // 2)[n // 2]
        pruned.append(bf(np.where(np.abs(w) < thr, 0, w)))
    healed = [bf(np.where(f32(p) != 0, f32(p) + 5e-4 * rng.standard_normal(n, dtype=np.float32), 0)) for p in pruned]
    commits, hashes = [], []
    for name, version in (("base", base), ("fine-tune", ft), ("prune", pruned), ("heal", healed)):
        write_safetensors(root / "m.safetensors", {f"l{i}": ("BF16", (n,), t.tobytes()) for i, t in enumerate(version)})
        commits.append(repo.commit(name))
        hashes.append(sha256(root / "m.safetensors"))
    return repo, commits, hashes, 2 * n * n_tensors


def test_each_kind_of_version_adds_its_change_not_its_size(tmp_path, rng):
    repo, commits, _, raw = history(tmp_path / "w", rng)
    added = [added_by(repo, c) for c in commits]
    ratios = [a["stored"] / raw for a in added]
    assert ratios[0] < 0.67  # the base: byte planes (ZipNN's ratio)
    assert ratios[1] <= 0.50, ratios  # fine-tune (issue target)
    assert ratios[2] <= 0.08, ratios  # 50 % prune: about the mask
    assert ratios[3] <= 0.35, ratios  # heal
    assert set(added[2]["encodings"]) == {"sparse"}


def test_chains_stay_within_max_depth_and_delta_coding_can_be_off(tmp_path, rng):
    root = tmp_path / "w"
    repo = Repo.init(root)
    repo.update_config(lambda c: c.update(delta={"max_depth": 2}))
    w = rng.standard_normal(1 << 18).astype(np.float32)
    for i in range(6):
        w = w + np.float32(1e-4) * rng.standard_normal(w.size).astype(np.float32)
        write_safetensors(root / "m.safetensors", {"w": ("F32", (w.size,), w.tobytes())})
        repo.commit(f"v{i}")
    depths = [codec.depth(repo.backend.get(o)) for o in repo.backend.iter_oids()]
    assert max(depths) == 2
    repo.update_config(lambda c: c.update(delta={"max_depth": 0}))
    w = w + 1
    write_safetensors(root / "m.safetensors", {"w": ("F32", (w.size,), w.tobytes())})
    assert "diff" not in added_by(repo, repo.commit("full"))["encodings"]
    repo.update_config(lambda c: c.update(delta={"max_depth": "deep"}))
    (root / "x").write_text("x")
    res = mvc_proc("commit", "-m", "bad config", cwd=root)
    assert res.returncode == 1 and "delta.max_depth must be an integer" in res.stderr and "Traceback" not in res.stderr


def test_a_format_1_repository_is_raised_before_its_first_delta_or_pack(tmp_path, rng):
    root = tmp_path / "w"
    Repo.init(root).close()
    cfg = root / ".mvc" / "config.json"
    cfg.write_text(json.dumps({"format": 1}))
    repo = Repo(root)
    w = rng.standard_normal(1 << 16).astype(np.float32)
    write_safetensors(root / "m.safetensors", {"w": ("F32", (w.size,), w.tobytes())})
    repo.commit("one")  # format 4 before its first delta (NIBBLES planes) or pack (its 256 KiB chunk)
    assert json.loads(cfg.read_text())["format"] == 4
    write_safetensors(root / "m.safetensors", {"w": ("F32", (w.size,), (w + 1e-6).astype(np.float32).tobytes())})
    assert "diff" in added_by(repo, repo.commit("two"))["encodings"]
    assert json.loads(cfg.read_text())["format"] == 4


def test_a_damaged_base_is_named_and_nothing_wrong_is_written(tmp_path, rng):
    repo, commits, hashes, _ = history(tmp_path / "w", rng, n_tensors=1, n=1 << 18)
    root = tmp_path / "w"
    ft_tensor = dict(repo.odb.get(repo.tree_of(commits[1]).entries[0].oid, "file").tensors)["l0"]
    delta_chunk = repo.odb.get(ft_tensor, "tensor").chunks[0]
    base_chunk, depth = codec.delta_base(repo.backend.get(bytes.fromhex(delta_chunk)))
    assert depth == 1
    stored = bytearray(repo.backend.get(base_chunk))
    stored[len(stored) // 2] ^= 0x10
    repo.backend.replace_many([(base_chunk, bytes(stored))])
    repo.close()
    rep = json.loads(mvc_proc("fsck", "--json", cwd=root).stdout)
    assert not rep["ok"]
    assert base_chunk.hex() in rep["corrupt"]
    assert delta_chunk in rep["corrupt"] and base_chunk.hex() in rep["corrupt"][delta_chunk]
    before = sha256(root / "m.safetensors")
    res = mvc_proc("checkout", "-f", commits[1], cwd=root)
    assert res.returncode != 0 and "corrupt" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert sha256(root / "m.safetensors") == before  # the old file stays; no wrong bytes written


def test_gc_keeps_the_base_of_a_kept_delta(tmp_path, rng):
    root = tmp_path / "w"
    repo = Repo.init(root)
    commit_f32(repo, "w", rng.standard_normal(4096), "c0")
    w = rng.standard_normal(1 << 18).astype(np.float32)
    write_safetensors(root / "m.safetensors", {"w": ("F32", (w.size,), w.tobytes())})
    side = repo.snapshot("side")  # a commit no ref (and no reflog of HEAD) names
    repo.refs.set_ref("refs/heads/side", side, None, "test")
    main = commit_f32(repo, "w", w + 1e-6, "main", delta_base="side")
    assert "diff" in added_by(repo, main)["encodings"]
    h = sha256(root / "m.safetensors")
    repo.delete_branch("side", force=True)  # side's commit is garbage now; its chunk is a base
    repo.close()
    assert "removed 0 objects" not in mvc("gc", cwd=root).output
    (root / "m.safetensors").unlink()
    mvc("checkout", "-f", "main", cwd=root)
    assert sha256(root / "m.safetensors") == h
    assert json.loads(mvc("fsck", "--json", cwd=root).output)["ok"] is True


def test_cat_object_and_show_report_encodings(tmp_path, rng):
    repo, commits, _, _ = history(tmp_path / "w", rng, n_tensors=1, n=1 << 18)
    root = tmp_path / "w"
    tid = dict(repo.odb.get(repo.tree_of(commits[2]).entries[0].oid, "file").tensors)["l0"]
    chunk = repo.odb.get(tid, "tensor").chunks[0]
    size, stored, enc, base, depth = mvc("cat-object", "-s", chunk, cwd=root).output.split()
    assert (int(size), enc, int(depth)) == ((1 << 18) * 2, "sparse", 2) and int(stored) < int(size) // 8
    info = json.loads(mvc("cat-object", "--json", chunk, cwd=root).output)
    assert info["base"] == base and info["stored_size"] == int(stored)
    out = mvc("show", commits[2], cwd=root).output
    assert "added to the store" in out and "sparse" in out
    logged = json.loads(mvc("log", "--stat", "--json", cwd=root).output)
    assert [e["store"]["encodings"] for e in logged][1] == {"sparse": 1}


def test_repack_rechooses_bases_and_keeps_everything(tmp_path, rng):
    repo, commits, hashes, _ = history(tmp_path / "w", rng, n_tensors=2, n=1 << 18)
    root = tmp_path / "w"
    repo.close()
    full = json.loads(mvc("repack", "--max-depth", "0", "--json", cwd=root).output)
    assert full["rewritten"] > 0
    with Repo(root) as r:
        assert all(codec.depth(r.backend.get(o)) == 0 for o in r.backend.iter_oids())
    again = json.loads(mvc("repack", "--json", cwd=root).output)
    assert again["after"] < full["after"] * 0.7  # deltas again: 0.63 here
    assert json.loads(mvc("fsck", "--json", cwd=root).output)["ok"] is True
    for c, h in zip(commits, hashes):
        mvc("checkout", "-f", c, cwd=root)
        assert sha256(root / "m.safetensors") == h


@pytest.mark.slow
def test_sigkilled_repack_never_loses_an_object(tmp_path):
    runs = 50
    rng = np.random.default_rng(9)
    random.seed(9)
    repo, commits, hashes, _ = history(tmp_path / "w", rng, n_tensors=4, n=1 << 19)
    root = tmp_path / "w"
    repo.close()
    t = time.monotonic()
    mvc_proc("-q", "repack", "--max-depth", "0", cwd=root, check=True)
    span = time.monotonic() - t
    for i in range(runs):
        depth = "0" if i % 2 else "10"  # alternate, so every run rewrites chunks
        p = subprocess.Popen(mvc_cmd() + ["-q", "repack", "--max-depth", depth], cwd=root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(0, span * 1.2))
        p.send_signal(signal.SIGKILL)
        p.wait()
        rep = json.loads(mvc_proc("fsck", "--json", cwd=root).stdout)
        assert rep["ok"], (i, rep)
    for c, h in zip(commits, hashes):
        mvc_proc("checkout", "-f", c, cwd=root, check=True)
        assert sha256(root / "m.safetensors") == h


@pytest.mark.parametrize("parent_dtype", ["BF16", "F16", "F32"])
def test_int8_codes_are_stored_as_their_difference_from_the_prediction(tmp_path, rng, parent_dtype):
    """A rtn-int8 version (X.qweight + per-row X.scales) of a float parent costs about its scales."""
    root = tmp_path / "w"
    repo = Repo.init(root)
    rows, cols = 2500, 1900  # a second chunk that starts mid-row; parent chunks under each
    x = (0.02 * rng.standard_normal((rows, cols))).astype(np.float32)
    x[0, :3] = [np.nan, np.inf, -np.inf]  # hostile floats: the prediction stays deterministic
    x[1] = 0  # a row of zeros: scale 1
    if parent_dtype == "BF16":
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)
        floats = (bits.astype(np.uint32) << 16).view(np.float32)
        data = bits.tobytes()
    else:
        floats = x.astype(np.float16).astype(np.float32) if parent_dtype == "F16" else x
        data = (x.astype(np.float16) if parent_dtype == "F16" else x).tobytes()
    write_safetensors(root / "m.safetensors", {"l.weight": (parent_dtype, (rows, cols), data)})
    repo.commit("float")
    with np.errstate(invalid="ignore"):
        scale = np.nan_to_num(np.abs(floats).max(axis=1), posinf=1.0) / 127
    scale[scale == 0] = 1
    scale = scale.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.clip(np.nan_to_num(np.rint(floats / scale[:, None])), -127, 127).astype(np.int8)
    q.reshape(-1)[::997] += 3  # some codes the prediction misses
    write_safetensors(root / "m.safetensors", {"l.weight.qweight": ("I8", (rows, cols), q.tobytes()),
                                               "l.weight.scales": ("F32", (rows,), scale.tobytes())})
    c = repo.commit("rtn-int8")
    h = sha256(root / "m.safetensors")
    added = added_by(repo, c)
    assert "predict" in added["encodings"] and added["stored"] < 0.05 * rows * cols, added
    repo.checkout("HEAD~1", force=True)
    repo.checkout(c, force=True)
    assert sha256(root / "m.safetensors") == h
    repo.close()
    assert json.loads(mvc("fsck", "--json", cwd=root).output)["ok"] is True
    rep = json.loads(mvc("repack", "--json", cwd=root).output)
    assert rep["after"] <= rep["before"] * 1.01
    mvc("checkout", "-f", "main", cwd=root)
    assert sha256(root / "m.safetensors") == h


def test_a_prediction_names_every_parent_chunk_it_reads(rng):
    parent = [hash_object("chunk", bytes([i])) for i in range(3)]
    new = rng.integers(0, 255, 5000, dtype=np.uint8)
    stored = codec.encode_predict(0, new, np.zeros(5000, np.uint16), 2, parent, 7, 100, 3,
                                  np.ones(51, np.float32), 4)
    assert codec.links(stored) == parent and codec.depth(stored) == 4
    assert codec.delta_base(stored) == (parent[0], 4)
    # the codes come back from the same (here all-zero) parent
    el = {p: np.zeros(3000, np.uint16) for p in parent}
    assert bytes(codec.decode(stored, "x", lambda oid, k: el[oid])[1]) == new.tobytes()
    # a parent too short for the chunk is refused, never read past
    with pytest.raises(CorruptObjectError):
        codec.decode(stored, "x", lambda oid, k: el[oid][:10])


def test_mostly_zero_planes_of_deltas_are_coded_by_their_nonzero_bytes(rng):
    n = 1 << 20
    w = (0.02 * rng.standard_normal(n)).astype(np.float32)
    moved = (w + 1e-3 * rng.standard_normal(n)).astype(np.float32)  # a fine-tune
    base = (w.view(np.uint32) >> 16).astype(np.uint16)
    new = (moved.view(np.uint32) >> 16).astype(np.uint16)
    bid = hash_object("chunk", base.tobytes())
    stored = codec.encode_diff(0, new, base, 2, True, bid, 1)
    body = stored[37:]  # after [type][codec][base][depth][k][float]
    plane_codecs = [body[5 + 5 * j] for j in range(2)]
    assert plane_codecs[0] == codec.NONZERO
    assert bytes(codec.decode(stored, "x", lambda oid, k: base)[1]) == new.tobytes()
    # a full encoding never holds such a plane: a reader of format 1 would not know it
    full = bytearray(codec.encode(0, new.tobytes(), 2))
    full[2 + 5] = codec.NONZERO
    with pytest.raises(CorruptObjectError, match="bad plane codec"):
        codec.decode(bytes(full), "x")


def test_nothing_is_stored_against_a_damaged_base(tmp_path, rng):
    repo, commits, hashes, _ = history(tmp_path / "w", rng, n_tensors=1, n=1 << 18)
    root = tmp_path / "w"
    tid = dict(repo.odb.get(repo.tree_of(commits[-1]).entries[0].oid, "file").tensors)["l0"]
    head_chunk = bytes.fromhex(repo.odb.get(tid, "tensor").chunks[0])
    stored = bytearray(repo.backend.get(head_chunk))
    stored[-5] ^= 0x01
    repo.backend.replace_many([(head_chunk, bytes(stored))])
    w = np.frombuffer((root / "m.safetensors").read_bytes()[-(2 << 18):], np.uint16).copy()
    w[::3] += 1
    write_safetensors(root / "m.safetensors", {"l0": ("BF16", (1 << 18,), w.tobytes())})
    c = repo.commit("on a damaged parent")
    new_tid = dict(repo.odb.get(repo.tree_of(c).entries[0].oid, "file").tensors)["l0"]
    new_chunk = repo.backend.get(bytes.fromhex(repo.odb.get(new_tid, "tensor").chunks[0]))
    assert head_chunk not in codec.links(new_chunk)  # stored against an older version, or in full
    h = sha256(root / "m.safetensors")
    repo.checkout(c, force=True)
    assert sha256(root / "m.safetensors") == h


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["diff", "sparse", "predict"]), cut=st.integers(0, 400), flips=st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4))
@example(kind="diff", cut=228, flips=[(6248, 160)])  # a NONZERO mask frame declaring 2^60 bytes
def test_damaged_delta_values_fail_cleanly(kind, cut, flips):
    """Hostile or damaged delta values: links() and depth() never raise, and decoding raises only
    CorruptObjectError (what does decode is then checked against its id by every reader)."""
    rng = np.random.default_rng(cut)
    base = rng.integers(0, 1 << 16, 3000, dtype=np.uint16)
    new = base.copy()
    new[::5] = 0
    bid = hash_object("chunk", base.tobytes())
    if kind == "diff":
        stored = codec.encode_diff(0, new, base, 2, True, bid, 1)
    elif kind == "sparse":
        stored = codec.encode_sparse(0, new, base, 2, True, bid, 1)
    else:
        q = rng.integers(0, 256, 6000, dtype=np.uint8)
        stored = codec.encode_predict(0, q, np.zeros(6000, np.uint16), 2, [bid, bid], 0, 100, 0,
                                      np.ones(60, np.float32), 1)
    data = bytearray(stored[:len(stored) - cut] if cut < len(stored) else stored[:2])
    for pos, x in flips:
        if data:
            data[pos % len(data)] ^= x
    data = bytes(data)
    codec.links(data)
    codec.depth(data)
    try:
        codec.decode(data, "x", lambda oid, k: codec.elements(base.tobytes(), k))
    except CorruptObjectError:
        pass


def _fine_tune(rng, n=1 << 20):
    """bf16 weights N(0, 0.02) and the same moved by N(0, 1e-3): a DIFF whose low plane is noise."""
    w = (0.02 * rng.standard_normal(n)).astype(np.float32)
    moved = (w + 1e-3 * rng.standard_normal(n)).astype(np.float32)
    return (w.view(np.uint32) >> 16).astype(np.uint16), (moved.view(np.uint32) >> 16).astype(np.uint16)


def _plane_codecs(stored) -> list[int]:
    body = memoryview(stored)[2 + 35:]
    return [body[5 + 5 * j] for j in range(body[0])]


@pytest.mark.parametrize("native", [True, False])
def test_a_noise_plane_of_a_delta_is_coded_as_nibbles(rng, native):
    """A fine-tune's DIFF: its top plane NONZERO, its low plane (6.7 bits of noise a byte) NIBBLES,
    within 1 % of Huffman-coding the bytes; the value decodes to the target's exact bytes on both
    paths, and a value cut or flipped inside the NIBBLES plane fails as CorruptObjectError."""
    base, new = _fine_tune(rng)
    bid = hash_object("chunk", base.tobytes())
    kernels.use_native(native)
    try:
        stored = codec.encode_diff(0, new, base, 2, True, bid, 1)
        assert _plane_codecs(stored) == [codec.NONZERO, codec.NIBBLES]
        _, out = codec.decode(stored, "x", lambda oid, k: codec.elements(base.tobytes(), k))
        assert bytes(out) == new.tobytes()
    finally:
        kernels.use_native(True)
    planes = kernels.diff(new, base, 2, True)
    huffman = len(codec._entropy(codec._ctx()[0], planes[1]))
    nib = len(codec._nibbles_body(planes[1], codec._delta_ctx()))
    assert nib <= 1.01 * huffman  # what the probe chose, on the whole plane
    for bad in (stored[:-7], stored[:-1] + bytes([stored[-1] ^ 0x40]), stored[:len(stored) - 300000]):
        try:
            _, out = codec.decode(bad, "x", lambda oid, k: codec.elements(base.tobytes(), k))
        except CorruptObjectError:
            continue
        assert bytes(out) != new.tobytes()  # decodes to other bytes: the reader's hash refuses them


def test_repack_stores_the_branch_heads_whole_at_no_cost(tmp_path, rng):
    """Commits store each fine-tune as a delta (against its parent, or a shallower ancestor where
    that costs less than DEPTH_COST a level); repack turns the chains around as Git does: the head
    whole, older versions deltas, the same bytes stored."""
    root = tmp_path / "w"
    repo = Repo.init(root)
    w = rng.standard_normal(3 << 19).astype(np.float32)  # two chunks
    commits, hashes = [], []
    for i in range(4):
        commits.append(commit_f32(repo, "w", w, f"v{i}"))
        hashes.append(sha256(root / "m.safetensors"))
        w = w + 1e-4 * rng.standard_normal(w.size).astype(np.float32)

    def chunks(rev):
        tid = dict(repo.odb.get(repo.tree_of(rev).entries[0].oid, "file").tensors)["w"]
        return repo.odb.get(tid, "tensor").chunks

    def depths(rev):
        return [codec.depth(repo.backend.get(bytes.fromhex(c))) for c in chunks(rev)]

    assert min(depths(commits[-1])) >= 1 and depths(commits[0]) == [0, 0]
    before = repo.backend.stats()["stored_bytes"]
    repo.close()
    rep = json.loads(mvc("repack", "--json", cwd=root).output)
    assert rep["tips_whole"] == 2
    repo = Repo(root)
    assert depths(commits[-1]) == [0, 0] and min(depths(commits[0])) >= 1
    assert abs(repo.backend.stats()["stored_bytes"] - before) < 0.02 * before
    for oid in repo.backend.iter_oids():  # every header's depth is the chain's true length
        stored, d = repo.backend.get(oid), 0
        while codec.delta_base(stored) is not None:
            stored, d = repo.backend.get(codec.delta_base(stored)[0]), d + 1
        assert codec.depth(repo.backend.get(oid)) == d
    repo.close()
    assert json.loads(mvc("fsck", "--json", cwd=root).output)["ok"] is True
    for c, h in zip(commits, hashes):
        mvc("checkout", "-f", c, cwd=root)
        assert sha256(root / "m.safetensors") == h
    mvc("checkout", "-f", "main", cwd=root)
    again = json.loads(mvc("repack", "--json", cwd=root).output)  # the same result again
    assert again["tips_whole"] == 2 and abs(again["after"] - rep["after"]) < 0.02 * rep["after"]


# -- choosing bases ---------------------------------------------------------------------------
def test_the_chooser_learns_the_winner_and_still_probes_now_and_then():
    from mvc.delta import FULL, BaseChooser

    ch = BaseChooser()
    firsts = [ch.leader() for _ in range(BaseChooser.PROBE_FIRST)]
    assert firsts == [None] * BaseChooser.PROBE_FIRST  # nothing learnt yet: try every candidate
    for _ in range(5):
        ch.record(2)
    for _ in range(3):
        ch.record(FULL)
    leads = [ch.leader() for _ in range(2 * BaseChooser.PROBE_EVERY)]
    assert leads.count(None) == 2 and set(leads) == {None, 2}  # one in PROBE_EVERY probes again
    for _ in range(BaseChooser.WINDOW):  # the window moves: what wins now leads
        ch.record(FULL)
    assert {ch.leader() for _ in range(3)} <= {FULL, None} and FULL in {ch.leader() for _ in range(3)}


def test_a_base_is_read_whole_or_through_its_chain_and_refused_where_no_delta_may_go(tmp_path, rng):
    """ObjectDB.base_elements: a whole value decoded from the store's storage (a raw one whose
    second byte looks like a delta codec included), a delta through its chain, with the depth a
    delta on it gets; None for a chain at the limit, a missing chunk and a damaged one."""
    repo = Repo.init(tmp_path / "w")
    odb = repo.odb
    raw = bytes([7, codec.DIFF]) + bytes(range(60))  # under RAW_BELOW: stored raw
    rid = hash_object("chunk", raw)
    repo.backend.put_many([(rid, codec.encode(0, raw))])
    assert odb.base_elements(rid, 1, 10) is not None
    assert odb.base_elements(rid, 1, 10)[0] == 1 and odb.base_elements(rid, 1, 10)[1].tobytes() == raw
    v = [rng.integers(0x3C00, 0x3D00, 1 << 12, dtype=np.uint16)]
    v.append((v[0].astype(np.int32) + rng.integers(-3, 4, v[0].size)).astype(np.uint16))
    ids = _store_chain(repo, v)
    depth, el = odb.base_elements(ids[1], 2, 10)
    assert depth == 2 and el.tobytes() == v[1].tobytes()
    assert odb.base_elements(ids[1], 2, 1) is None  # a delta on it would be 2 deep
    assert odb.base_elements(hash_object("chunk", b"absent"), 2, 10) is None
    bad = bytearray(repo.backend.get(ids[0]))
    bad[-5] ^= 1
    repo.backend.replace_many([(ids[0], bytes(bad))])
    assert odb.base_elements(ids[0], 2, 10) is None
    repo.close()


def test_the_chooser_hints_the_winners_kind_and_the_full_size():
    """What the trials saw spares the other chunks their sample coding: the leading base's delta
    kind (as most of its wins were) and the largest full-encoding ratio lately seen; nothing
    before a trial has told."""
    from mvc.delta import FULL, BaseChooser

    ch = BaseChooser()
    assert ch.hint(2) is None
    ch.record(2, True, 0.66)
    ch.record(2, True, 0.70)
    ch.record(2, False, 0.64)
    ch.record(FULL, False, 0.9)
    assert ch.hint(2) == (True, 0.9)
    assert ch.hint(3) is None  # no trial chose it


def test_chunks_coded_on_the_chooser_s_hint_match_the_trials(tmp_path, rng):
    """A run of chunks moved a little from their bases: after the first trials every chunk is a
    DIFF against the winner, each decodes to its bytes, and none is larger than what the full
    search gives it."""
    from mvc.delta import BaseChooser
    from mvc.pipeline import encode_with_bases

    repo = Repo.init(tmp_path / "w")
    ch = BaseChooser()
    for _ in range(3 * BaseChooser.PROBE_EVERY):
        v0 = rng.integers(0x3C00, 0x3D00, 1 << 16, dtype=np.uint16)
        (bid,) = _store_chain(repo, [v0])
        new = (v0.astype(np.int32) + rng.integers(-3, 4, v0.size)).astype(np.uint16)
        got = encode_with_bases(repo.odb, new.tobytes(), 2, [bid.hex()], 10, None, [0], ch)
        alone = encode_with_bases(repo.odb, new.tobytes(), 2, [bid.hex()], 10)
        assert got[1] == codec.DIFF and codec.delta_base(got) == (bid, 1)
        assert len(got) <= len(alone)
        assert bytes(codec.decode(got, "x", lambda oid, k, v=v0: v)[1]) == new.tobytes()
    assert ch.hint(0) == (False, ch.hint(0)[1]) and 0.5 < ch.hint(0)[1] < 1.0


def _store_chain(repo, versions, k=2):
    """Store bf16 chunks *versions* (uint16 arrays) as version 0 whole and each next one as a DIFF
    against the one before; returns their ids."""
    ids, prev = [], None
    for i, v in enumerate(versions):
        oid = hash_object("chunk", v.tobytes())
        if prev is None:
            stored = codec.encode(0, v.tobytes(), k)
        else:
            stored = codec.encode_diff(0, v, prev, k, True, ids[-1], i)
        repo.backend.put_many([(oid, stored)])
        ids.append(oid)
        prev = v
    return ids


def test_a_deeper_base_must_save_its_decoding(tmp_path, rng):
    """encode_with_bases weighs each level of a base's chain (DEPTH_COST): a delta about as small
    against a shallower base is stored against that one; a much smaller one against the deeper."""
    from mvc.pipeline import encode_with_bases

    repo = Repo.init(tmp_path / "w")
    n = 1 << 18
    v0 = rng.integers(0x3C00, 0x3D00, n, dtype=np.uint16)
    v1 = v0.copy()
    v1[::1000] += 1  # a few elements moved: v1 is a tiny delta on v0
    ids = _store_chain(repo, [v0, v1])
    noisy = (v0.astype(np.int32) + rng.integers(-40, 40, n)).astype(np.uint16)  # as far from v0 as from v1
    got = encode_with_bases(repo.odb, noisy.tobytes(), 2, [ids[1].hex(), ids[0].hex()], 10)
    assert codec.delta_base(got) == (ids[0], 1)  # not v1 (depth 2) for a delta barely smaller
    near = v1.copy()
    near[::5000] -= 1  # a few elements from v1: far smaller against it
    got = encode_with_bases(repo.odb, near.tobytes(), 2, [ids[1].hex(), ids[0].hex()], 10)
    assert codec.delta_base(got) == (ids[1], 2)
    for data, value in ((noisy, encode_with_bases(repo.odb, noisy.tobytes(), 2, [ids[1].hex()], 10)), (near, got)):
        assert bytes(repo.odb.decode(hash_object("chunk", data.tobytes()), value, "chunk")[1]) == data.tobytes()
    repo.close()


def test_a_commit_decodes_only_the_winning_base_once_it_is_known(tmp_path, rng, monkeypatch):
    """With three candidate versions, the first chunks try all three; after that only the base that
    has been winning is decoded (and the others only in the periodic probe)."""
    from mvc.delta import BaseChooser
    from mvc.store.odb import ObjectDB

    root = tmp_path / "w"
    repo = Repo.init(root)
    n_t, n = 48, 1 << 16  # 48 tensors of one 128 KiB chunk each
    w = [rng.integers(0x3C00, 0x3D00, n, dtype=np.uint16) for _ in range(n_t)]
    for i in range(3):  # three unrelated versions, each stored whole
        w = [rng.integers(0x3C00, 0x3D00, n, dtype=np.uint16) for _ in range(n_t)]
        write_safetensors(root / "m.safetensors", {f"t{j:02}": ("BF16", (n,), x.tobytes()) for j, x in enumerate(w)})
        repo.commit(f"v{i}")
    tensors = dict(repo.odb.get(repo.tree_of("HEAD").entries[0].oid, "file").tensors)
    head_chunks = {repo.odb.get(tid, "tensor").chunks[0] for tid in tensors.values()}
    # a fine-tune of the head (its delta over a quarter of the raw size: no search stops early)
    last = [(x.astype(np.int32) + rng.integers(-40, 41, n)).astype(np.uint16) for x in w]
    write_safetensors(root / "m.safetensors", {f"t{j:02}": ("BF16", (n,), x.tobytes()) for j, x in enumerate(last)})
    decoded = []
    real = ObjectDB.base_elements

    def counting(self, oid, k, max_depth, keep_links=None):
        decoded.append(oid.hex())
        return real(self, oid, k, max_depth, keep_links)

    monkeypatch.setattr(ObjectDB, "base_elements", counting)
    c = repo.commit("edit")
    others = [d for d in decoded if d not in head_chunks]
    probes = BaseChooser.PROBE_FIRST + n_t // BaseChooser.PROBE_EVERY + 1
    assert len([d for d in decoded if d in head_chunks]) == n_t  # the winner: once per chunk
    assert 0 < len(others) <= 2 * probes < 2 * n_t  # the two others: only while probing, not for every chunk
    new = dict(repo.odb.get(repo.tree_of(c).entries[0].oid, "file").tensors)
    for tid in new.values():
        stored = repo.backend.get(bytes.fromhex(repo.odb.get(tid, "tensor").chunks[0]))
        assert codec.delta_base(stored)[0].hex() in head_chunks
    h = sha256(root / "m.safetensors")
    repo.checkout("HEAD~1", force=True)
    repo.checkout(c, force=True)
    assert sha256(root / "m.safetensors") == h
    repo.close()


@pytest.mark.parametrize("damage", [None, "low nibbles", "values short"])
def test_a_fine_tune_s_difference_is_applied_from_its_parts(tmp_path, rng, damage):
    """A fine-tune's DIFF (top plane NONZERO, low plane NIBBLES) is applied at checkout from those
    parts (codec.NibbleDiff, kernels.undiff_parts), merging its base's planes as it goes, bit for
    bit; damaged, it writes nothing that passes (place_chunk hands it back) and the whole read
    refuses it."""
    import os
    import struct

    if not kernels.undiff_parts_ready():
        pytest.skip("undiff_parts needs an x86-64 CPU with SSSE3")
    repo = Repo.init(tmp_path / "w")
    n = 1 << 20
    v0 = (rng.standard_normal(n).astype(np.float32) * 0.02).view(np.uint32) >> 16
    v0 = v0.astype(np.uint16)
    step = rng.standard_normal(n) * np.where(rng.random(n) < 0.03, 400, 20)  # mostly small, a few far
    v1 = (v0.astype(np.int32) + step.astype(np.int32)).astype(np.uint16)
    ids = _store_chain(repo, [v0, v1])
    stored = repo.backend.get(ids[1])
    level = codec.diff_level(stored)
    assert isinstance(level[3], codec.NibbleDiff) and level[3].count > 0
    # packed: checkout keeps a view of the pack's map for the low nibbles rather than a copy
    assert repo.backend.read_with(ids[1], repo.backend.lasting) is True
    if damage:
        body = bytearray(stored)
        if damage == "low nibbles":
            body[-100] ^= 0x10
        else:  # the NONZERO plane's frames rebuilt with one value fewer than its mask asks for
            p = 2 + 35
            (l0,) = struct.unpack_from("<I", body, p + 6)
            nz = bytes(body[p + 15:p + 15 + l0])
            (mlen,) = struct.unpack_from("<I", nz, 0)
            values = codec._inflate(nz[4 + mlen:], n)[:-1]
            nz2 = nz[:4 + mlen] + codec._delta_ctx().compress(values)
            body = body[:p + 6] + struct.pack("<I", len(nz2)) + body[p + 10:p + 15] + nz2 + body[p + 15 + l0:]
        repo.backend.replace_many([(ids[1], bytes(body))])
    out = tmp_path / "out"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    try:
        placed = repo.odb.place_chunk(ids[1].hex(), fd, 0, 2 * n)
        if damage is None:
            assert placed and out.read_bytes() == v1.tobytes()
        else:
            assert placed is False
            with pytest.raises(CorruptObjectError):
                repo.odb.read_chunk(ids[1].hex())
    finally:
        os.close(fd)
    repo.close()


def test_a_chain_of_differences_is_checked_out_a_slice_at_a_time(tmp_path, rng):
    """place_chunk decodes DIFF on DIFF on planes in slices straight into the file, bit for bit;
    a damaged link makes it hand the chunk back (False) to the whole read, which names the link."""
    import os

    repo = Repo.init(tmp_path / "w")
    n = 1 << 20  # 2 MiB: many slices
    v = [rng.integers(0x3C00, 0x3D00, n, dtype=np.uint16)]
    for _ in range(2):
        v.append((v[-1].astype(np.int32) + rng.integers(-2, 3, n)).astype(np.uint16))
    ids = _store_chain(repo, v)
    out = tmp_path / "out"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    try:
        assert repo.odb.place_chunk(ids[2].hex(), fd, 3, 2 * n)
        assert out.read_bytes()[3:] == v[2].tobytes()
        stored = bytearray(repo.backend.get(ids[1]))
        stored[len(stored) // 2] ^= 0x04
        repo.backend.replace_many([(ids[1], bytes(stored))])
        assert repo.odb.place_chunk(ids[2].hex(), fd, 3, 2 * n) is False
        with pytest.raises(CorruptObjectError, match=f"its delta base {ids[1].hex()} is corrupt"):
            repo.odb.read_chunk(ids[2].hex())
    finally:
        os.close(fd)
    repo.close()
