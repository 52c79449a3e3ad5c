"""Binary patches: apply on A gives B's ids exactly; anything else is refused and changes nothing."""

import json
import shutil

import numpy as np
import pytest

from mvc import Repo
from tests.helpers import bf16, mvc, mvc_proc, tree_hashes, write_safetensors


def snapshot(root):
    with Repo(root) as r:
        return tree_hashes(root), r.backend.list_refs(""), r.backend.stats()


@pytest.fixture
def ab(tmp_path):
    rng = np.random.default_rng(9)
    root = tmp_path / "w"
    repo = Repo.init(root)
    w = {f"l{i}": np.frombuffer(bf16(rng, (512, 512)), "<u2").copy() for i in range(4)}

    def write(ws, cfg):
        write_safetensors(root / "m.safetensors", {k: ("BF16", v.shape, v.tobytes()) for k, v in ws.items()})
        (root / "config.json").write_text(json.dumps(cfg))

    write(w, {"v": 1})
    a = repo.commit("A")
    # B: a fine-tune of l1 (low mantissa bits), a new tensor, a config change
    tuned = dict(w)
    tuned["l1"] = w["l1"] ^ rng.integers(0, 4, w["l1"].shape, dtype=np.uint16)
    tuned["extra"] = np.frombuffer(bf16(rng, (64, 64)), "<u2").copy()
    write(tuned, {"v": 2})
    b = repo.commit("B")
    return repo, root, a, b, write, w


def test_round_trip_gives_b_ids(ab, tmp_path):
    repo, root, a, b, write, w = ab
    patch = tmp_path / "a-b.mvcpatch"
    out = mvc("diff", "--binary", a, b, "-o", patch, cwd=root).output
    assert "XOR" in out
    repo.checkout(a)
    mvc("apply", patch, cwd=root)
    st = repo.status()
    b_tree = {e.path: (e.mode, e.oid) for e in repo.tree_of(b).entries}
    assert st.oids == b_tree  # every file's id in the work tree equals B's
    # the fine-tuned tensor travelled as an XOR delta: the patch is smaller than B's new objects stored
    size = patch.stat().st_size
    one_tensor = 512 * 512 * 2
    assert size < 1.5 * one_tensor


def test_applies_to_an_independent_repository_with_the_same_base(ab, tmp_path):
    repo, root, a, b, write, w = ab
    patch = tmp_path / "p"
    mvc("diff", "--binary", a, b, "-o", patch, cwd=root)
    other = tmp_path / "other"
    Repo.init(other).close()
    repo.checkout(a)
    for name in ("m.safetensors", "config.json"):
        shutil.copy(root / name, other / name)
    mvc("commit", "-m", "same content, other repository", cwd=other)
    mvc("apply", patch, cwd=other)
    with Repo(other) as r:
        assert r.status().oids == {e.path: (e.mode, e.oid) for e in repo.tree_of(b).entries}


def test_wrong_base_refused_nothing_changed(ab, tmp_path):
    repo, root, a, b, write, w = ab
    patch = tmp_path / "p"
    mvc("diff", "--binary", a, b, "-o", patch, cwd=root)
    # HEAD is at B, not A
    before = snapshot(root)
    res = mvc_proc("apply", patch, cwd=root)
    assert res.returncode != 0 and "patch applies to tree" in res.stderr and "Traceback" not in res.stderr
    assert snapshot(root) == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_patch_refused_nothing_changed(ab, tmp_path, damage):
    repo, root, a, b, write, w = ab
    patch = tmp_path / "p"
    mvc("diff", "--binary", a, b, "-o", patch, cwd=root)
    data = bytearray(patch.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(b"not a patch at all")
    patch.write_bytes(bytes(data))
    repo.checkout(a)
    before = snapshot(root)
    res = mvc_proc("apply", patch, cwd=root)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert snapshot(root) == before


@pytest.mark.parametrize("change", [{"base": 5}, {"target_tree": ["x"]}, {"expects": "abc"},
                                    {"expects": [None]}, "a list"], ids=["base", "tree", "expects", "item", "list"])
def test_manifest_with_wrong_field_types_is_refused(ab, tmp_path, change):
    """Hardening defect 6: well-formed patches whose manifest holds the wrong types (the checksum
    is computed anew, as a hostile sender would) raised TypeError or AttributeError."""
    import json
    import struct

    import blake3

    from mvc.diff.patch import MAGIC, TRAILER, VERSION

    repo, root, a, b, write, w = ab
    patch = tmp_path / "p"
    mvc("diff", "--binary", a, b, "-o", patch, cwd=root)
    data = patch.read_bytes()
    pos = len(MAGIC) + 2
    (n,) = struct.unpack_from("<Q", data, pos)
    manifest = json.loads(data[pos + 8:pos + 8 + n])
    manifest = manifest | change if isinstance(change, dict) else [manifest]
    new = json.dumps(manifest).encode()
    body = MAGIC + struct.pack("<H", VERSION) + struct.pack("<Q", len(new)) + new + data[pos + 8 + n:-36]
    patch.write_bytes(body + TRAILER + blake3.blake3(body).digest())
    repo.checkout(a)
    before = snapshot(root)
    res = mvc_proc("apply", patch, cwd=root)
    assert res.returncode != 0 and "Traceback" not in res.stderr and "manifest is damaged" in res.stderr
    assert snapshot(root) == before


def test_patch_with_a_hostile_path_stores_nothing(ab, tmp_path):
    """Hardening defect 9: a patch refused for a hostile path left its objects in the store, and
    fsck reported the tree until a gc. Its metadata is now parsed before anything is stored."""
    import struct

    import blake3

    from mvc.diff.patch import MAGIC, STORED, TRAILER, VERSION
    from mvc.store import codec
    from mvc.store.ids import TYPE_CODE, hash_object
    from mvc.store.objects import canonical_json

    repo, root, a, b, write, w = ab
    repo.checkout(a)
    values = []

    def obj(kind, content):
        oid = hash_object(kind, content)
        values.append((oid, codec.encode(TYPE_CODE[kind], content)))
        return oid.hex()

    chunk = obj("chunk", b"pwned\n")
    fid = obj("file", canonical_json({"chunks": [chunk], "format": "raw", "size": 6}))
    tree = obj("tree", canonical_json({"entries": [["../escape.txt", 0o100644, fid]]}))
    base_tree = repo.commit_obj(a).tree
    manifest = canonical_json({"base": a, "base_tree": base_tree, "target": b, "target_tree": tree,
                               "expects": []})
    body = MAGIC + struct.pack("<H", VERSION) + struct.pack("<Q", len(manifest)) + manifest
    for oid, payload in values:
        body += oid + struct.pack("<BQ", STORED, len(payload)) + payload
    patch = tmp_path / "evil.patch"
    patch.write_bytes(body + TRAILER + blake3.blake3(body).digest())
    before = snapshot(root)
    res = mvc_proc("apply", patch, cwd=root)
    assert res.returncode != 0 and "Traceback" not in res.stderr and "unsafe path" in res.stderr
    assert snapshot(root) == before  # the store's object count and bytes included
    assert not (tmp_path / "escape.txt").exists()
    assert json.loads(mvc_proc("fsck", "--json", cwd=root).stdout)["ok"]
