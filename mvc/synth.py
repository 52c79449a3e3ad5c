"""Seeded synthetic Llama-like bf16 models (safetensors, written without torch) for the demo and benchmarks."""

from __future__ import annotations

import os

import numpy as np


def llama_shapes(size_mib: int, largest_mib: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-like stack whose bf16 size is about *size_mib*."""
    hidden = 2048
    inter = 5632
    layer_bytes = 2 * (4 * hidden * hidden + 3 * hidden * inter)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    if largest_mib:
        vocab = largest_mib * 1024 * 1024 // (2 * hidden)
        shapes.append(("model.embed_tokens.weight", (vocab, hidden)))
    budget = size_mib * 1024 * 1024 - sum(2 * a * b for _, (a, b) in shapes)
    i = 0
    while budget >= layer_bytes or i == 0:
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden, hidden)),
                   (p + "self_attn.v_proj.weight", (hidden, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,))]
        budget -= layer_bytes
        i += 1
    return shapes


def bf16_normal(rng: np.random.Generator, n: int, std: float = 0.02) -> np.ndarray:
    x = rng.standard_normal(n, dtype=np.float32)
    x *= std
    return (x.view(np.uint32) >> 16).astype("<u2")


def write_bf16_file(fp: str, shapes: list, rng: np.random.Generator, ones=lambda name: False) -> None:
    """One safetensors file of bf16 tensors N(0, 0.02) (those *ones* names: all 1.0, as norms are),
    written a tensor at a time."""
    from .formats.safetensors import encode_header

    head, _offsets, _size = encode_header([(name, "BF16", shape) for name, shape in shapes], {"format": "pt"})
    os.makedirs(os.path.dirname(fp) or ".", exist_ok=True)
    with open(fp, "wb") as f:
        f.write(head)
        for name, shape in shapes:
            n = int(np.prod(shape))
            if ones(name):
                f.write(np.full(n, 0x3F80, dtype="<u2").tobytes())
                continue
            for i in range(0, n, 1 << 24):
                f.write(bf16_normal(rng, min(1 << 24, n - i)).tobytes())


def write_model(path: str, size_mib: int, seed: int = 0, largest_mib: int | None = None,
                shards: int = 1) -> list[str]:
    """Write the model (streaming, one tensor at a time); return the file paths written."""
    shapes = llama_shapes(size_mib, largest_mib)
    rng = np.random.default_rng(seed)
    per = -(-len(shapes) // shards)
    paths = []
    for s in range(shards):
        fp = path if shards == 1 else path.replace(".safetensors", f"-{s + 1:05d}-of-{shards:05d}.safetensors")
        write_bf16_file(fp, shapes[s * per:(s + 1) * per], rng)
        paths.append(fp)
    return paths
