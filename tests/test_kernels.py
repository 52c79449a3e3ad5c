"""The C kernels and their numpy fallback give the same bytes, on random and special bit patterns,
for every element size; the codecs round-trip on either path."""

from __future__ import annotations

import numpy as np
import pytest

from mvc.store import codec, kernels
from mvc.store.ids import hash_object

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
    assert written[True] == written[False]
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
