"""The C kernels and their numpy fallback give the same bytes, on random and special bit patterns,
for every element size; the codecs round-trip on either path."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvc.store import codec, kernels
from mvc.store.ids import hash_object
from tests.helpers import write_safetensors

pytestmark = pytest.mark.skipif(not kernels.native(), reason="the C kernels were not built (no compiler)")
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@pytest.fixture
def numpy_path():
    kernels.use_native(False)
    yield
    kernels.use_native(True)


def patterns(k, rng, n=70001):
    dt = UINT[k]
    a = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
    top = 1 << (8 * k - 1)
    a[:6] = [0, top, top - 1, np.iinfo(dt).max, 1, top + 1]  # +0, -0, max positive NaN-ish, all ones
    b = a.copy()
    move = rng.random(n) < 0.5
    b[move] += rng.integers(0, 5, int(move.sum())).astype(dt)
    b[::7] = rng.integers(0, np.iinfo(dt).max, b[::7].size, dtype=dt, endpoint=True)
    return a, b


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("flag", [False, True])
def test_same_bytes_on_both_paths(k, flag, rng):
    a, b = patterns(k, rng)
    out = {}
    for on in (True, False):
        kernels.use_native(on)
        try:
            planes = kernels.split(a, k, flag and k > 1)
            merged = kernels.merge(planes, k, flag and k > 1)
            d = kernels.diff(b, a, k, flag)
            back = kernels.undiff(d, a, k, flag)
            mask, values = kernels.gather(b, a, k)
            patched = kernels.scatter(a, mask, values, k)
            with pytest.raises(ValueError):
                kernels.scatter(a, mask, values[:-1], k)
        finally:
            kernels.use_native(True)
        assert np.array_equal(merged, a) and np.array_equal(back, b) and np.array_equal(patched, b)
        out[on] = (planes.tobytes(), d.tobytes(), mask.tobytes(), values.tobytes())
    assert out[True] == out[False]


@pytest.mark.parametrize("k,fs", [(2, 2), (4, 4), (8, 8), (1, 0)])
def test_codecs_read_what_the_other_path_wrote(k, fs, rng, numpy_path):
    a, b = patterns(k, rng, 1 << 16)
    bid = hash_object("chunk", a.tobytes())
    written = {}
    for on in (False, True):
        kernels.use_native(on)
        written[on] = (codec.encode(0, a.tobytes(), fs), codec.encode_diff(0, b, a, k, fs > 1, bid, 1))
    # the bytes may differ (planes the C path Huffman-codes itself, the numpy path with zstd):
    # each path reads what the other wrote
    for on in (False, True):
        kernels.use_native(on)
        full, delta = written[not on]
        assert bytes(codec.decode(full)[1]) == a.tobytes()
        assert bytes(codec.decode(delta, "x", lambda oid, kk: a)[1]) == b.tobytes()


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("changed", [0.0, 0.01, 0.5, 0.99, 1.0, "runs"])
def test_sparse_kernels_on_every_kind_of_mask(k, changed, rng):
    """gather/scatter take whole mask words at a time (all clear, all set, mixed) and the rest
    element by element: the same elements on both paths, and a wrong count of values refused."""
    n = 64 * 97 + 13  # a tail shorter than a word
    a = rng.integers(0, 255, n * k, dtype=np.uint8).view(UINT[k])
    if changed == "runs":
        move = np.zeros(n, bool)
        for start in range(0, n, 300):
            move[start:start + rng.integers(1, 200)] = True
    else:
        move = rng.random(n) < changed
    b = a.copy()
    b[move] ^= UINT[k](1)
    out = {}
    for on in (True, False):
        kernels.use_native(on)
        try:
            mask, values = kernels.gather(b, a, k)
            assert values.size == move.sum()
            assert np.array_equal(kernels.scatter(a, mask, values, k), b)
            if values.size:
                with pytest.raises(ValueError):
                    kernels.scatter(a, mask, values[:-1], k)
            out[on] = (mask.tobytes(), values.tobytes())
        finally:
            kernels.use_native(True)
    assert out[True] == out[False]


# -- the Huffman literal coder (kernels.huff): zstd frames that zstd itself decodes ------------
def _inflate(frame, n):
    import zstandard

    assert zstandard.frame_content_size(frame) == n
    return zstandard.ZstdDecompressor().decompress(frame, max_output_size=n)


def _exponents(rng, n, scale=0.02):
    """The top plane of bf16 N(0, scale) weights: what huff is for."""
    u = ((rng.standard_normal(n, dtype=np.float32) * scale).view(np.uint32) >> 16).astype(np.uint16)
    return kernels.split(u, 2, True)[0]


@pytest.mark.parametrize("n", [1024, 1025, 4097, 128 * 1024 - 1, 128 * 1024, 128 * 1024 + 1, 3 * 128 * 1024 + 999,
                               2 * 1024 * 1024])
def test_huff_frames_decode_with_zstd_at_every_block_boundary(n, rng):
    plane = _exponents(rng, n)
    frame = kernels.huff(plane)
    assert frame is not None and len(frame) < 0.45 * n  # ~0.33, and up to 80 bytes of headers
    assert _inflate(frame, n) == plane.tobytes()


def test_huff_codes_no_worse_than_zstd_on_exponents(rng):
    """The exponent plane of bf16 weights: one exact code for the whole chunk is at least as small
    as zstd's block by block (the store's ratio goal rests on it), also with one rare value far from
    the rest (a zero weight), which a code from a sample would have missed."""
    import zstandard

    fast = codec._ctx()[0]
    for plane in (_exponents(rng, 1 << 21), _exponents(rng, 1 << 21, 0.5)):
        plane[12345] = 0
        frame = kernels.huff(plane)
        assert _inflate(frame, plane.size) == plane.tobytes()
        assert len(frame) <= len(fast.compress(plane.tobytes()))
        assert isinstance(zstandard.frame_content_size(frame), int)


@pytest.mark.parametrize("kind", ["two", "skewed", "geometric", "dense", "max128", "runs"])
def test_huff_round_trips_every_shape_of_histogram(kind, rng):
    """Codes longer than 11 bits are limited (a heavily skewed histogram), two symbols, 129 symbols
    (the largest alphabet the direct tree form holds), long runs of one value."""
    n = 300_000
    if kind == "two":
        a = np.where(rng.random(n) < 0.999, 7, 100).astype(np.uint8)
    elif kind == "skewed":  # counts 1, 2, 4, ... 2^17: Huffman's codes would be up to 17 bits long
        a = np.repeat(np.arange(18, dtype=np.uint8), [1 << k for k in range(18)])
        rng.shuffle(a)
    elif kind == "geometric":
        a = np.minimum(rng.geometric(0.3, n), 128).astype(np.uint8)
    elif kind == "dense":
        a = rng.integers(0, 129, n).astype(np.uint8)
    elif kind == "max128":
        a = rng.integers(0, 4, n).astype(np.uint8)
        a[-1] = 128
    else:
        a = np.repeat(rng.integers(0, 50, n // 1000).astype(np.uint8), 1000)
    frame = kernels.huff(a)
    assert frame is not None
    assert _inflate(frame, a.size) == a.tobytes()


@pytest.mark.parametrize("case", ["one value", "short"])
def test_huff_declines_what_it_cannot_code(case):
    a = {"one value": np.full(5000, 3, np.uint8),
         "short": np.arange(1023, dtype=np.uint16).astype(np.uint8) % 7}[case]
    assert kernels.huff(a) is None


@pytest.mark.parametrize("case", ["value 129", "value 255 once", "all bytes", "high only", "noise nibbles",
                                  "bit mask", "two high"])
def test_huff_codes_symbols_above_128_with_fse_coded_weights(case, rng):
    """A code with a symbol above 128 has its weights FSE-coded (RFC 8878 §4.2.1.2): zstd reads
    the frame back exactly, for one stray high value, every byte value, high values only, the
    hi nibbles of delta noise and a sparse bit mask (NONZERO's), and just two symbols."""
    n = 300_000
    if case == "value 129":
        a = np.r_[np.zeros(5000, np.uint8), [129], rng.integers(0, 4, 5000)].astype(np.uint8)
    elif case == "value 255 once":
        a = np.minimum(rng.geometric(0.2, n), 60).astype(np.uint8)
        a[rng.integers(n)] = 255
    elif case == "all bytes":
        a = rng.integers(0, 256, n).astype(np.uint8)
    elif case == "high only":
        a = (200 + np.minimum(rng.geometric(0.3, n), 55)).astype(np.uint8)
    elif case == "noise nibbles":
        a = kernels.nibbles(np.clip(rng.normal(128, 30, 2 * n), 0, 255).astype(np.uint8))[0]
    elif case == "bit mask":
        a = np.packbits(rng.random(8 * n) < 0.05, bitorder="little")
    else:
        a = np.where(rng.random(n) < 0.9, 130, 250).astype(np.uint8)
    frame = kernels.huff(a)
    assert frame is not None and _inflate(frame, a.size) == a.tobytes()
    if case == "bit mask":  # what NONZERO's mask costs: no more than zstd's own coder makes of it
        assert len(frame) <= len(codec._ctx()[0].compress(a.tobytes()))


def test_huff_is_off_with_the_numpy_path(rng, numpy_path):
    assert kernels.huff(_exponents(rng, 4096)) is None


def test_incompressible_blocks_are_stored_raw(rng):
    """A block whose code does not shrink it (128 values spread evenly cost 7+ bits) is a raw block."""
    a = rng.integers(0, 129, 200_000).astype(np.uint8)
    a[:128 * 1024] = rng.permutation(np.arange(128 * 1024) % 128).astype(np.uint8)
    frame = kernels.huff(a)
    assert _inflate(frame, a.size) == a.tobytes()
    assert len(frame) > 128 * 1024  # the first block went raw, the second (129 values) too


def test_float_chunks_decode_on_both_paths_though_their_bytes_differ(rng):
    """With the C kernels the exponent plane is Huffman-coded by huff, without them by zstd: other
    stored bytes, the same chunk decoded, each path reading what the other wrote."""
    u = ((rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    base = u.copy()
    base[::3] += 1
    data = u.tobytes()
    bid = hash_object("chunk", base.tobytes())
    written = {}
    try:
        for on in (True, False):
            kernels.use_native(on)
            written[on] = (codec.encode(0, data, 2), codec.encode_diff(0, u, base, 2, True, bid, 1))
        for on in (True, False):
            kernels.use_native(on)
            for value in written[not on]:
                assert bytes(codec.decode(value, "x", lambda oid, k: base)[1]) == data
    finally:
        kernels.use_native(True)
    assert written[True][0] != written[False][0]
    assert len(written[True][0]) <= len(written[False][0])


@settings(max_examples=120, deadline=None)
@given(st.integers(1024, 400_000), st.integers(2, 256), st.floats(0.05, 8.0), st.integers(0, 2**32 - 1),
       st.sampled_from([129, 256]))
def test_huff_property_any_histogram_round_trips(n, values, skew, seed, top):
    """Random sizes, alphabets and skews (Zipf-like: value v has weight (v + 1)^-skew, shuffled onto
    byte values below *top*: the direct tree form up to 129, FSE-coded weights above): zstd
    decodes every frame to the exact bytes, or huff declines (one symbol, or FSE-coded weights
    over their 127 bytes)."""
    r = np.random.default_rng(seed)
    values = min(values, top)
    symbols = r.choice(top, size=values, replace=False).astype(np.uint8)
    p = (np.arange(values) + 1.0) ** -skew
    a = symbols[r.choice(values, size=n, p=p / p.sum())]
    frame = kernels.huff(a)
    if np.unique(a).size < 2:
        assert frame is None
    elif frame is not None or a.max() <= 128:
        assert _inflate(frame, n) == a.tobytes()


# -- the three-way merge of bf16 elements (kernels.merge3_bf16 against merge/engine.py's numpy) --
def _numpy_merge3(b, o, t, strategy, weights):
    import warnings

    from mvc.merge.engine import resolve_elements

    oc, tc = o != b, t != b
    merged, clash = np.where(oc, o, t), oc & tc & (o != t)
    if strategy:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # inf - inf and NaN inputs: the same NaN on both paths
            merged = np.where(clash, resolve_elements(strategy, "BF16", b, o, t, weights), merged)
    return merged, int(clash.sum())


SPECIALS = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFC1, 0x0001, 0x8001, 0x7F7F, 0xFF7F,
                     0x3F80, 0x0080, 0x8080], np.uint16)  # +-0, +-inf, NaNs, subnormals, the largest, 1.0


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([None, "average", "task-arithmetic"]),
       st.tuples(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3)), st.integers(0, 2**32 - 1))
def test_merge3_kernel_gives_the_numpy_bytes(strategy, weights, seed):
    """Every element, conflicting or not, and every special value against every other: the C
    kernel's merged bf16 bits and conflict count are exactly the numpy path's."""
    r = np.random.default_rng(seed)
    n = 4096
    b = ((r.standard_normal(n, dtype=np.float32) * 0.05).view(np.uint32) >> 16).astype(np.uint16)
    o, t = b.copy(), b.copy()
    for side in (o, t):
        move = r.random(n) < 0.6
        side[move] += r.integers(1, 5, int(move.sum())).astype(np.uint16)
    k = SPECIALS.size
    o[:k * k], t[:k * k], b[:k * k] = np.repeat(SPECIALS, k), np.tile(SPECIALS, k), 0x3C00
    got, conflicts = kernels.merge3_bf16(b, o, t, strategy, weights)
    want, want_conflicts = _numpy_merge3(b, o, t, strategy, weights)
    assert conflicts == want_conflicts
    assert np.array_equal(got, want)


def test_merge3_declines_what_it_does_not_compute(rng, numpy_path):
    b = np.zeros(8, np.uint16)
    assert kernels.merge3_bf16(b, b, b, "average", (1.0, 1.0)) is None  # numpy path forced
    kernels.use_native(True)
    assert kernels.merge3_bf16(b, b, b, "ties", (1.0, 1.0)) is None
    with pytest.raises(ValueError):
        kernels._native.merge3_bf16(b, b, b[:4], np.empty_like(b), 1, 1.0, 1.0, 2.0)


@pytest.mark.parametrize("on", [True, False])
def test_merge_writes_into_the_array_it_is_given(on, rng):
    """decode_slices merges each slice into one reused buffer: kernels.merge(..., out) fills that
    array and returns it, on either path."""
    u = rng.integers(0, 65535, 1000, dtype=np.uint16)
    planes = kernels.split(u, 2, True)
    kernels.use_native(on)
    try:
        out = np.empty_like(u)
        assert kernels.merge([planes[0], planes[1]], 2, True, out) is out
    finally:
        kernels.use_native(True)
    assert np.array_equal(out, u)


def tiny_model(path, rng):
    """Tiny tensors of several dtypes, raw-sized (< 128 bytes) and coded ones (up to 4095 bytes),
    two with equal data, a large one between them."""
    tensors = {}
    for i in range(40):
        n = [5, 31, 200, 1023][i % 4]
        tensors[f"f32.{i}"] = ("F32", (n,), rng.standard_normal(n).astype(np.float32).tobytes())
        tensors[f"bf16.{i}"] = ("BF16", (2, n // 2 or 1), rng.bytes(2 * 2 * (n // 2 or 1)))
        tensors[f"i8.{i}"] = ("I8", (n,), rng.bytes(n))
        tensors[f"bool.{i}"] = ("BOOL", (3,), bytes([1, 0, 1]))  # the same tensor, many times
        if i == 20:
            tensors["big"] = ("F32", (300, 300), rng.standard_normal(90000).astype(np.float32).tobytes())
    tensors["zero"] = ("F32", (0,), b"")
    write_safetensors(path, tensors)


@pytest.mark.parametrize("store", [True, False])
def test_tiny_runs_give_what_the_python_loop_gives(store, tmp_path, rng):
    """The C loop over runs of tiny tensors (kernels.tiny_run) stores the same objects, names the
    same tensors, and (hashing only) records the same locations and tensor objects as the Python
    loop that does one tensor at a time."""
    from mvc import Repo
    from mvc.pipeline import Ingestor

    tiny_model(tmp_path / "m.safetensors", rng)
    seen = []
    for on in (True, False):
        repo = Repo.init(tmp_path / f"r{int(on)}")
        try:
            kernels.use_native(on)
            with Ingestor(repo.odb, store=store) as ing:
                fid = ing.ingest(str(tmp_path / "m.safetensors"), "m.safetensors")
                extra = (dict(ing.scratch.items()), dict(ing.locations)) if not store else ()
            oids = sorted(repo.backend.iter_oids(b""))
            seen.append((fid, oids, repo.backend.stats()["objects"] if store else 0, extra))
        finally:
            kernels.use_native(True)
            repo.close()
    assert seen[0] == seen[1]
    if store:
        assert len(seen[0][1]) > 200  # chunks and tensor objects were stored
        assert seen[0][2] == len(seen[0][1])  # the store's count: each id once, duplicates not again
    else:
        assert len(seen[0][3][1]) > 100 and not seen[0][1]  # located, nothing stored


def test_verified_raw_gives_only_what_hashes_to_its_id():
    good = b"x" * 40
    oid = hash_object("chunk", good)
    head = b'{"chunk_size":4194304,"chunks":["'
    tensor = head + b"ab" * 32 + b'"],"dtype":"F32","shape":[3]}'
    tid = hash_object("tensor", tensor)
    bad_hex = head + b"AB" * 32 + b'"],"dtype":"F32","shape":[3]}'
    oids = [oid, oid, oid, oid, oid, b"short"]
    values = [b"\x00\x00" + good, b"\x00\x00" + good[:-1] + b"y", b"\x00\x01" + good, b"\x01\x00" + good, None,
              b"\x00\x00" + good]
    import blake3

    assert kernels.verified_raw(blake3.blake3, "chunk", 0, oids, values) == [good, None, None, None, None, None]
    got = kernels.verified_raw(blake3.blake3, "tensor", 1, [tid, hash_object("tensor", bad_hex)],
                               [b"\x01\x00" + tensor, b"\x01\x00" + bad_hex], head)
    assert got == [("ab" * 32, b'"],"dtype":"F32","shape":[3]}'), None]


def test_a_damaged_tiny_tensor_object_is_refused_at_checkout(tmp_path, rng):
    from mvc import Repo
    from mvc.errors import CorruptObjectError
    from tests.test_safety import flip_stored_byte

    repo = Repo.init(tmp_path / "r")
    try:
        tiny_model(tmp_path / "r" / "m.safetensors", rng)
        first = repo.commit("tiny")
        file = repo.odb.get(repo.tree_of(first).entries[0].oid, "file")
        flip_stored_byte(repo, dict(file.tensors)["f32.0"])
        os.remove(tmp_path / "r" / "m.safetensors")
        repo.odb._cache.clear()
        with pytest.raises(CorruptObjectError):
            repo.checkout(first, force=True)
        assert not (tmp_path / "r" / "m.safetensors").exists()
    finally:
        repo.close()


@given(st.lists(st.tuples(st.binary(max_size=40), st.one_of(st.none(), st.binary(max_size=300)), st.booleans()),
                max_size=20),
       st.sampled_from([None, b'{"chunk_size":4194304,"chunks":["']))
@settings(max_examples=300, deadline=None)
def test_verified_raw_on_any_bytes(cases, head):
    """Whatever the store hands it (any length, any codec byte, ids of any length, values that do
    or do not hash to their id), the C loop returns either None or content whose hash is the id."""
    import blake3

    oids, values = [], []
    for oid, value, honest in cases:
        if honest and value is not None and len(value) >= 2:  # a value that does hash to its id
            value = bytes([1 if head else 0, 0]) + value[2:]
            oid = hash_object("tensor" if head else "chunk", value[2:])
        oids.append(oid)
        values.append(value)
    kind = "tensor" if head else "chunk"
    got = kernels.verified_raw(blake3.blake3, kind, 1 if head else 0, oids, values, head)
    assert len(got) == len(values)
    for oid, value, out in zip(oids, values, got):
        if out is None:
            continue
        content = value[2:]
        assert hash_object(kind, content) == oid
        if head is None:
            assert out == content
        else:
            assert content == head + out[0].encode() + out[1]


def test_checkout_of_tiny_tensors_in_several_bulk_writes(tmp_path, rng):
    """More tiny tensors than one read takes (1 MiB), a large one and an empty one among them: the
    checkout plan's bulk items split where they must, and the file comes back bit for bit; a
    flipped byte in one tiny chunk is refused and nothing is written."""
    from mvc import Repo
    from mvc.errors import CorruptObjectError
    from tests.helpers import sha256
    from tests.test_safety import flip_stored_byte

    root = tmp_path / "r"
    repo = Repo.init(root)
    try:
        # tensor objects of 128 bytes or more: zstd-coded (I8 (4000,)); under: raw (F32 (3,))
        tensors = {f"t{i}": ("I8", (4000 - i % 3,), rng.bytes(4000 - i % 3)) for i in range(700)}
        tensors["big"] = ("F32", (300, 300), rng.standard_normal(90000).astype(np.float32).tobytes())
        tensors["empty"] = ("F32", (0,), b"")
        tensors.update({f"u{i}": ("F32", (3,), rng.bytes(12)) for i in range(300)})
        write_safetensors(root / "m.safetensors", tensors)
        want = sha256(root / "m.safetensors")
        first = repo.commit("tiny")
        os.remove(root / "m.safetensors")
        repo.checkout(first, force=True)
        assert sha256(root / "m.safetensors") == want
        file = repo.odb.get(repo.tree_of(first).entries[0].oid, "file")
        tensor = repo.odb.get(dict(file.tensors)["t650"], "tensor")
        flip_stored_byte(repo, tensor.chunks[0])
        os.remove(root / "m.safetensors")
        with pytest.raises(CorruptObjectError):
            repo.checkout(first, force=True)
        assert not (root / "m.safetensors").exists()
    finally:
        repo.close()


_DTYPES = ["F32", "BF16", "I8", "F64", "BOOL", "F8_E4M3", "X9", "f32"]


@st.composite
def _headers(draw):
    """A safetensors header's bytes and its data region's size: mostly plain and valid, then bent
    (keys reordered or repeated, other keys, floats, big or negative numbers, holes, escapes,
    metadata of any JSON, whitespace, and finally a byte deleted, replaced or inserted)."""
    import json

    n = draw(st.integers(0, 6))
    letters = st.sampled_from("ab.é_0:{}[]") if draw(st.booleans()) else st.characters(codec="utf-8")
    names = draw(st.lists(st.text(letters, max_size=6), min_size=n, max_size=n))
    head, off = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(_DTYPES[:6]) if draw(st.integers(0, 9)) else st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if not draw(st.integers(0, 14)):
            shape = draw(st.lists(st.sampled_from([-1, 0, 1, 2**31, 2**62, 2**64, 10**18, 1.0, True]), max_size=4))
        size = {"F32": 4, "BF16": 2, "I8": 1, "F64": 8, "BOOL": 1, "F8_E4M3": 1}.get(dtype, 1)
        nbytes = size * int(np.prod([d for d in shape if isinstance(d, int)] or [1]))
        offsets = [off, off + nbytes] if draw(st.integers(0, 9)) else draw(
            st.lists(st.integers(-1, 40), min_size=1, max_size=3))
        off += nbytes if nbytes < 2**20 else 0
        info = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        order = draw(st.permutations(list(info)))
        info = {k: info[k] for k in order}
        if not draw(st.integers(0, 14)):
            info["extra"] = draw(st.sampled_from([1, "x", None, [1]]))
        head[name] = info
    if draw(st.booleans()):
        meta = st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(), max_size=3)
        head["__metadata__"] = draw(meta if draw(st.integers(0, 4)) else st.sampled_from([None, [], 1, "m"]))
    items = list(head.items())
    if items and not draw(st.integers(0, 9)):
        items.append(draw(st.sampled_from(items)))  # a repeated key
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (",\n", " :\t")]))
    ascii_ = draw(st.booleans())  # else UTF-8 as it is, as the safetensors library writes it
    body = "{" + sep[0].join(f"{json.dumps(k, ensure_ascii=ascii_)}{sep[1]}"
                             f"{json.dumps(v, separators=sep, ensure_ascii=ascii_)}" for k, v in items) + "}"
    raw = body.encode() + b" " * draw(st.integers(0, 7))
    data_size = off + (0 if draw(st.integers(0, 9)) else draw(st.integers(-1, 3)))
    if draw(st.integers(0, 3)) == 0 and raw:
        at = draw(st.integers(0, len(raw) - 1))
        how = draw(st.sampled_from(["delete", "replace", "insert"]))
        byte = bytes([draw(st.sampled_from([0, 9, 34, 44, 45, 46, 48, 49, 58, 91, 92, 93, 123, 125, 128, 255]))])
        raw = raw[:at] + (b"" if how == "delete" else byte) + raw[at + (how != "insert"):]
    return raw, max(data_size, 0)


@given(_headers())
@settings(max_examples=1000, deadline=None)
def test_safetensors_header_in_c_accepts_and_refuses_what_python_does(case):
    """The C pass over a safetensors header (kernels.safetensors_header) gives the same Header as
    the Python parser, or declines; with it on or off parse_header accepts, refuses and words its
    error the same."""
    import struct

    from mvc.errors import InvalidFileError
    from mvc.formats import safetensors as sf

    raw, data_size = case
    prefix = struct.pack("<Q", len(raw)) + raw
    out = []
    for on in (True, False):
        kernels.use_native(on)
        try:
            out.append(sf.parse_header(prefix, len(prefix) + data_size, "m.safetensors"))
        except InvalidFileError as e:
            out.append(str(e))
        finally:
            kernels.use_native(True)
    assert out[0] == out[1]
    fast = kernels.safetensors_header(raw, data_size, sf._SIZE, sf.Entry)
    if fast is not None:
        assert isinstance(out[1], sf.Header) and (fast[0], fast[1]) == (out[1].entries, out[1].metadata)
        assert all(type(e) is sf.Entry for e in fast[0])


def test_safetensors_header_in_c_takes_a_plain_header(tmp_path):
    """A header as the safetensors library writes it (metadata, many tensors out of name order) is
    parsed by the C pass, not left to Python."""
    from safetensors.numpy import save_file

    from mvc.formats import safetensors as sf

    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": np.full((i % 3, 2), i, np.float32) for i in range(50)} | {"é": np.zeros(3, np.int8)},
              str(path), metadata={"format": "pt"})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    fast = kernels.safetensors_header(data[8:8 + n], len(data) - 8 - n, sf._SIZE, sf.Entry)
    assert fast is not None and fast[1] == {"format": "pt"} and len(fast[0]) == 51
    kernels.use_native(False)
    try:
        assert sf.parse_header(data, len(data), str(path)).entries == fast[0]
    finally:
        kernels.use_native(True)


_hex_ids = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def _file_objects(draw):
    """A safetensors file object, and its canonical bytes perhaps bent (a byte deleted, replaced
    or inserted; an id in capitals; a space; another key)."""
    from mvc.store.objects import File, canonical_json

    letters = st.sampled_from('ab.é_0:,[]{}"\\\n\x7f') if draw(st.booleans()) else st.characters(codec="utf-8")
    names = st.text(letters, max_size=6)
    f = File("safetensors", draw(st.integers(0, 2**70) if not draw(st.integers(0, 9)) else st.integers(0, 9999)),
             tuple(draw(st.lists(_hex_ids, max_size=2))), tuple(draw(st.lists(st.tuples(names, _hex_ids), max_size=5))))
    raw = canonical_json(f.to_json())
    how = draw(st.sampled_from(["keep", "keep", "delete", "replace", "insert", "upper", "key"]))
    if how == "upper":
        raw = raw.replace(b"a", b"A", 1)
    elif how == "key":
        raw = raw[:-1] + b',"x":1}'
    elif how != "keep":
        at = draw(st.integers(0, len(raw) - 1))
        byte = bytes([draw(st.sampled_from([0, 32, 34, 44, 48, 49, 58, 91, 92, 93, 97, 123, 125, 195, 255]))])
        raw = raw[:at] + (b"" if how == "delete" else byte) + raw[at + (how != "insert"):]
    return f, raw


@given(_file_objects())
@settings(max_examples=1000, deadline=None)
def test_file_objects_in_c_read_and_write_what_python_does(case):
    """kernels.file_json writes canonical_json's bytes or declines; parse_object with the C reader
    on or off accepts the same bytes, refuses the same bytes and gives the same File."""
    from mvc.errors import CorruptObjectError
    from mvc.store.objects import File, canonical_json, encode_object, parse_object

    f, raw = case
    fast = kernels.file_json(f.chunks, f.size, f.tensors)
    if fast is not None:
        assert fast == canonical_json(f.to_json())
    out = []
    for on in (True, False):
        kernels.use_native(on)
        try:
            out.append(encode_object(f))
            try:
                out.append(parse_object("file", raw))
            except CorruptObjectError as e:
                out.append(str(e))
        finally:
            kernels.use_native(True)
    assert out[:2] == out[2:]
    parsed = kernels.file_object(raw)
    if parsed is not None:  # only canonical bytes are read in C
        chunks, size, tensors = parsed
        assert canonical_json(File("safetensors", size, chunks, tensors).to_json()) == raw


def test_file_objects_in_c_take_the_common_form():
    """A file object of plain names is written and read by the C pass, not left to json."""
    from mvc.store.objects import File, canonical_json

    f = File("safetensors", 12, ("0" * 64,), tuple((f"layer.{i}.é", f"{i:064x}") for i in range(100)))
    raw = kernels.file_json(f.chunks, f.size, f.tensors)
    assert raw == canonical_json(f.to_json())
    assert kernels.file_object(raw) == (f.chunks, f.size, f.tensors)
    assert kernels.file_json(f.chunks, f.size, f.tensors + (("a\"b", "0" * 64),)) is None


@given(st.lists(st.sampled_from([0, 1, 80, 4095, 4096, 5000, 300000, 1 << 20]), max_size=60))
@settings(max_examples=300, deadline=None)
def test_tiny_runs_end_where_an_entry_by_entry_walk_ends_them(sizes):
    """Ingestor._tiny_runs (a step per run) splits the entries where the walk over every entry
    does: at each tensor that is not tiny, and before a run's data would pass _TINY_READ bytes."""
    from mvc.formats.safetensors import Entry
    from mvc.pipeline import _TINY, _TINY_READ, Ingestor

    entries, off = [], 0
    for i, n in enumerate(sizes):
        entries.append(Entry(f"t{i}", "I8", (n,), off, off + n))
        off += n
    want, i = list(range(len(entries))), 0  # a tensor that is not tiny: its own index
    while i < len(entries):
        if not 0 < sizes[i] < _TINY:
            i += 1
            continue
        j = i
        while j < len(entries) and 0 < sizes[j] < _TINY and entries[j].end - entries[i].begin <= _TINY_READ:
            j += 1
        want[i:j] = [j] * (j - i)
        i = j
    assert Ingestor._tiny_runs(entries) == want


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000))
def test_nibbles_give_the_numpy_bytes_and_back(data):
    """The NIBBLES split (docs/format.md §5.1) on both paths: the same hi and lo bytes, and
    unnibbles gives the plane back, at every length (odd ones pair the last byte with 0)."""
    plane = np.frombuffer(data, np.uint8)
    hi, lo = kernels.nibbles(plane)
    kernels.use_native(False)
    try:
        hi2, lo2 = kernels.nibbles(plane)
        back2 = kernels.unnibbles(hi, lo, plane.size)
    finally:
        kernels.use_native(True)
    assert hi.tobytes() == hi2.tobytes() and lo.tobytes() == lo2.tobytes()
    assert kernels.unnibbles(hi, lo, plane.size).tobytes() == data == back2.tobytes()
    if plane.size:
        assert hi.size == lo.size == (plane.size + 1) // 2
        assert int(hi[0]) & 0x0F == plane[0] >> 4 and int(lo[0]) & 0x0F == plane[0] & 0x0F


# -- int8 codes predicted from a parent's floats (kernels.rtn8 against codec.predict_rtn8) -----
F16_SPECIALS = np.array([0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF],
                        np.uint16)  # +-0, +-inf, NaNs, subnormals, the smallest normal, the largest


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([0, 1, 2]), st.integers(1, 5000), st.integers(1, 700), st.integers(0, 10_000),
       st.integers(0, 2**32 - 1))
def test_rtn8_gives_the_numpy_codes(pdtype, n, cols, col0, seed):
    """Every float kind the parent may hold, rows starting anywhere in the chunk, values at the
    rounding ties (x.5 of a scale), beyond +-127.5, NaN, infinities, subnormals, and scales of
    zero, inf and NaN: the C kernel gives numpy's codes, byte for byte."""
    r = np.random.default_rng(seed)
    col0 %= cols
    rows = (col0 + n + cols - 1) // cols
    scales = (r.random(rows) * 0.05).astype(np.float32)
    scales[r.random(rows) < 0.05] = 0
    scales[r.random(rows) < 0.02] = np.inf
    scales[r.random(rows) < 0.02] = np.nan
    x = (r.standard_normal(n) * 2.5).astype(np.float32)
    ties = r.random(n) < 0.2
    row = (col0 + np.arange(n)) // cols
    x[ties] = ((r.integers(-130, 130, int(ties.sum())) + 0.5) * scales[row[ties]]).astype(np.float32)
    if pdtype == 0:
        bits = x.view(np.uint32).copy()
        pick = r.random(n) < 0.05
        bits[pick] = r.choice(SPECIALS.astype(np.uint32) << 16, int(pick.sum()))
    elif pdtype == 1:
        bits = x.astype(np.float16).view(np.uint16).copy()
        pick = r.random(n) < 0.05
        bits[pick] = r.choice(F16_SPECIALS, int(pick.sum()))
    else:
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)
        pick = r.random(n) < 0.05
        bits[pick] = r.choice(SPECIALS, int(pick.sum()))
    got = kernels.rtn8(bits, pdtype, scales, cols, col0)
    with np.errstate(all="ignore"):
        want = codec.predict_rtn8(codec.to_f32(bits, pdtype), scales, cols, col0)
    assert got.tobytes() == want.tobytes()


def test_rtn8_refuses_scales_short_of_the_rows():
    with pytest.raises(ValueError):
        kernels.rtn8(np.zeros(1000, np.uint16), 2, np.ones(9, np.float32), 100, 1)  # 11 rows touched
    assert kernels.rtn8(np.zeros(1000, np.uint16), 2, np.ones(11, np.float32), 100, 1).tobytes() == bytes(1000)


@pytest.fixture(params=[2, 1, 0], ids=["avx2", "ssse3", "sse2"])
def simd(request):
    """Each SIMD path the kernels have, on this machine (as far as its CPU goes)."""
    from mvc.store import _kernels

    was = _kernels.simd_cap(request.param)
    yield request.param
    _kernels.simd_cap(was)


@pytest.mark.parametrize("changed", [0.0, 0.05, 0.5, 1.0])
def test_gather_on_every_simd_path(changed, simd, rng):
    n = 16 * 4099 + 7
    a = rng.integers(0, 256, n, dtype=np.uint8)
    b = a.copy()
    move = rng.random(n) < changed
    b[move] ^= rng.integers(1, 256, int(move.sum()), dtype=np.uint8)
    mask, values = kernels.gather(b, a, 1)
    assert np.array_equal(mask, np.packbits(move, bitorder="little")) and np.array_equal(values, b[move])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70_000), st.sampled_from([0.0, 0.03, 0.5, 1.0]), st.booleans(), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_undiff_parts_gives_what_the_planes_give(n, spread, is_float, planes_base, seed):
    """A DIFF of two-byte elements applied from its NONZERO and NIBBLES parts, slice by slice, in
    place or merging the base's planes as it goes, on every SIMD path: the elements undiff gives
    from the planes scatter and unnibbles make, and every non-zero byte used exactly once."""
    from mvc.store import _kernels

    if not kernels.undiff_parts_ready():
        pytest.skip("undiff_parts needs an x86-64 CPU with SSSE3")
    r = np.random.default_rng(seed)
    base = r.integers(0, 65536, n, dtype=np.uint16)
    base[:8] = [0, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 1, 0x7FFF][:min(8, n)]
    move = r.random(n) < 0.9
    new = base.copy()
    new[move] += (r.standard_normal(int(move.sum())) * (40 + 400 * spread)).astype(np.int64).astype(np.uint16)
    planes = kernels.diff(new, base, 2, is_float)
    mask, values = kernels.gather(planes[0], codec._zeros(n), 1)
    hi, lo = kernels.nibbles(planes[1])
    rot = kernels.split(base, 2, True)
    step = 16 * int(r.integers(1, 300))
    padded = np.r_[values, np.zeros(16, np.uint8)]
    for cap in (2, 1):
        was = _kernels.simd_cap(cap)
        try:
            out = base.copy() if not planes_base else np.zeros(n, np.uint16)
            used = 0
            for i in range(0, n, step):
                extra = (rot[0][i:i + step], rot[1][i:i + step]) if planes_base else ()
                used = kernels.undiff_parts(out[i:i + step], i, mask, padded, values.size, used, hi, lo, is_float,
                                            *extra)
        finally:
            _kernels.simd_cap(was)
        assert used == values.size
        assert out.tobytes() == new.tobytes()


def test_undiff_parts_refuses_what_does_not_fit(rng):
    if not kernels.undiff_parts_ready():
        pytest.skip("undiff_parts needs an x86-64 CPU with SSSE3")
    n = 4096
    out = np.zeros(n, np.uint16)
    mask = np.full(n // 8, 0xFF, np.uint8)  # every element wants a value
    hi = lo = np.zeros(n // 2, np.uint8)
    v = np.ones(n + 16, np.uint8)
    with pytest.raises(ValueError, match="more values"):
        kernels.undiff_parts(out, 0, mask, v, 100, 0, hi, lo, True)
    with pytest.raises(ValueError, match="more values"):  # the same in the last few (one at a time)
        kernels.undiff_parts(out[:20], 0, mask[:3], v, 19, 0, hi, lo, True)
    with pytest.raises(ValueError, match="do not fit"):  # no 16 bytes to spare after the values
        kernels.undiff_parts(out, 0, mask, v, n + 1, 0, hi, lo, True)
    with pytest.raises(ValueError, match="do not fit"):  # a start off the 16-element grid
        kernels.undiff_parts(out[:64], 8, mask, v, n, 0, hi, lo, True)
    with pytest.raises(ValueError, match="do not fit"):  # a mask too short for the slice
        kernels.undiff_parts(out, 0, mask[:10], v, n, 0, hi, lo, True)
    with pytest.raises(ValueError, match="do not fit"):  # base planes of another length
        kernels.undiff_parts(out, 0, mask, v, n, 0, hi, lo, True, hi, lo)
    assert kernels.undiff_parts(out, 0, mask, v, n, 0, hi, lo, True) == n


@pytest.mark.parametrize("pdtype", [0, 1, 2])
def test_rtn8_on_every_simd_path(pdtype, simd, rng):
    n, cols = 10_000, 333
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    bits = {0: x.view(np.uint32), 1: x.astype(np.float16).view(np.uint16),
            2: (x.view(np.uint32) >> 16).astype(np.uint16)}[pdtype]
    scales = (rng.random((5 + n + cols - 1) // cols) * 0.05).astype(np.float32)
    with np.errstate(all="ignore"):
        want = codec.predict_rtn8(codec.to_f32(bits, pdtype), scales, cols, 5)
    assert kernels.rtn8(bits, pdtype, scales, cols, 5).tobytes() == want.tobytes()
