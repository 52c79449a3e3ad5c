"""Codec micro-benchmark: mvc's chunk codec against ZipNN and zstd on the same bytes.

    python -m bench --codec [--size-mib 256]

Same weights (N(0, 0.02), seeded) for every coder; two threads for everyone (mvc:
two worker threads over 4 MiB chunks, as commit uses them; ZipNN: threads=2;
zstd: its own 2 worker threads). Ratio = compressed / raw; speeds in GB/s of raw data,
best of the repetitions. The first rows: one 2 MiB exponent plane, one thread, mvc's two coders.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _data(dtype: str, size_mib: int) -> bytes:
    rng = np.random.default_rng(0)
    n = size_mib * 2**20 // (2 if dtype == "bf16" else 4)
    x = rng.standard_normal(n, dtype=np.float32) * 0.02
    if dtype == "bf16":
        return (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    return x.astype("<f4").tobytes()


def _time(fn, reps: int = 2):
    best, out = float("inf"), None  # best of reps
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_mvc(data: bytes, k: int) -> tuple[float, float, float]:
    from mvc.store import codec

    chunk = 4 << 20
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    with ThreadPoolExecutor(2) as pool:
        tc, enc = _time(lambda: list(pool.map(lambda p: codec.encode(0, p, k), pieces)))
        td, dec = _time(lambda: list(pool.map(lambda e: codec.decode(e)[1], enc)))
    assert b"".join(bytes(d) for d in dec) == data
    return sum(map(len, enc)) / len(data), len(data) / tc / 1e9, len(data) / td / 1e9


def bench_zipnn(data: bytes, dtype: str) -> tuple[float, float, float] | None:
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    z = ZipNN(input_format="byte", bytearray_dtype="bfloat16" if dtype == "bf16" else "float32", threads=2)
    tc, comp = _time(lambda: z.compress(bytearray(data)))  # ZipNN modifies its input: give it a copy
    td, dec = _time(lambda: z.decompress(comp))
    assert bytes(dec) == data
    return len(comp) / len(data), len(data) / tc / 1e9, len(data) / td / 1e9


def bench_zstd(data: bytes, level: int) -> tuple[float, float, float]:
    import zstandard as zstd

    c = zstd.ZstdCompressor(level=level, threads=2)
    d = zstd.ZstdDecompressor()
    tc, comp = _time(lambda: c.compress(data))
    td, dec = _time(lambda: d.decompress(comp))
    assert dec == data
    return len(comp) / len(data), len(data) / tc / 1e9, len(data) / td / 1e9


def bench_exponent_plane() -> list[dict]:
    """One 2 MiB bf16 exponent plane (the top plane of a 4 MiB chunk), one thread: the C kernels'
    Huffman-only zstd frame against the tuned zstd call it replaces (docs/format.md §5)."""
    import zstandard as zstd

    from mvc.store import codec, kernels

    plane = kernels.split(np.frombuffer(_data("bf16", 4), "<u2"), 2, True)[0]
    d = zstd.ZstdDecompressor()
    rows = []
    for name, fn in (("tuned zstd (strategy fast, min_match 7)", lambda: codec._ctx()[0].compress(plane)),
                     ("Huffman-only zstd frame (C kernels)", lambda: kernels.huff(plane))):
        if fn() is None:
            rows.append({"dtype": "bf16 exponent plane", "coder": name, "missing": True})
            continue
        tc, comp = _time(fn, reps=20)
        td, dec = _time(lambda c=comp: d.decompress(c), reps=20)
        assert dec == plane.tobytes()
        rows.append({"dtype": "bf16 exponent plane", "coder": name, "ratio": len(comp) / plane.size,
                     "compress_gbps": plane.size / tc / 1e9, "decompress_gbps": plane.size / td / 1e9,
                     "compress_ms": tc * 1e3, "decompress_ms": td * 1e3})
    return rows


def bench_kernels() -> list[dict]:
    """The element transforms of mvc/store/_kernels.c and their numpy fallback, on one 4 MiB bf16
    chunk, one thread, GB/s of the chunk's bytes (docs/format.md §5): a fine-tune's base (a third
    of the elements moved by one unit in the last place), the DIFF's mostly-zero top plane for
    gather, and a merge where every element conflicts."""
    from mvc.store import kernels

    u = np.frombuffer(_data("bf16", 4), "<u2")
    base = u.copy()
    base[::3] += 1
    rng = np.random.default_rng(1)
    ours, theirs = u ^ rng.integers(1, 4, u.size).astype("<u2"), u ^ rng.integers(4, 8, u.size).astype("<u2")
    top = kernels.diff(u, base, 2, True)[0]
    zeros = np.zeros_like(top)
    planes = kernels.split(u, 2, True)
    d = kernels.diff(u, base, 2, True)
    mask, values = kernels.gather(top, zeros, 1)
    def merge3(numpy: bool):
        if numpy:  # merge/engine.py's own numpy path: sides, conflicts, then the strategy's values
            from mvc.merge.engine import resolve_elements

            oc, tc = ours != base, theirs != base
            clash = oc & tc & (ours != theirs)
            full = resolve_elements("average", "BF16", base, ours, theirs, (1.0, 1.0))
            return np.where(clash, full, np.where(oc, ours, theirs)), int(clash.sum())
        return kernels.merge3_bf16(base, ours, theirs, "average", (1.0, 1.0))

    steps = [("rotate + split", lambda _: kernels.split(u, 2, True)),
             ("merge + rotate", lambda _: kernels.merge(planes, 2, True)),
             ("DIFF encode", lambda _: kernels.diff(u, base, 2, True)),
             ("DIFF decode", lambda _: kernels.undiff(d, base, 2, True)),
             ("gather (a DIFF's top plane, 5 % non-zero)", lambda _: kernels.gather(top, zeros, 1)),
             ("scatter (the same)", lambda _: kernels.scatter(zeros, mask, values, 1)),
             ("three-way merge, every element conflicting, average", merge3)]
    rows = []
    for name, fn in steps:
        speeds = {}
        for on in (True, False):
            kernels.use_native(on)
            try:
                t, _ = _time(lambda f=fn, numpy=not on: f(numpy), reps=5)
                speeds[on] = u.nbytes / t / 1e9
            finally:
                kernels.use_native(True)
        rows.append({"step": name, "c_gbps": speeds[True], "numpy_gbps": speeds[False]})
    return rows


def bench_undiff_parts() -> list[dict]:
    """kernels.undiff_parts, which checkout runs on every chunk of a fine-tune's or a merge's DIFF
    (docs/format.md §5.1), on each SIMD path this CPU has, against the plain merge of a whole
    chunk's planes: one 4 MiB bf16 chunk of N(0, 0.02) weights, each moved by N(0, 0.00125) noise
    (6 % of the difference's top-plane bytes non-zero, as in the Llama history's merge), in
    checkout's 256 Ki-element slices, the base's planes merged as it goes; one thread, the best of
    20. [] without the kernel."""
    from mvc.store import _kernels, codec, kernels

    if not kernels.undiff_parts_ready():
        return []
    rng = np.random.default_rng(2)
    base = np.frombuffer(_data("bf16", 4), "<u2")
    x = (base.astype(np.uint32) << 16).view(np.float32)
    new = ((x + rng.standard_normal(x.size, dtype=np.float32) * 0.00125).view(np.uint32) >> 16).astype("<u2")
    planes = kernels.diff(new, base, 2, True)
    mask, values = kernels.gather(planes[0], codec._zeros(base.size), 1)
    hi, lo = kernels.nibbles(planes[1])
    level = codec.NibbleDiff(base.size, mask.tobytes(), values.tobytes(), hi.tobytes(), lo.tobytes())
    rot = kernels.split(base, 2, True)
    out, step = np.empty_like(base), 256 * 1024

    def undiff():  # as codec.decode_slices applies it at checkout
        used = 0
        for i in range(0, base.size, step):
            used = level.apply(out[i:i + step], i, used, True, (rot[0][i:i + step], rot[1][i:i + step]))

    def merge():
        for i in range(0, base.size, step):
            kernels.merge([rot[0][i:i + step], rot[1][i:i + step]], 2, True, out[i:i + step])

    rows = [{"step": "merge of the base's planes (a full chunk's decode, after zstd)", "ms": _time(merge, 20)[0] * 1e3}]
    names = {2: "AVX2", 1: "SSSE3"}
    for cap in (2, 1):  # a path this CPU lacks runs the widest one below it
        was = _kernels.simd_cap(cap)
        try:
            ms = _time(undiff, 20)[0] * 1e3
        finally:
            _kernels.simd_cap(was)
        if out.tobytes() != new.tobytes():
            raise AssertionError(f"undiff_parts at simd_cap {cap} did not give the chunk back")
        rows.append({"step": f"undiff_parts, {names[cap]} at most", "ms": ms})
    return rows


def report_undiff_parts(rows: list[dict]) -> str:
    out = ["| step (2 Mi bf16 elements, one thread) | ms |", "|---|---|"]
    return "\n".join(out + [f"| {r['step']} | {r['ms']:.3f} |" for r in rows])


def report_kernels(rows: list[dict]) -> str:
    out = ["| step (4 MiB bf16 chunk, one thread) | C | numpy |", "|---|---|---|"]
    out += [f"| {r['step']} | {r['c_gbps']:.1f} | {r['numpy_gbps']:.2f} |" for r in rows]
    return "\n".join(out)


def run(size_mib: int) -> list[dict]:
    rows = bench_exponent_plane()
    for dtype, k in (("bf16", 2), ("fp32", 4)):
        data = _data(dtype, size_mib)
        for name, res in (("mvc (planes, Huffman-coded exponents)", bench_mvc(data, k)),
                          ("ZipNN", bench_zipnn(data, dtype)),
                          ("zstd level 1", bench_zstd(data, 1)),
                          ("zstd level 3", bench_zstd(data, 3))):
            if res is None:
                rows.append({"dtype": dtype, "coder": name, "missing": True})
                continue
            ratio, c, d = res
            rows.append({"dtype": dtype, "coder": name, "ratio": ratio, "compress_gbps": c, "decompress_gbps": d})
    return rows


def report(rows: list[dict]) -> str:
    out = ["| data | coder | ratio | compress GB/s | decompress GB/s |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("missing"):
            out.append(f"| {r['dtype']} | {r['coder']} | not available | | |")
        else:
            out.append(f"| {r['dtype']} | {r['coder']} | {r['ratio']:.4f} | {r['compress_gbps']:.2f} | "
                       f"{r['decompress_gbps']:.2f} |")
    return "\n".join(out)
