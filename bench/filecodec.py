"""Compress or decompress one file with ZipNN or zstd, as a process of its own (for bench/peers.py).

    python -m bench.filecodec zipnn|zstd compress|decompress IN OUT
"""

from __future__ import annotations

import sys


def main() -> None:
    coder, op, src, dst = sys.argv[1:5]
    with open(src, "rb") as f:
        data = f.read()
    if coder == "zipnn":
        from zipnn import ZipNN

        z = ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=2)
        out = z.compress(bytearray(data)) if op == "compress" else z.decompress(data)
    else:
        import zstandard as zstd

        out = (zstd.ZstdCompressor(level=3, threads=2).compress(data) if op == "compress"
               else zstd.ZstdDecompressor().decompress(data))
    with open(dst, "wb") as f:
        f.write(bytes(out))


if __name__ == "__main__":
    main()
