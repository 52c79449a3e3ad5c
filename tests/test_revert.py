"""revert and cherry-pick: tensor by tensor, element-level when a later commit touched the same tensor."""

import numpy as np
import pytest

from mvc import Repo
from tests.helpers import mvc, mvc_proc, write_f32

N = 5000


def save(root, tensors):
    write_f32(root / "m.safetensors", tensors)


@pytest.fixture
def five(tmp_path):
    """Five commits; each of 1..4 changes one tensor (commit 3 changes 'b')."""
    rng = np.random.default_rng(11)
    root = tmp_path / "w"
    repo = Repo.init(root)
    state = {k: rng.standard_normal(N).astype("<f4") for k in "abcd"}
    snaps, ids = [], []
    for i, k in enumerate([None, "a", "b", "c", "d"]):
        if k:
            state = dict(state, **{k: state[k] + rng.standard_normal(N).astype("<f4")})
        save(root, state)
        ids.append(repo.commit(f"c{i}"))
        snaps.append(state)
    return repo, root, snaps, ids


def tensors(repo, rev="HEAD"):
    return {k: v.numpy() for k, v in repo.load(rev).items()}


def test_revert_middle_commit_restores_exactly_its_tensors(five):
    repo, root, snaps, ids = five
    out = mvc("revert", ids[2], cwd=root).output
    assert 'Revert "c2"' in out
    got = tensors(repo)
    assert np.array_equal(got["b"], snaps[1]["b"])  # undone, bit-exact
    for k in "acd":
        assert np.array_equal(got[k], snaps[4][k])  # untouched
    head = repo.commit_obj(repo.resolve("HEAD"))
    assert head.parents == (ids[4],) and head.op == {"op": "revert", "of": ids[2], "strategy": "three-way"}
    assert repo.status().clean


def test_cherry_pick(five):
    repo, root, snaps, ids = five
    repo.create_branch("old", ids[1])
    repo.switch("old")
    mvc("cherry-pick", ids[3], cwd=root)
    got = tensors(repo)
    assert np.array_equal(got["c"], snaps[3]["c"]) and np.array_equal(got["b"], snaps[1]["b"])
    assert "cherry picked from commit" in repo.commit_obj(repo.resolve("HEAD")).message


def test_revert_with_a_later_change_merges_elements(five):
    repo, root, snaps, ids = five
    # a later commit changes other elements of 'b'
    b = snaps[4]["b"].copy()
    b[:10] = 42.0
    save(root, dict(snaps[4], b=b))
    repo.commit("touch b again")
    # c2 changed every element of b; the later commit changed the first 10 again: those conflict
    res = mvc("revert", ids[2], cwd=root, ok=False)
    assert res.exit_code == 1 and "CONFLICT m.safetensors:b" in res.output and "10 elements" in res.output
    mvc("checkout", "--theirs", "--", "m.safetensors:b", cwd=root)
    mvc("revert", "--continue", cwd=root)
    got = tensors(repo)["b"]
    assert np.array_equal(got, snaps[1]["b"])
    assert len(repo.commit_obj(repo.resolve("HEAD")).parents) == 1


def test_revert_refuses_dirty_tree(five):
    repo, root, snaps, ids = five
    save(root, dict(snaps[4], a=snaps[4]["a"] * 0))
    res = mvc_proc("revert", ids[2], cwd=root)
    assert res.returncode != 0 and "uncommitted changes" in res.stderr
    assert repo.resolve("HEAD") == ids[4]


def test_revert_leaves_untracked_files_alone(five):
    repo, root, snaps, ids = five
    (root / "notes.csv").write_text("kind,score\n")
    mvc_proc("revert", ids[4], cwd=root, check=True)
    assert (root / "notes.csv").read_text() == "kind,score\n"
    assert "notes.csv" not in repo.odb.get(repo.commit_obj(repo.resolve("HEAD")).tree, "tree").as_dict()
    assert np.array_equal(tensors(repo)["a"], snaps[3]["a"])


@pytest.mark.parametrize("where", ["switch_tree", "record"])
def test_a_revert_killed_halfway_is_finished_by_running_it_again(five, monkeypatch, where):
    """As for a merge: the state is saved before the work tree is written, so running the same
    revert again after a kill finishes it instead of refusing the files it had written."""
    from mvc.merge.session import pick, state

    repo, root, snaps, ids = five

    class Killed(BaseException):
        pass

    real = getattr(type(repo), where)

    def dies(self, *a, **k):
        if where == "switch_tree":
            real(self, *a, **k)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(type(repo), where, dies)
        with pytest.raises(Killed):
            pick(repo, ids[2], "revert")
    assert repo.refs.head_commit() == ids[4] and state(repo)["tree"]
    out = pick(repo, ids[2], "revert")
    assert out.kind == "merged" and repo.commit_obj(out.commit).parents == (ids[4],)
    assert state(repo) is None and repo.status().clean
    assert np.array_equal(tensors(repo)["b"], snaps[1]["b"])
