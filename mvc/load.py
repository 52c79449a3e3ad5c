"""Stored tensors as torch tensors: ``repo.load`` (torch is imported inside the functions, so only
callers that load tensors need the compress extra)."""

from __future__ import annotations

import io

from .errors import MvcError, UsageError
from .formats import torchfile
from .pipeline import Materializer
from .store.objects import Tensor, Tree

_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64",
    "U64": "uint64", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}


def tensor_bytes(mat: Materializer, t: Tensor) -> bytearray:
    """The raw bytes of one stored tensor, decoded and verified chunk by chunk."""
    buf = bytearray(t.nbytes)
    view = memoryview(buf)
    pos = 0
    for data in mat.chunks(t.chunks):
        view[pos:pos + len(data)] = data
        pos += len(data)
    return buf


def to_torch(t: Tensor, data: bytearray):
    import torch

    name = _TORCH_DTYPES[t.dtype]
    dtype = getattr(torch, name, None)
    if dtype is None:
        raise MvcError(f"this torch has no dtype {name} (needed for {t.dtype})")
    if t.nbytes == 0:
        return torch.empty(t.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(t.shape)


def load_tree(repo, tree: Tree, path: str | None, names: list[str] | None = None,
              dequantize: bool = False) -> dict:
    entries = tree.entries
    if path is not None:
        entries = [e for e in entries if e.path == path]
        if not entries:
            raise UsageError(f"{path}: no such file in that revision")
    out: dict = {}
    with Materializer(repo.odb, workers=repo.workers) as mat:
        for e in entries:
            f = repo.odb.get(e.oid, "file")
            if f.format == "safetensors":
                wanted = [(n, tid) for n, tid in f.tensors if names is None or n in names or dequantize]
                items = ((name, to_torch(t, tensor_bytes(mat, t)))
                         for name, t in ((n, repo.odb.get(tid, "tensor")) for n, tid in wanted))
                if dequantize:
                    from .formats.quantized import dequantize_state

                    items = dequantize_state(dict(items), safetensors_metadata(mat, f)).items()
            elif e.path.endswith(torchfile.SUFFIXES):
                items = _torch_file(mat.read_bytes(e.oid), e.path).items()
            else:
                if path is not None:
                    raise UsageError(f"{path}: not a tensor file")
                continue
            for name, value in items:
                if names is not None and name not in names:
                    continue
                if name in out:
                    raise MvcError(f"tensor {name!r} appears in more than one file", hint="pass path=")
                out[name] = value
    if names is not None and (missing := [n for n in names if n not in out]):
        raise UsageError(f"no tensor named {missing[0]!r} in that revision")
    return out


def safetensors_metadata(mat: Materializer, f) -> dict | None:
    """A stored safetensors file's ``__metadata__``, from its header chunks."""
    import json

    head = b"".join(mat.chunks(f.chunks))
    n = int.from_bytes(head[:8], "little")
    return json.loads(head[8:8 + n]).get("__metadata__")


def _torch_file(data: bytes, path: str) -> dict:
    import torch

    torchfile.check_file(io.BytesIO(data), path)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MvcError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
