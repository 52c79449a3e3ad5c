"""Chunk codec: lossless for every input, and the compression ratios the issue asks for."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvc.errors import CorruptObjectError
from mvc.store import codec
from tests.helpers import bf16, f32


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=5000), k=st.sampled_from([0, 2, 4, 8]))
def test_round_trip_any_bytes(data, k):
    stored = codec.encode(0, data, k)
    t, out = codec.decode(stored)
    assert t == 0 and bytes(out) == data


@pytest.mark.parametrize("k", [2, 4, 8])
def test_special_floats_round_trip(k):
    dt = {2: np.float16, 4: np.float32, 8: np.float64}[k]
    vals = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-8, -3.5, 65504.0] * 100, dtype=dt)
    raw = vals.tobytes()
    assert bytes(codec.decode(codec.encode(0, raw, k))[1]) == raw


def test_planes_used_for_floats(rng):
    raw = bf16(rng, (4096,))
    stored = codec.encode(0, raw, 2)
    assert stored[1] == codec.PLANES
    assert len(stored) < 0.75 * len(raw)


def test_pruned_mantissa_planes_compress(rng):
    x = np.frombuffer(f32(rng, (1 << 16,)), dtype="<f4").copy()
    dense = len(codec.encode(0, x.tobytes(), 4))
    x[np.abs(x) < np.quantile(np.abs(x), 0.5)] = 0
    pruned = len(codec.encode(0, x.tobytes(), 4))
    # half the elements are zero: the mantissa planes now compress too, not only the exponents
    assert pruned < dense - 0.2 * x.nbytes


@pytest.mark.parametrize("make,k,limit", [(bf16, 2, 0.70), (f32, 4, 0.86)])
def test_ratio_on_normal_weights(rng, make, k, limit):
    raw = make(rng, (1 << 21,))
    size = sum(len(codec.encode(0, raw[i:i + (4 << 20)], k)) for i in range(0, len(raw), 4 << 20))
    assert size / len(raw) <= limit


def test_corrupt_frames_raise(rng):
    stored = bytearray(codec.encode(0, bf16(rng, (4096,)), 2))
    stored[1] = 9
    with pytest.raises(CorruptObjectError):
        codec.decode(bytes(stored), "x")
    good = codec.encode(0, bf16(rng, (4096,)), 2)
    with pytest.raises(CorruptObjectError):
        codec.decode(good[:-10], "x")
