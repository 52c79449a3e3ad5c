"""Canonical encodings are pinned by golden bytes; parsing rejects malformed or unsafe objects."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvc.errors import CorruptObjectError, UnsafePathError
from mvc.store.ids import hash_object
from mvc.store.objects import DTYPES, Commit, File, Tensor, Tree, TreeEntry, canonical_json, encode_object, parse_object

A = "a" * 64
B = "b" * 64


def test_tensor_golden():
    t = Tensor("BF16", (2, 3), 4194304, (A,))
    assert encode_object(t) == (b'{"chunk_size":4194304,"chunks":["' + A.encode() + b'"],"dtype":"BF16","shape":[2,3]}')
    assert hash_object("tensor", encode_object(t)).hex() == \
        "3aef46fdd77932b83f3dd256b6a0c550a5ce22d9d779ef9ab3fc02d6a150ee25"


def test_id_header_separates_types():
    assert hash_object("chunk", b"x") != hash_object("file", b"x")
    # the id of an empty chunk is BLAKE3(b"chunk 0\0"), independent of how it is stored
    assert hash_object("chunk", b"").hex() == "b39b8e3568de70851cc961adf743299727ab202413830585fa608ae872d1d5fe"


def test_file_tree_commit_golden():
    f = File("safetensors", 10, (A,), (("w", B),))
    assert encode_object(f) == (b'{"chunks":["' + A.encode() + b'"],"format":"safetensors","size":10,'
                                b'"tensors":[["w","' + B.encode() + b'"]]}')
    t = Tree.build({"b.json": (0o100644, A), "a/x.safetensors": (0o100755, B)})
    assert [e.path for e in t.entries] == ["a/x.safetensors", "b.json"]
    assert encode_object(t) == (b'{"entries":[["a/x.safetensors",33261,"' + B.encode() + b'"],'
                                b'["b.json",33188,"' + A.encode() + b'"]]}')
    c = Commit(A, (B,), "T <t@x>", 1700000000, 60, "msg\n", {"op": "prune", "params": {"sparsity": 0.5}})
    assert encode_object(c) == (b'{"author":"T <t@x>","message":"msg\\n","op":{"op":"prune","params":'
                                b'{"sparsity":0.5}},"parents":["' + B.encode() + b'"],"time":1700000000,'
                                b'"tree":"' + A.encode() + b'","tz":60}')
    for obj in (f, t, c):
        assert parse_object(obj.kind, encode_object(obj)) == obj
    odd = File("safetensors", 10, (A,), (('é"\\', A), ("w", B)))  # the pairs written from tuples
    assert encode_object(odd) == canonical_json(odd.to_json())


def test_tensor_chunk_count_checked():
    with pytest.raises(CorruptObjectError):
        parse_object("tensor", b'{"chunk_size":4,"chunks":[],"dtype":"F32","shape":[4]}')


@pytest.mark.parametrize("path", ["../x", "/abs", "a/../../x", ".mvc/config.json", ".MVC/x", "a/.Git/hooks/x",
                                  ".git", "a//b", "a/./b", "", "a\\b", "nul\x00"])
def test_unsafe_paths_rejected(path):
    with pytest.raises(UnsafePathError):
        Tree.build({path: (0o100644, A)})
    raw = b'{"entries":[[' + repr(path).replace("'", '"').encode() + b',33188,"' + A.encode() + b'"]]}'
    with pytest.raises((UnsafePathError, CorruptObjectError)):
        parse_object("tree", raw)


def test_file_and_directory_clash_rejected():
    with pytest.raises(UnsafePathError):
        Tree.build({"a": (0o100644, A), "a/b": (0o100644, B)})


def test_tree_must_be_sorted():
    raw = (b'{"entries":[["b",33188,"' + A.encode() + b'"],["a",33188,"' + A.encode() + b'"]]}')
    with pytest.raises(CorruptObjectError):
        parse_object("tree", raw)


def test_tree_entry_lookup():
    t = Tree.build({"x": (0o100644, A)})
    assert t.as_dict() == {"x": TreeEntry("x", 0o100644, A)}


_DTYPE_NAMES = sorted(DTYPES)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_DTYPE_NAMES), st.lists(st.integers(0, 2**20), max_size=4),
       st.integers(1, 2**40), st.randoms(use_true_random=False))
def test_tensor_fast_paths_agree_with_json(dtype, shape, chunk_size, rnd):
    """The tensor encoder and parser without the json module give the canonical bytes and the
    same object as the general path, for every valid tensor."""
    import json

    from mvc.store.objects import canonical_json, nbytes_of

    n = -(-nbytes_of(dtype, tuple(shape)) // chunk_size)
    if n > 50:
        return
    t = Tensor(dtype, tuple(shape), chunk_size, tuple(f"{rnd.getrandbits(256):064x}" for _ in range(n)))
    content = encode_object(t)
    assert content == canonical_json(t.to_json())
    assert parse_object("tensor", content) == t == Tensor.from_json(json.loads(content))


@pytest.mark.parametrize("content", [
    b'{"chunk_size":04,"chunks":[],"dtype":"F32","shape":[0]}',  # leading zero
    b'{"chunk_size":4,"chunks":[],"dtype":"F32","shape":[0],"x":1}',  # unknown key
    b'{"chunk_size":4,"chunks":[],"dtype":"F32","shape":[ 0]}',  # whitespace
    b'{"chunk_size":4,"chunks":[],"dtype":"F33","shape":[0]}',  # unknown dtype
    b'{"chunk_size":4,"chunks":[],"dtype":"F32","shape":[1]}',  # chunk count
    b'{"chunk_size":4,"chunks":["' + b"A" * 64 + b'"],"dtype":"F32","shape":[1]}',  # upper-case id
])
def test_non_canonical_tensors_refused(content):
    with pytest.raises(CorruptObjectError):
        parse_object("tensor", content)


@pytest.mark.parametrize("tensors", [[["w", "x" * 64]], [[3, A]], [["w", A, B]], "ab"])
def test_bad_tensor_lists_refused(tensors):
    import json

    content = json.dumps({"chunks": [], "format": "safetensors", "size": 0, "tensors": tensors},
                         sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(CorruptObjectError):
        parse_object("file", content)


@pytest.mark.parametrize("n", [0, 1, 80, 4095, 4096, 4097, 100_000])
@pytest.mark.parametrize("kind", ["chunk", "tensor"])
def test_id_is_blake3_of_header_and_content_at_every_size(kind, n):
    import blake3

    content = bytes(range(256)) * (n // 256) + bytes(n % 256)
    want = blake3.blake3(f"{kind} {n}\0".encode() + content).digest()
    assert hash_object(kind, content) == want
    assert hash_object(kind, memoryview(content)) == want and hash_object(kind, bytearray(content)) == want


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_DTYPE_NAMES), st.lists(st.integers(0, 64), min_size=0, max_size=3),
       st.randoms(use_true_random=False))
def test_tiny_tensor_json_is_the_tensor_object(dtype, shape, rnd):
    from mvc.pipeline import CHUNK_SIZE, tiny_tensor_json

    chunk = f"{rnd.getrandbits(256):064x}"
    want = encode_object(Tensor(dtype, tuple(shape), CHUNK_SIZE, (chunk,)))
    assert tiny_tensor_json(chunk, dtype, tuple(shape)) == want
