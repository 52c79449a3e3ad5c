"""Three-way merges: tensor-level, element-level, strategies against numpy, conflicts."""

import json

import numpy as np
import pytest

from mvc import Repo
from mvc.errors import DirtyWorkTreeError
from tests.helpers import mvc, mvc_proc, write_f32

N = 20_000


def save(root, tensors):
    write_f32(root / "m.safetensors", tensors, metadata={"format": "pt"})


def load(repo, rev="HEAD"):
    return {k: v.numpy() for k, v in repo.load(rev).items()}


@pytest.fixture
def forked(tmp_path):
    """main and side both start from a base with tensors a, b, c."""
    rng = np.random.default_rng(3)
    root = tmp_path / "w"
    repo = Repo.init(root)
    base = {k: rng.standard_normal(N).astype("<f4") for k in "abc"}
    save(root, base)
    repo.commit("base")
    repo.create_branch("side")
    return repo, root, base, rng


def edit(repo, root, branch, tensors, msg):
    repo.switch(branch)
    save(root, tensors)
    return repo.commit(msg)


def test_different_tensors_merge_cleanly(forked):
    repo, root, base, rng = forked
    ours = dict(base, a=base["a"] + 1)
    theirs = dict(base, b=base["b"] * 2)
    edit(repo, root, "side", theirs, "side edits b")
    o = edit(repo, root, "main", ours, "main edits a")
    out = mvc("merge", "side", cwd=root)
    assert "Merge made" in out.output
    got = load(repo)
    assert np.array_equal(got["a"], ours["a"]) and np.array_equal(got["b"], theirs["b"])
    assert np.array_equal(got["c"], base["c"])
    head = repo.commit_obj(repo.resolve("HEAD"))
    assert head.parents == (o, repo.resolve("side"))
    assert head.op["op"] == "merge" and head.op["strategy"] == "three-way"
    assert repo.status().clean


def test_disjoint_elements_merge_cleanly(forked):
    repo, root, base, rng = forked
    a_ours, a_theirs = base["a"].copy(), base["a"].copy()
    a_ours[:100] += 1
    a_theirs[-100:] -= 1
    edit(repo, root, "side", dict(base, a=a_theirs), "side")
    edit(repo, root, "main", dict(base, a=a_ours), "main")
    mvc("merge", "side", cwd=root)
    want = base["a"].copy()
    want[:100] += 1
    want[-100:] -= 1
    assert np.array_equal(load(repo)["a"], want)


def conflicting(forked):
    repo, root, base, rng = forked
    a_ours = base["a"] + rng.standard_normal(N).astype("<f4") * 0.1
    a_theirs = base["a"] + rng.standard_normal(N).astype("<f4") * 0.1
    a_ours[:10] = base["a"][:10]  # only theirs changed these
    edit(repo, root, "side", dict(base, a=a_theirs), "side")
    edit(repo, root, "main", dict(base, a=a_ours), "main")
    return repo, root, base, a_ours, a_theirs


def test_overlap_conflicts_then_average_is_exact_mean(forked):
    repo, root, base, a_ours, a_theirs = conflicting(forked)
    res = mvc("merge", "side", cwd=root, ok=False)
    assert res.exit_code == 1 and "CONFLICT m.safetensors:a" in res.output
    st = json.loads(mvc("status", "--json", cwd=root).output)
    assert [c["tensor"] for c in st["merge"]["conflicts"]] == ["a"]
    assert st["merge"]["conflicts"][0]["elements"] == N - 10
    mvc("merge", "--abort", cwd=root)
    assert np.array_equal(load(repo, "HEAD")["a"], a_ours) and repo.status().clean
    mvc("merge", "side", "--strategy", "average", cwd=root)
    got = load(repo)["a"]
    want = ((a_ours.astype(np.float64) + a_theirs.astype(np.float64)) / 2).astype(np.float32)
    want[:10] = a_theirs[:10]  # changed on one side only: taken as is
    assert np.array_equal(got, want)


def test_fedavg_weights_and_task_arithmetic(forked):
    repo, root, base, a_ours, a_theirs = conflicting(forked)
    mvc("merge", "side", "--strategy", "average", "--weights", "0.7,0.3", cwd=root)
    got = load(repo)["a"]
    o, t, b = (x.astype(np.float64) for x in (a_ours, a_theirs, base["a"]))
    want = ((0.7 * o + 0.3 * t) / 1.0).astype(np.float32)
    want[:10] = a_theirs[:10]
    assert np.array_equal(got, want)
    repo.reset("HEAD~1", hard=True)
    mvc("merge", "side", "--strategy", "task-arithmetic", cwd=root)
    want = (b + (o - b) + (t - b)).astype(np.float32)
    want[:10] = a_theirs[:10]
    assert np.array_equal(load(repo)["a"], want)
    op = repo.commit_obj(repo.resolve("HEAD")).op
    assert op["strategy"] == "task-arithmetic" and op["metrics"]["elements_resolved"] == N - 10


def test_resolve_one_tensor_and_continue(forked):
    repo, root, base, a_ours, a_theirs = conflicting(forked)
    mvc("merge", "side", cwd=root, ok=False)
    res = mvc("merge", "--continue", cwd=root, ok=False)
    assert res.exit_code == 1 and "conflict(s) left" in res.output
    mvc("checkout", "--theirs", "--", "m.safetensors:a", cwd=root)
    mvc("merge", "--continue", cwd=root)
    assert np.array_equal(load(repo)["a"], a_theirs)
    head = repo.commit_obj(repo.resolve("HEAD"))
    assert len(head.parents) == 2 and head.op["op"] == "merge"


def test_fast_forward_and_up_to_date(forked):
    repo, root, base, rng = forked
    s = edit(repo, root, "side", dict(base, c=base["c"] * 3), "side")
    repo.switch("main")
    assert "Fast-forward" in mvc("merge", "side", cwd=root).output
    assert repo.resolve("HEAD") == s and np.array_equal(load(repo)["c"], base["c"] * 3)
    assert "Already up to date" in mvc("merge", "side", cwd=root).output


def test_merge_refuses_dirty_tree_and_changes_nothing(forked):
    repo, root, base, rng = forked
    edit(repo, root, "side", dict(base, c=base["c"] * 3), "side")
    edit(repo, root, "main", dict(base, a=base["a"] * 3), "main")
    save(root, dict(base, b=base["b"] - 5))
    content = (root / "m.safetensors").read_bytes()
    head = repo.resolve("HEAD")
    res = mvc_proc("merge", "side", cwd=root)
    assert res.returncode != 0 and "uncommitted changes" in res.stderr and "Traceback" not in res.stderr
    assert (root / "m.safetensors").read_bytes() == content and repo.resolve("HEAD") == head
    from mvc.merge import session as mergeops

    with pytest.raises(DirtyWorkTreeError):
        mergeops.merge(repo, "side")


def test_shape_change_on_one_side_rebuilds_header(forked):
    repo, root, base, rng = forked
    theirs = dict(base, b=base["b"][: N // 2])  # side sheds half of b
    ours = dict(base, a=base["a"] + 1)
    edit(repo, root, "side", theirs, "shed b")
    edit(repo, root, "main", ours, "bump a")
    mvc("merge", "side", cwd=root)
    got = load(repo)
    assert got["b"].shape == (N // 2,) and np.array_equal(got["a"], ours["a"])
    from safetensors.numpy import load_file

    on_disk = load_file(root / "m.safetensors")
    assert on_disk["b"].shape == (N // 2,)
    assert mvc_proc("fsck", cwd=root).returncode == 0


def ties_reference(b, o, t, density):
    b, o, t = (x.astype(np.float64) for x in (b, o, t))
    n = b.size
    k = int(np.ceil(density * n))
    out = np.where(o != b, o, t)  # one side changed: take it
    to, tt = o - b, t - b
    thr_o, thr_t = np.sort(np.abs(to))[n - k], np.sort(np.abs(tt))[n - k]
    to = np.where(np.abs(to) >= thr_o, to, 0)
    tt = np.where(np.abs(tt) >= thr_t, tt, 0)
    sign = np.sign(to + tt)
    ko, kt = (np.sign(to) == sign) & (to != 0), (np.sign(tt) == sign) & (tt != 0)
    cnt = ko.astype(int) + kt
    mean = np.where(cnt > 0, (np.where(ko, to, 0) + np.where(kt, tt, 0)) / np.maximum(cnt, 1), 0)
    clash = (o != b) & (t != b) & (o != t)
    out[clash] = (b + mean)[clash]
    return out.astype(np.float32)


def test_ties_matches_numpy_reference(forked):
    repo, root, base, a_ours, a_theirs = conflicting(forked)
    mvc("merge", "side", "--strategy", "ties", "--density", "0.3", cwd=root)
    want = ties_reference(base["a"], a_ours, a_theirs, 0.3)
    assert np.array_equal(load(repo)["a"], want)
    op = repo.commit_obj(repo.resolve("HEAD")).op
    assert op["strategy"] == "ties" and op["params"]["density"] == 0.3


def test_kth_largest_is_exact():
    from mvc.merge.engine import kth_largest

    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_normal(50_000))
    x[:1000] = 0.25  # ties
    x[1000:1100] = 0.0
    for k in (1, 7, 1000, 25_000, 49_999, 50_000):
        want = np.sort(x)[x.size - k]
        assert kth_largest(lambda: iter(np.array_split(x, 7)), k) == want


def test_bf16_strategies_compute_in_float32_and_the_mean_equals_float64s(tmp_path):
    """bf16 conflicts: the mean with default weights is float64's mean rounded to bf16 (a sum of two
    bf16 values is exact in float32); weighted and TIES results follow docs/merge.md's float32 rule.
    Several chunks, so the workers' results come back in order."""
    import torch

    from tests.helpers import write_safetensors

    rng = np.random.default_rng(8)
    n = 5 << 20  # 10 MiB of bf16: three chunks

    def bf(x):
        u = x.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    def f32(b):
        return (b.astype(np.uint32) << 16).view(np.float32)

    base = bf(0.02 * rng.standard_normal(n, dtype=np.float32))
    ours = bf(f32(base) + 1e-3 * rng.standard_normal(n, dtype=np.float32))
    theirs = bf(f32(base) + 1e-3 * rng.standard_normal(n, dtype=np.float32))
    root = tmp_path / "w"
    repo = Repo.init(root)

    def put(x, msg):
        write_safetensors(root / "m.safetensors", {"w": ("BF16", (n,), x.tobytes())})
        return repo.commit(msg)

    put(base, "base")
    repo.create_branch("side")
    repo.switch("side")
    put(theirs, "theirs")
    repo.switch("main")
    put(ours, "ours")

    def merged(*args):
        mvc("merge", "side", *args, cwd=root)
        got = repo.load("HEAD")["w"].view(torch.int16).numpy().view("<u2")
        repo.reset("HEAD~1", hard=True)
        return got

    clash = (ours != base) & (theirs != base) & (ours != theirs)
    one = np.where(ours != base, ours, theirs)
    mean = merged("--strategy", "average")
    want = bf(((f32(ours).astype(np.float64) + f32(theirs)) / 2).astype(np.float32))
    assert clash.sum() > n // 2 and np.array_equal(mean, np.where(clash, want, one))
    weighted = merged("--strategy", "average", "--weights", "0.7,0.3")
    want = bf(np.float32(0.7) * f32(ours) + np.float32(0.3) * f32(theirs))
    assert np.array_equal(weighted, np.where(clash, want, one))
    ties = merged("--strategy", "ties")
    assert np.array_equal(ties[~clash], one[~clash]) and not np.array_equal(ties[clash], one[clash])


@pytest.mark.parametrize("where", ["switch_tree", "record"])
def test_a_merge_killed_halfway_is_finished_by_running_it_again(forked, monkeypatch, where):
    """Found by the kill campaign: a merge killed after it had written the merged files but before
    its commit left a tree that `mvc merge` refused as uncommitted changes. Its state is saved
    first now; gc keeps what it names; running the merge again finishes it."""
    from mvc.maintenance import gc
    from mvc.merge.session import merge, state

    repo, root, base, rng = forked
    theirs = dict(base, b=base["b"] * 2)
    side = edit(repo, root, "side", theirs, "side edits b")
    ours = edit(repo, root, "main", dict(base, a=base["a"] + 1), "main edits a")

    class Killed(BaseException):
        pass

    real = getattr(type(repo), where)

    def dies(self, *a, **k):
        if where == "switch_tree":
            real(self, *a, **k)  # the files are written, then the process dies
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(type(repo), where, dies)
        with pytest.raises(Killed):
            merge(repo, "side")
    assert repo.refs.head_commit() == ours and state(repo)["tree"]
    gc(repo)  # keeps the unfinished merge's objects
    out = merge(repo, "side")
    assert out.kind == "merged" and repo.commit_obj(out.commit).parents == (ours, side)
    assert state(repo) is None and repo.status().clean
    got = load(repo)
    assert np.array_equal(got["b"], theirs["b"]) and np.array_equal(got["a"], base["a"] + 1)


def test_merged_chunks_are_checked_out_from_the_merges_scratch_file(forked):
    """A merge writes the chunks it computes to a scratch file per merged file (.mvc/tmp/
    merge-scratch.N), each where the merged file has it; its checkout writes the rest into that
    file, verifies the merged chunks there (a flipped byte is refused and nothing is written) and
    moves it into the work tree: byte for byte what checking the merge commit out writes. No
    scratch is left after; one that a killed merge left behind is dropped, not read."""
    import hashlib
    import os

    from mvc import pipeline
    from mvc.errors import MvcError
    from mvc.merge.engine import Merger, merge_bases
    from mvc.progress import NULL
    from mvc.store.ids import hash_object
    from mvc.store.objects import Tree

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    repo, root, base, a_ours, a_theirs = conflicting(forked)
    ours_sha = sha(root / "m.safetensors")
    probe = root / ".mvc" / "probe"
    side, head = repo.resolve("side"), repo.refs.head_commit()
    base_tree = repo.odb.get(repo.commit_obj(merge_bases(repo, head, side)[0]).tree, "tree")

    def merged():
        return Merger(repo, "average", scratch=str(probe)).merge_trees(
            base_tree, repo.head_tree(), repo.odb.get(repo.commit_obj(side).tree, "tree"))

    res = merged()
    assert res.locations and not res.conflicts and res.prepared == {"m.safetensors": f"{probe}.0"}
    for cid, (path, offset, n) in res.locations.items():
        assert path == f"{probe}.0"
        with open(path, "rb") as f:
            f.seek(offset)
            assert hash_object("chunk", f.read(n)).hex() == cid
    damaged = bytearray(open(f"{probe}.0", "rb").read())
    _, at, n = next(iter(res.locations.values()))
    damaged[at + n // 2] ^= 1
    open(f"{probe}.0", "wb").write(bytes(damaged))
    with pytest.raises(MvcError):
        repo.switch_tree(Tree.build(res.entries), False, NULL, res.locations, res.prepared)
    assert sha(root / "m.safetensors") == ours_sha  # nothing written from the damaged scratch
    os.remove(f"{probe}.0")

    res = merged()
    tree = Tree.build(res.entries)
    copied = []
    real = pipeline._read_located
    pipeline._read_located = lambda *a: copied.append(a) or real(*a)
    try:
        repo.switch_tree(tree, False, NULL, res.locations, res.prepared)
    finally:
        pipeline._read_located = real
    assert not copied  # every merged chunk was at its place: verified there, not copied
    assert not os.path.exists(f"{probe}.0")  # moved into the work tree
    in_place = sha(root / "m.safetensors")
    os.remove(root / "m.safetensors")
    repo.switch_tree(tree, True, NULL)  # the same tree decoded from the store
    assert sha(root / "m.safetensors") == in_place
    repo.switch_tree(repo.head_tree(), True, NULL)
    assert sha(root / "m.safetensors") == ours_sha

    scratch = root / ".mvc" / "tmp" / "merge-scratch"
    scratch.parent.mkdir(exist_ok=True)
    for left in (scratch, scratch.with_name("merge-scratch.3")):
        left.write_bytes(b"left by a killed merge" * 1000)
    mvc("merge", "side", "--strategy", "average", cwd=root)
    assert not scratch.exists() and not scratch.with_name("merge-scratch.3").exists()
    assert os.listdir(scratch.parent) == []
    merged = sha(root / "m.safetensors")
    os.remove(root / "m.safetensors")
    mvc("checkout", "-f", "HEAD", cwd=root)
    assert sha(root / "m.safetensors") == merged
