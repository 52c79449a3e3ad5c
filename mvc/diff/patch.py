"""Binary tensor patches: `mvc diff --binary A B -o PATCH` and `mvc apply PATCH`.

Layout (all integers little-endian):

    magic   b"MVCPATCH" + version u16 (1)
    u64 n + n bytes of canonical JSON manifest:
        {"base": A, "base_tree": .., "target": B, "target_tree": .., "expects": [ids of A's chunks used]}
    records until the trailer, each: id (32 bytes), kind u8 (0 stored value, 1 XOR delta),
        u64 length, payload
            stored value: the object as the store holds it ([type][codec][payload])
            XOR delta:    base chunk id (32 bytes) + stored value of (new XOR base) as a chunk
    trailer: b"END!" + BLAKE3 of everything before it (32 bytes)

The patch holds every object reachable from B's tree and not from A's. A chunk of a
tensor that exists in A under the same file, name, dtype and shape is sent as an XOR
against A's chunk when that is smaller (a fine-tune changes low mantissa bits: the
XOR's exponent plane is nearly all zero). Applying verifies the trailer, the base,
and the id of every object it rebuilds before anything is stored.
"""

from __future__ import annotations

import json
import struct

import blake3
import numpy as np

from ..errors import MvcError, UsageError
from ..graph import closure
from ..progress import NULL
from ..store import codec
from ..store.ids import TYPE_CODE, TYPES, is_hex_oid
from ..store.objects import DTYPES, canonical_json, parse_object
from ..store.odb import decode_verified, encode_chunk

MAGIC = b"MVCPATCH"
VERSION = 1
TRAILER = b"END!"
STORED, XOR = 0, 1
_MAX_MANIFEST = 64 * 1024 * 1024


class PatchError(MvcError):
    hint = "the patch file is damaged or was made for another repository; nothing was changed"


def _walk(repo, tree_oid: str) -> dict[str, str]:
    """Every object id reachable from a tree -> its kind."""
    return closure(repo.odb.get, [(tree_oid, "tree")])


def _xor_bases(repo, base_tree, target_tree) -> dict[str, tuple[str, int]]:
    """new chunk id -> (A's chunk id at the same place, float size) for same-layout tensors."""
    out: dict[str, tuple[str, int]] = {}
    a_entries = base_tree.as_dict()
    for e in target_tree.entries:
        ea = a_entries.get(e.path)
        if ea is None or ea.oid == e.oid:
            continue
        fa, fb = repo.odb.get(ea.oid, "file"), repo.odb.get(e.oid, "file")
        ta = dict(fa.tensors)
        for name, tid in fb.tensors:
            if name not in ta or ta[name] == tid:
                continue
            a, b = repo.odb.get(ta[name], "tensor"), repo.odb.get(tid, "tensor")
            if (a.dtype, a.shape, a.chunk_size) != (b.dtype, b.shape, b.chunk_size):
                continue
            size, is_float = DTYPES[b.dtype]
            for ca, cb in zip(a.chunks, b.chunks, strict=True):
                if ca != cb:
                    out[cb] = (ca, size if is_float and size > 1 else 0)
    return out


def write_patch(repo, a: str, b: str, out) -> dict:
    """Write the patch taking revision *a* to revision *b* to the binary stream *out*; returns a summary."""
    ca, cb = repo.resolve(a), repo.resolve(b)
    ta_id, tb_id = repo.commit_obj(ca).tree, repo.commit_obj(cb).tree
    ta, tb = repo.odb.get(ta_id, "tree"), repo.odb.get(tb_id, "tree")
    have = _walk(repo, ta_id)
    want = {o: k for o, k in _walk(repo, tb_id).items() if o not in have}
    bases = _xor_bases(repo, ta, tb)
    expects = sorted({bases[o][0] for o in want if o in bases})
    h = blake3.blake3()

    def emit(data: bytes) -> None:
        h.update(data)
        out.write(data)

    manifest = canonical_json({"base": ca, "base_tree": ta_id, "target": cb, "target_tree": tb_id,
                               "expects": expects})
    emit(MAGIC + struct.pack("<H", VERSION) + struct.pack("<Q", len(manifest)) + manifest)
    stats = {"objects": 0, "xor": 0, "bytes": 0}
    # chunks first, then tensors, files, the tree: the order a store must write them in
    order = sorted(want, key=lambda o: (TYPE_CODE[want[o]], o))
    for oid in order:
        kind, payload = STORED, repo.odb.standalone(oid)  # the receiver may lack a delta's base
        if oid in bases:
            base_id, fs = bases[oid]
            new = repo.odb.read(oid, "chunk")[1]
            old = repo.odb.read(base_id, "chunk")[1]
            x = np.bitwise_xor(np.frombuffer(new, np.uint8), np.frombuffer(old, np.uint8)).tobytes()
            delta = bytes.fromhex(base_id) + codec.encode(TYPE_CODE["chunk"], x, fs)
            if len(delta) < len(payload):
                kind, payload = XOR, delta
                stats["xor"] += 1
        emit(bytes.fromhex(oid) + struct.pack("<BQ", kind, len(payload)))
        emit(payload)
        stats["objects"] += 1
        stats["bytes"] += len(payload)
    out.write(TRAILER + h.digest())
    return {"base": ca, "target": cb, **stats}


def read_patch(data: bytes):
    """Parse and check a whole patch; returns (manifest, [(id, kind, payload)])."""
    if len(data) < len(MAGIC) + 2 + 8 + 36 or not data.startswith(MAGIC):
        raise PatchError("not an mvc patch (bad magic or too short)")
    (version,) = struct.unpack_from("<H", data, len(MAGIC))
    if version != VERSION:
        raise PatchError(f"patch format {version} is not supported (this mvc reads {VERSION})")
    body, trailer = data[:-36], data[-36:]
    if trailer[:4] != TRAILER or blake3.blake3(body).digest() != trailer[4:]:
        raise PatchError("patch is truncated or corrupt (checksum mismatch)")
    pos = len(MAGIC) + 2
    (n,) = struct.unpack_from("<Q", body, pos)
    pos += 8
    if n > _MAX_MANIFEST or pos + n > len(body):
        raise PatchError("patch manifest is damaged")
    try:
        manifest = json.loads(body[pos:pos + n])
        if not isinstance(manifest, dict):
            raise TypeError("not a JSON object")
        for key in ("base", "base_tree", "target", "target_tree"):
            if not is_hex_oid(manifest[key]):
                raise TypeError(f"{key} is not an object id")
        if not (isinstance(manifest["expects"], list) and all(is_hex_oid(e) for e in manifest["expects"])):
            raise TypeError("expects is not a list of object ids")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise PatchError(f"patch manifest is damaged ({e})") from e
    pos += n
    records = []
    while pos < len(body):
        if pos + 41 > len(body):
            raise PatchError("patch record is truncated")
        oid = body[pos:pos + 32]
        kind, length = struct.unpack_from("<BQ", body, pos + 32)
        pos += 41
        if kind not in (STORED, XOR) or pos + length > len(body):
            raise PatchError("patch record is damaged")
        records.append((oid, kind, body[pos:pos + length]))
        pos += length
    return manifest, records


def apply_patch(repo, data: bytes, progress=None) -> dict:
    """Check, import and check out a patch onto a work tree at its base; changes nothing on error."""
    manifest, records = read_patch(data)
    head = repo.refs.head_commit()
    head_tree = repo.commit_obj(head).tree if head else None
    if head_tree != manifest["base_tree"]:
        raise UsageError(f"patch applies to tree {manifest['base_tree'][:12]} (commit {manifest['base'][:12]}), "
                         f"but HEAD's tree is {(head_tree or 'empty')[:12]}",
                         hint="check out the commit the patch was made from")
    if not repo.status().clean:
        raise UsageError("cannot apply a patch over uncommitted changes", hint="commit or discard them first")
    missing = [e for e in manifest["expects"] if not repo.odb.has(e)]
    if missing:
        raise PatchError(f"this repository lacks {len(missing)} object(s) the patch builds on, e.g. {missing[0][:12]}")
    # rebuild and verify everything in memory-sized batches before the store sees it
    new: list[tuple[bytes, bytes]] = []
    for oid, kind, payload in records:
        if kind == XOR:
            base_id = payload[:32].hex()
            _, x = codec.decode(payload[32:], oid.hex())
            old = repo.odb.read(base_id, "chunk")[1]
            if len(old) != len(x):
                raise PatchError(f"XOR delta for {oid.hex()[:12]} does not fit its base chunk")
            raw = np.bitwise_xor(np.frombuffer(x, np.uint8), np.frombuffer(old, np.uint8)).tobytes()
            got, stored = encode_chunk(raw)
            if got != oid:
                raise PatchError(f"object {oid.hex()} rebuilt from the patch has the wrong id")
            new.append((oid, stored))
        else:
            try:
                decode_verified(oid, payload)
            except MvcError as e:
                raise PatchError(f"object {oid.hex()} in the patch is corrupt ({e})") from e
            if payload[0] >= len(TYPES):
                raise PatchError(f"object {oid.hex()} has an unknown type")
            new.append((oid, payload))
    # every metadata object parses (a tree's paths are checked) before the store sees any of them
    for oid, payload in new:
        if payload[0] != TYPE_CODE["chunk"]:
            kind = TYPES[payload[0]]
            parse_object(kind, bytes(decode_verified(oid, payload, kind)[1]), oid.hex())
    # every object the target tree needs must now be at hand
    have = {o for o, _ in new}
    target = manifest["target_tree"]
    if bytes.fromhex(target) not in have and not repo.odb.has(target):
        raise PatchError("the patch does not contain its target tree")
    repo.backend.put_many(new)  # only unreferenced objects until the work tree is written
    for oid, kind in _walk(repo, target).items():
        if kind == "chunk" and not repo.odb.has(oid):
            raise PatchError(f"the patch lacks chunk {oid[:12]} of its target")
    tree = repo.odb.get(target, "tree")
    with repo.lock():
        repo.switch_tree(tree, False, progress or NULL)
    return {"base": manifest["base"], "target": manifest["target"], "objects": len(new)}

