"""Safety scan for PyTorch checkpoints (.pt, .pth, .bin, .ckpt) without unpickling.

A torch checkpoint is a pickle (inside a zip archive since torch 1.6). Pickles can
call any importable function, so we never run one: ``pickletools.genops`` walks the
opcodes and every global the pickle would import is checked against an allowlist
that mirrors what ``torch.load(weights_only=True)`` accepts for state dicts.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile

from ..errors import InvalidFileError, UnsafePickleError

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MAX_PICKLE = 256 * 1024 * 1024

_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "slice"),
    ("torch", "Size"), ("torch", "device"), ("torch", "dtype"), ("torch", "strided"),
    ("torch", "sparse_coo"), ("torch", "sparse_csr"), ("torch", "per_tensor_affine"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_qtensor"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"), ("torch._utils", "_rebuild_wrapper_subclass"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch.nn.parameter", "Parameter"),
    ("torch.serialization", "_get_layout"), ("torch.storage", "UntypedStorage"),
}
_TORCH_ATTR = re.compile(r"^(\w+Storage|float\w*|bfloat16|half|double|u?int\d+|bool|complex\w*|long|short"
                         r"|cfloat|cdouble|qu?int\w*|bits\w*)$")


def _allowed(module: str, name: str) -> bool:
    return (module, name) in _ALLOWED or (module == "torch" and bool(_TORCH_ATTR.match(name)))


def scan_pickle(stream, path: str, count: int = 1) -> None:
    """Check *count* consecutive pickles read from a binary stream."""
    for _ in range(count):
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(arg)
                elif op.name in ("GLOBAL", "INST"):
                    module, name = arg.split(" ", 1)
                    _check(module, name, path)
                elif op.name == "STACK_GLOBAL":
                    if len(strings) < 2:
                        raise UnsafePickleError(path, "pickle builds a global from computed names")
                    _check(strings[-2], strings[-1], path)
                elif op.name in ("REDUCE", "BUILD", "OBJ", "NEWOBJ", "NEWOBJ_EX"):
                    pass  # only reachable through a global, which was checked
        except UnsafePickleError:
            raise
        except (ValueError, EOFError, KeyError) as e:
            raise InvalidFileError(path, f"not a readable PyTorch checkpoint ({e})") from e


def _check(module: str, name: str, path: str) -> None:
    if not _allowed(module, name):
        raise UnsafePickleError(
            path, f"pickle imports {module}.{name}, which torch.load(weights_only=True) refuses; "
                  "mvc never runs pickled code")


def check_file(f, path: str) -> None:
    """Raise UnsafePickleError if *f* (open, at 0) holds a pickle that would import code.

    Files that are not torch checkpoints at all (or are damaged) are plain bytes to
    mvc: they are stored losslessly and never unpickled, so only danger is refused.
    """
    head = f.read(4)
    f.seek(0)
    try:
        if head.startswith(b"PK"):
            with zipfile.ZipFile(f) as zf:
                for info in zf.infolist():
                    if info.filename.endswith(".pkl") and info.file_size <= _MAX_PICKLE:
                        scan_pickle(io.BytesIO(zf.read(info)), path)
        elif head[:1] == b"\x80":
            # legacy format: magic, protocol, sys_info, object, storage keys, then raw storages
            scan_pickle(f, path, count=5)
    except UnsafePickleError:
        raise
    except (InvalidFileError, zipfile.BadZipFile, OSError, EOFError, ValueError):
        pass
    finally:
        f.seek(0)
