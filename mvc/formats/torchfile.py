"""Safety scan for PyTorch checkpoints (.pt, .pth, .bin, .ckpt) without unpickling.

A torch checkpoint is a pickle (inside a zip archive since torch 1.6). Pickles can
call any importable function, so we never run one: ``pickletools.genops`` walks the
opcodes and every global the pickle would import is checked against an allowlist
that mirrors what ``torch.load(weights_only=True)`` accepts for state dicts.
"""

from __future__ import annotations

import itertools
import pickletools
import re
import zipfile

from ..errors import InvalidFileError, UnsafePickleError

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

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


_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                      "SHORT_BINSTRING"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MARK = object()  # a MARK on the symbolic stack
_OTHER = object()  # any value that is not a string constant
_MAX_DEPTH = 1 << 20  # symbolic stack entries (a pickle deeper than this is refused as damaged)


class _Damaged(Exception):
    pass


def _run(stream, path: str) -> bool:
    """Walk one pickle symbolically: a stack of what each opcode leaves (string constants kept,
    everything else a marker) and the memo, so STACK_GLOBAL sees exactly the module and name the
    unpickler would import, wherever they came from (pushed, memoized, fetched back). Every
    import is checked; nothing is executed. False at the end of the stream (no pickle)."""
    stack: list = []
    memo: dict[int, object] = {}
    ops = pickletools.genops(stream)
    try:
        first = next(ops, None)
        if first is None:
            return False
        for op, arg, _pos in itertools.chain([first], ops):
            name = op.name
            if name in _STRINGS:
                stack.append(arg if isinstance(arg, str) else _OTHER)
            elif name in ("GLOBAL", "INST"):
                module, _, attr = arg.partition(" ")
                _check(module, attr, path)
                if name == "INST":
                    _pop_mark(stack)
                stack.append(_OTHER)
            elif name == "STACK_GLOBAL":
                if len(stack) < 2:
                    raise _Damaged("STACK_GLOBAL on a short stack")
                attr, module = stack.pop(), stack.pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise UnsafePickleError(path, "pickle imports a global whose name it computes; "
                                                  "mvc never runs pickled code")
                _check(module, attr, path)
                stack.append(_OTHER)
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise UnsafePickleError(path, "pickle imports through the copyreg extension registry, which "
                                              "torch.load(weights_only=True) refuses")
            elif name in _PUTS or name == "MEMOIZE":
                if not stack or stack[-1] is _MARK:
                    raise _Damaged("memoizing nothing")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in _GETS:
                if arg not in memo:
                    raise _Damaged(f"memo key {arg} was never stored")
                stack.append(memo[arg])
            elif name == "DUP":
                if not stack:
                    raise _Damaged("DUP on an empty stack")
                stack.append(stack[-1])
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "POP" and stack and stack[-1] is _MARK:
                stack.pop()
            elif name == "STOP":
                if len(stack) != 1:
                    raise _Damaged("STOP with other than one value on the stack")
                return True
            else:  # the generic stack effect pickletools documents for the opcode
                before = op.stack_before
                if pickletools.markobject in before:
                    _pop_mark(stack)
                    before = before[:before.index(pickletools.markobject)]
                if len(stack) < len(before) or any(x is _MARK for x in stack[len(stack) - len(before):]):
                    raise _Damaged(f"{name} on a short stack")
                del stack[len(stack) - len(before):]
                stack.extend(_OTHER for _ in op.stack_after)
            if len(stack) > _MAX_DEPTH:
                raise _Damaged("stack too deep")
        raise _Damaged("no STOP")
    except UnsafePickleError:
        raise
    except (_Damaged, ValueError, EOFError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise InvalidFileError(path, f"not a readable pickle ({e})") from e


def _pop_mark(stack: list) -> None:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            del stack[i:]
            return
    raise _Damaged("no MARK to pop to")


def scan_pickle(stream, path: str, count: int = 1) -> None:
    """Check up to *count* consecutive pickles read from a binary stream."""
    for _ in range(count):
        if not _run(stream, path):
            return


def _check(module: str, name: str, path: str) -> None:
    if not _allowed(module, name):
        raise UnsafePickleError(
            path, f"pickle imports {module}.{name}, which torch.load(weights_only=True) refuses; "
                  "mvc never runs pickled code")


def check_file(f, path: str) -> None:
    """Raise UnsafePickleError if *f* (open, at 0) holds a pickle that would import code, or
    InvalidFileError for a torch zip whose pickles cannot all be read.

    A zip (torch >= 1.6) has every ``*.pkl`` member scanned, streamed, whatever its size; a member
    that cannot be read (damaged, or compressed with a method Python lacks) is refused, since
    it could not be checked. Anything else is scanned as legacy pickles, any protocol, 0 included:
    bytes that are not a pickle at all are plain bytes to mvc (stored losslessly, never
    unpickled), so only a pickle that would import what torch refuses stops a commit.
    """
    head = f.read(4)
    f.seek(0)
    try:
        if head.startswith(b"PK"):
            _check_zip(f, path)
        else:
            try:
                # legacy format: magic, protocol, sys_info, object, storage keys, then raw storages
                scan_pickle(f, path, count=5)
            except UnsafePickleError:
                raise
            except InvalidFileError:
                pass  # not (or no longer) a pickle: raw storage bytes, or not a checkpoint at all
    finally:
        f.seek(0)


_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")


def _check_zip(f, path: str) -> None:
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        f.seek(0)
        if f.read(4) in _ZIP_SIGNATURES or isinstance(e, NotImplementedError):
            # a zip this Python cannot list (damaged, or a newer zip version) could still be one
            # that torch's own reader opens: its pickles cannot be checked, so it is refused
            raise InvalidFileError(path, f"it looks like a torch zip but cannot be read ({e}), so it "
                                         "cannot be checked for code; mvc refuses it") from e
        return  # starts with "PK" but is no zip: plain bytes
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".pkl"):
                continue
            try:
                with zf.open(info) as member:
                    scan_pickle(member, path)
            except (UnsafePickleError, InvalidFileError):
                raise
            except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError, ValueError, RuntimeError) as e:
                raise InvalidFileError(path, f"zip member {info.filename} cannot be read ({e}), so it cannot "
                                             "be checked for code; mvc refuses it") from e
