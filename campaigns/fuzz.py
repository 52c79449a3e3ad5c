"""Fuzz every parser of outside bytes with hypothesis: random bytes, and valid inputs with random
edits (bytes replaced, inserted, deleted, the end cut off). Per parser: only MvcError subclasses
may escape, no case may take over 1 s (hypothesis's deadline), and the process's peak RSS may not
grow by more than 256 MiB (every size is bounded before anything is allocated)."""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import tempfile
import time

from .common import Result

RSS_SLACK = 256 << 20


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mutations(st, seeds: list[bytes], max_size: int = 4096):
    """Random bytes, or a seed with up to 8 random edits."""

    @st.composite
    def edited(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 8))):
            op = draw(st.integers(0, 3))
            pos = draw(st.integers(0, len(data)))
            if op == 0 and data and pos < len(data):
                data[pos] = draw(st.integers(0, 255))
            elif op == 1:
                data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            elif op == 2:
                del data[pos:pos + draw(st.integers(1, 16))]
            else:
                del data[pos:]
        return bytes(data)

    return st.one_of(st.binary(max_size=max_size), edited())


# -- the parsers, each with valid seeds ------------------------------------------------------
_REAL: dict = {}


def _real() -> dict:
    """A real two-commit repository's patch, metadata objects and stored values (made once)."""
    if _REAL:
        return _REAL
    import numpy as np

    from mvc import Repo
    from mvc.diff.patch import write_patch
    from mvc.store.odb import decode_verified

    from .common import write_model

    root = tempfile.mkdtemp(prefix="mvc-fuzz-repo-")
    rng = np.random.default_rng(5)
    with Repo.init(root) as r:
        write_model(root, rng, 3, 64)
        r.commit("one")
        write_model(root, rng, 3, 64, change=1)
        r.commit("two")
        out = io.BytesIO()
        write_patch(r, "HEAD~1", "HEAD", out)
        _REAL["patch"] = out.getvalue()
        _REAL["objects"], _REAL["stored"] = [], []
        for oid in r.backend.iter_oids():
            stored = bytes(r.odb.stored(oid.hex()))
            kind, content = decode_verified(oid, stored)
            (_REAL["stored"] if kind == "chunk" else _REAL["objects"]).append(stored if kind == "chunk" else
                                                                               bytes(content))
    return _REAL


def _safetensors():
    from mvc.formats.safetensors import parse_header

    def header(obj):
        h = json.dumps(obj).encode()
        return struct.pack("<Q", len(h)) + h

    seeds = [header({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}, "__metadata__": {"a": "b"}}),
             header({"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                     "b": {"dtype": "I8", "shape": [4, 0], "data_offsets": [4, 4]}}),
             header({"x": {"dtype": "F16", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 2]}})]

    def parse(data):
        parse_header(data, len(data) + 64, "fuzz.safetensors")

    return seeds, parse


def _pickle():
    import pickle
    from collections import OrderedDict

    from mvc.formats import torchfile

    seeds = [pickle.dumps({"w": [1.0, 2.0], "n": (1, "a")}, protocol=p) for p in range(0, 6)]
    seeds += [b"cos\nsystem\n(S'ls'\ntR.", b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94."]
    seeds.append(pickle.dumps(OrderedDict(a=1), protocol=4))

    def parse(data):
        torchfile.scan_pickle(io.BytesIO(data), "fuzz.pt", count=3)
        torchfile.check_file(io.BytesIO(data), "fuzz.pt")

    return seeds, parse


def _torch_zip():
    import pickle
    import zipfile

    from mvc.formats import torchfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        z.writestr("archive/version", "3\n")
    seeds = [buf.getvalue()]

    def parse(data):
        torchfile.check_file(io.BytesIO(data), "fuzz.pt")

    return seeds, parse


def _pointer():
    from mvc.hooks.git.pointer import Pointer, parse

    seeds = [Pointer("ab" * 32, 4195096).encode(), Pointer("00" * 32, 0).encode()]
    return seeds, parse


def _pktline():
    from mvc.hooks.git import pktline as P

    buf = io.BytesIO()
    P.write_text(buf, "git-filter-client", "version=2")
    P.flush(buf)
    P.write_text(buf, "command=smudge", "pathname=m.safetensors")
    P.flush(buf)
    P.write_packet(buf, b"x" * 100)
    P.flush(buf)
    seeds = [buf.getvalue()]

    def parse(data):
        stream = io.BytesIO(data)
        try:
            for _ in range(8):
                P.read_text_list(stream)
                P.read_content(stream, lambda _b: None)
        except EOFError:
            pass  # the end of Git's input: how the filter learns that Git is done

    return seeds, parse


def _patch():
    import blake3

    from mvc.diff.patch import MAGIC, TRAILER, VERSION, read_patch

    def sign(body: bytes) -> bytes:
        return body + TRAILER + blake3.blake3(body).digest()

    manifest = json.dumps({"base": "00" * 32, "target": "11" * 32, "tree": "22" * 32, "objects": 1}).encode()
    body = MAGIC + struct.pack("<H", VERSION) + struct.pack("<Q", len(manifest)) + manifest + b"\x00" * 40
    seeds = [_real()["patch"], sign(body), sign(MAGIC + struct.pack("<H", VERSION) + struct.pack("<Q", 2) + b"{}")]

    def parse(data):
        # re-signed after the edits, so the fuzzing reaches past the checksum into the manifest and records
        read_patch(sign(data[:-36]) if len(data) >= 36 else data)

    return seeds, parse


def _remote_index():
    from mvc.remote.sync import parse_index

    seeds = [json.dumps({"objects": [["ab" * 32, 0, 10], ["cd" * 32, 10, 4]]}).encode(), b'{"objects": []}']

    def parse(data):
        parse_index(data, "packs/x.idx")

    return seeds, parse


def _remote_ref():
    from mvc.remote.sync import _remote_tip

    seeds = [("ab" * 32 + "\n").encode()]

    def parse(data):
        _remote_tip(data, "refs/heads/main")

    return seeds, parse


def _remote_format():
    from mvc.remote.sync import check_format

    class One:
        def __init__(self, data):
            self.data = data

        def get(self, key):
            return self.data

    seeds = [b'{"format": 1}', b'{"format": 2}']

    def parse(data):
        check_format(One(data), create=False)

    return seeds, parse


def _mvcconfig():
    from mvc.hooks.git.mvcconfig import parse_listing

    seeds = [b"remote.origin.url\ns3://b/p\0remote.origin.endpoint-url\nhttp://127.0.0.1:9\0core.x\n1\0"]

    def parse(data):
        parse_listing(data)

    return seeds, parse


def _pre_push():
    from mvc.hooks.git.transfer import parse_push_updates

    seeds = [f"refs/heads/main {'a' * 40} refs/heads/main {'0' * 40}\n".encode()]

    def parse(data):
        parse_push_updates(data)

    return seeds, parse


def _objects():
    from mvc.store.objects import canonical_json, parse_object

    kinds = ["commit", "tree", "file", "tensor"]
    seeds = [canonical_json({"tree": "ab" * 32, "parents": ["cd" * 32], "author": "A <a@b>", "time": 1, "tz": 60,
                             "message": "m\n"}),
             canonical_json({"entries": [{"path": "m.safetensors", "kind": "file", "id": "ab" * 32}]}),
             canonical_json({"format": "safetensors", "header": {"__metadata__": {}}, "tensors": [["w", "ab" * 32]]}),
             canonical_json({"dtype": "BF16", "shape": [2, 2], "chunks": ["ab" * 32]})] + _real()["objects"]

    def parse(data):
        for kind in kinds:
            parse_object(kind, data, "fuzz")

    return seeds, parse


def _stored_value():
    import numpy as np

    from mvc.store import codec
    from mvc.store.odb import encode_chunk

    seeds = [encode_chunk(bytes(range(256)) * 64, 2)[1], encode_chunk(b"\x00" * 5000, 4)[1], encode_chunk(b"abc")[1]]
    seeds += _real()["stored"][:4]
    # delta values against one base: a fine-tune's DIFF (NONZERO and NIBBLES planes) and a SPARSE
    rng = np.random.default_rng(0)
    base = rng.integers(0x3C00, 0x3D00, 4096, dtype=np.uint16)
    moved = (base.astype(np.int32) + rng.integers(-40, 41, base.size)).astype(np.uint16)
    pruned = base.copy()
    pruned[::2] = 0
    # a few elements far from their base: non-zero top-plane bytes (the NibbleDiff checkout path)
    far = (base.astype(np.int32) + (rng.standard_normal(base.size) * np.where(rng.random(base.size) < 0.05, 400, 20))
           .astype(np.int32)).astype(np.uint16)
    seeds += [codec.encode_diff(0, moved, base, 2, True, bytes(32), 1),
              codec.encode_sparse(0, pruned, base, 2, True, bytes(32), 1),
              codec.encode_diff(0, far, base, 2, True, bytes(32), 1)]
    whole = codec.encode(0, base.tobytes(), 2)

    def bases(_oid, k):
        return codec.elements(base.tobytes(), k)

    def parse(data):
        from mvc.errors import MvcError

        try:
            codec.decode(data, "fuzz", bases)
        except MvcError:
            pass
        level = codec.diff_level(data, "fuzz")  # checkout's way: a DIFF applied a slice at a time
        got = codec.decode_slices(whole, "fuzz", [level]) if level is not None else None
        if got is not None:
            for _ in got[1]:
                pass

    return seeds, parse


def _repo_config():
    from mvc.repo import read_config

    root = tempfile.mkdtemp(prefix="mvc-fuzz-config-")
    os.makedirs(os.path.join(root, ".mvc"))
    seeds = [json.dumps({"format": 3, "remotes": {"origin": {"url": "file:///x"}}, "delta": {"max_depth": 4}}).encode()]

    def parse(data):
        with open(os.path.join(root, ".mvc", "config.json"), "wb") as f:
            f.write(data)
        read_config(root)

    return seeds, parse


PARSERS = {"safetensors-header": _safetensors, "pickle": _pickle, "torch-zip": _torch_zip, "pointer": _pointer,
           "pkt-line": _pktline, "patch": _patch, "remote-index": _remote_index, "remote-ref": _remote_ref,
           "remote-format": _remote_format, "mvcconfig": _mvcconfig, "pre-push-input": _pre_push,
           "objects": _objects, "stored-value": _stored_value, "repo-config": _repo_config}


def _fuzz(parse, seeds: list[bytes], cases: int, seed: int) -> int:
    """Run *parse* over *cases* hypothesis examples; returns how many ran. Raises what escaped."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as seeded
    from hypothesis import strategies as st

    from mvc.errors import MvcError

    n = 0

    @seeded(seed)
    @given(data=_mutations(st, seeds))
    @settings(max_examples=cases, deadline=1000, database=None, suppress_health_check=list(HealthCheck),
              print_blob=False)
    def case(data):
        nonlocal n
        n += 1
        try:
            parse(data)
        except MvcError:
            pass

    try:
        case()
    except Exception as e:
        e.cases = n
        raise
    return n


def run(cases: int, seed: int = 0, parsers: list[str] | None = None, log=print) -> Result:
    res = Result("fuzz", f"python -m campaigns fuzz --cases {cases} --seed {seed}")
    t0 = time.monotonic()
    for name in parsers or PARSERS:
        seeds, parse = PARSERS[name]()
        before = _rss()
        try:
            n = _fuzz(parse, seeds, cases, seed)
            outcome = "ok"
        except Exception as e:  # the shrunk failing example: what escaped, in one line
            n = getattr(e, "cases", 0)
            res.fail(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            outcome = "FAILED"
        grew = _rss() - before
        if grew > RSS_SLACK:
            res.fail(f"{name}: peak RSS grew by {grew >> 20} MiB")
            outcome = "FAILED"
        res.runs += n
        res.counts[name] = {"cases": n, "outcome": outcome, "peak_rss_growth_mib": max(0, grew >> 20)}
        log(f"fuzz: {name}: {n} cases, {outcome}")
    res.seconds = round(time.monotonic() - t0, 1)
    return res
