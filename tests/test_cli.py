"""The everyday commands, through the CLI."""

import json
import os
import time
from pathlib import Path

import pytest

from mvc import Repo
from tests.helpers import bf16, mvc, mvc_cmd, mvc_proc, write_safetensors


@pytest.fixture
def hist(tmp_path, rng):
    """A repository with three commits on main."""
    root = tmp_path / "w"
    mvc("init", root)
    ids = []
    for i in range(3):
        write_safetensors(root / "m.safetensors", {"a": ("BF16", (32, 32), bf16(rng, (32, 32))),
                                                   "b": ("BF16", (8,), bf16(rng, (8,)))})
        (root / "config.json").write_text(json.dumps({"step": i}))
        mvc("commit", "-m", f"step {i}", cwd=root)
        ids.append(mvc("rev-parse", "HEAD", cwd=root).output.strip())
    return root, ids


def test_log_forms(hist):
    root, ids = hist
    out = mvc("log", "--oneline", cwd=root).output.splitlines()
    assert [line.split()[0] for line in out] == [i[:12] for i in reversed(ids)]
    assert "HEAD -> main" in out[0]
    assert len(mvc("log", "-n", "2", "--oneline", cwd=root).output.splitlines()) == 2
    data = json.loads(mvc("log", "--json", cwd=root).output)
    assert [d["id"] for d in data] == list(reversed(ids))
    assert data[0]["parents"] == [ids[1]] and data[0]["message"] == "step 2\n"
    full = mvc("log", cwd=root).output
    assert f"commit {ids[2]}" in full and "Author: Test <test@example.com>" in full


def test_rev_parse_forms(hist):
    root, ids = hist
    mvc("tag", "v1", ids[0], cwd=root)

    def rp(rev):
        return mvc("rev-parse", rev, cwd=root).output.strip()

    assert rp("HEAD") == rp("@") == rp("main") == rp("refs/heads/main") == ids[2]
    assert rp("HEAD~2") == rp("main^^") == rp("HEAD~1^") == rp("v1") == ids[0]
    assert rp("HEAD^0") == ids[2]
    assert rp(ids[1][:8]) == ids[1]
    assert mvc("rev-parse", "--short", "HEAD", cwd=root).output.strip() == ids[2][:12]


def test_show_and_diff(hist):
    root, ids = hist
    out = mvc("show", "--stat", "HEAD", cwd=root).output  # git show --stat: a line per tensor or file
    assert "step 2" in out and "m.safetensors:a" in out and "config.json" in out and "added to the store" in out
    full = mvc("show", "HEAD", cwd=root).output  # git show: each change in full, here its statistics
    assert "step 2" in full and "m.safetensors:a" not in full and "added to the store" in full
    assert "modified m.safetensors" in full and "cosine" in full
    data = json.loads(mvc("show", "--json", ids[0], cwd=root).output)
    assert {c["path"] for c in data["changes"]} == {"m.safetensors", "config.json"}
    assert all(c["status"] == "added" for c in data["changes"])
    names = mvc("diff", "--name-only", "HEAD~1", "HEAD", cwd=root).output.split()
    assert names == ["config.json", "m.safetensors:a", "m.safetensors:b"]
    assert mvc("diff", "--stat", cwd=root).output == ""
    (root / "config.json").write_text("{}")
    assert mvc("diff", "--name-only", cwd=root).output.split() == ["config.json"]
    assert mvc("diff", "--name-only", "HEAD~2", "HEAD", "--", "config.json", cwd=root).output.split() == ["config.json"]


def test_branch_switch_tag_reset(hist, rng):
    root, ids = hist
    mvc("switch", "-c", "exp", cwd=root)
    write_safetensors(root / "m.safetensors", {"a": ("BF16", (32, 32), bf16(rng, (32, 32)))})
    mvc("commit", "-m", "on exp", cwd=root)
    exp_head = mvc("rev-parse", "HEAD", cwd=root).output.strip()
    branches = json.loads(mvc("branch", "--json", cwd=root).output)
    assert branches["current"] == "exp" and set(branches["branches"]) == {"main", "exp"}
    mvc("switch", "main", cwd=root)
    assert mvc("rev-parse", "HEAD", cwd=root).output.strip() == ids[2]
    res = mvc("branch", "-d", "exp", cwd=root, ok=False)
    assert res.exit_code == 1 and "not merged" in res.output
    mvc("branch", "-D", "exp", cwd=root)
    mvc("branch", "old", ids[0], cwd=root)
    assert json.loads(mvc("branch", "--json", cwd=root).output)["branches"]["old"] == ids[0]
    mvc("tag", "keep", exp_head, cwd=root)
    assert mvc("tag", cwd=root).output.split() == ["keep"]
    mvc("reset", "--hard", "HEAD~1", cwd=root)
    assert mvc("rev-parse", "main", cwd=root).output.strip() == ids[1]
    assert json.loads((root / "config.json").read_text()) == {"step": 1}
    mvc("reset", ids[2], cwd=root)  # soft: branch moves, work tree stays
    assert mvc("status", "--short", cwd=root).output.split() == ["M", "config.json", "M", "m.safetensors"]
    mvc("tag", "-d", "keep", cwd=root)
    assert mvc("tag", cwd=root).output == ""
    # the dropped branch's commit is still kept by the reflog, so gc keeps it
    assert json.loads(mvc("gc", "--json", cwd=root).output)["removed"] == 0


def test_detached_checkout_and_back(hist):
    root, ids = hist
    mvc("checkout", ids[0], cwd=root)
    assert json.loads(mvc("status", "--json", cwd=root).output)["branch"] is None
    assert json.loads((root / "config.json").read_text()) == {"step": 0}
    mvc("checkout", "main", cwd=root)
    assert json.loads(mvc("status", "--json", cwd=root).output)["branch"] == "main"
    mvc("checkout", "HEAD", cwd=root)
    assert json.loads(mvc("status", "--json", cwd=root).output)["branch"] == "main"


def test_ls_tree_and_cat_object(hist):
    root, _ = hist
    rows = json.loads(mvc("ls-tree", "--tensors", "--json", cwd=root).output)
    assert [r["path"] for r in rows] == ["config.json", "m.safetensors"]
    st = rows[1]
    assert st["format"] == "safetensors" and [t["name"] for t in st["tensors"]] == ["a", "b"]
    assert st["tensors"][0]["dtype"] == "BF16" and st["tensors"][0]["shape"] == [32, 32]
    assert mvc("cat-object", "-t", st["id"], cwd=root).output.strip() == "file"
    tensor = json.loads(mvc("cat-object", st["tensors"][0]["id"][:10], cwd=root).output)
    assert tensor["dtype"] == "BF16" and len(tensor["chunks"]) == 1
    size, stored, encoding = mvc("cat-object", "-s", tensor["chunks"][0], cwd=root).output.split()
    assert int(size) == 32 * 32 * 2 and 0 < int(stored) <= int(size) + 64 and encoding == "planes"
    raw = json.loads(mvc("cat-object", rows[0]["id"], cwd=root).output)
    chunk = mvc("cat-object", raw["chunks"][0], cwd=root).output
    assert json.loads(chunk) == json.loads((root / "config.json").read_text())


def test_commit_paths_and_ignore(tmp_path, rng):
    root = tmp_path / "w"
    mvc("init", root)
    (root / ".mvcignore").write_text("*.log\ncache/\n")
    (root / "a.txt").write_text("a")
    (root / "b.txt").write_text("b")
    (root / "x.log").write_text("log")
    (root / "cache").mkdir()
    (root / "cache" / "c").write_text("c")
    mvc("commit", "-m", "only a", "a.txt", cwd=root)
    assert [r["path"] for r in json.loads(mvc("ls-tree", "--json", cwd=root).output)] == ["a.txt"]
    st = json.loads(mvc("status", "--json", cwd=root).output)
    assert st["added"] == [".mvcignore", "b.txt"]
    mvc("commit", "-m", "rest", cwd=root)
    paths = [r["path"] for r in json.loads(mvc("ls-tree", "--json", cwd=root).output)]
    assert paths == [".mvcignore", "a.txt", "b.txt"]
    os.remove(root / "b.txt")
    (root / "a.txt").write_text("a2")
    mvc("commit", "-m", "drop b", "b.txt", cwd=root)
    paths = [r["path"] for r in json.loads(mvc("ls-tree", "--json", cwd=root).output)]
    assert paths == [".mvcignore", "a.txt"]
    assert json.loads(mvc("status", "--json", cwd=root).output)["modified"] == ["a.txt"]


def test_subdirectory_and_C(hist):
    root, ids = hist
    sub = root / "sub"
    sub.mkdir()
    (sub / "f").write_text("x")
    old = os.getcwd()
    os.chdir(sub)
    try:
        assert mvc("rev-parse", "HEAD").output.strip() == ids[2]
        mvc("commit", "-m", "from sub", "f")
    finally:
        os.chdir(old)
    with Repo(root) as r:
        assert "sub/f" in r.tree_of("HEAD").as_dict()


def test_commit_json_and_author(hist, rng):
    root, _ = hist
    (root / "n.txt").write_text("n")
    out = json.loads(mvc("commit", "-m", "j", "--author", "A B <a@b>", "--json", cwd=root).output)
    assert out["objects_added"] >= 3 and out["stored_bytes_added"] > 0
    assert json.loads(mvc("log", "-n", "1", "--json", cwd=root).output)[0]["author"] == "A B <a@b>"


@pytest.mark.parametrize("git_on_path", [True, False])
def test_the_author_comes_from_gits_global_config(hist, tmp_path, git_on_path):
    """With no MVC_AUTHOR or GIT_AUTHOR_* set, the author is user.name and user.email of Git's
    global configuration, asked of the git command, or read by pygit2 where git is not installed."""
    import subprocess

    root, _ = hist
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = Ada Lovelace\n\temail = ada@example.com\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MVC_AUTHOR", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL",
                                                             "XDG_CONFIG_HOME", "GIT_CONFIG_GLOBAL")}
    env["HOME"] = str(home)
    if not git_on_path:  # a PATH without git on it (the command is named by its full path)
        env["PATH"] = str(tmp_path / "no-git")
    (root / "n.txt").write_text("n")
    subprocess.run(mvc_cmd() + ["-q", "commit", "-m", "a"], cwd=root, env=env, check=True)
    assert json.loads(mvc_proc("log", "-n", "1", "--json", cwd=root).stdout)[0]["author"] == \
        "Ada Lovelace <ada@example.com>"


def test_fsck_and_gc(hist):
    root, ids = hist
    assert json.loads(mvc("fsck", "--json", cwd=root).output)["ok"] is True
    with Repo(root) as r:
        r.odb.put_chunk(b"orphan bytes that nothing names")
    rep = json.loads(mvc("gc", "--dry-run", "--json", cwd=root).output)
    assert rep["removed"] == 1
    rep = json.loads(mvc("gc", "--json", cwd=root).output)
    assert rep["removed"] == 1
    assert json.loads(mvc("gc", "--json", cwd=root).output)["removed"] == 0
    assert json.loads(mvc("fsck", "--json", cwd=root).output)["ok"] is True


def test_doctor(hist):
    root, _ = hist
    res = mvc("doctor", "--json", cwd=root, ok=False)
    checks = {c["name"]: c for c in json.loads(res.output)}
    assert checks["python"]["status"] == "ok"
    assert checks["lmdb"]["status"] == "ok" and checks["git"]["status"] == "ok"
    assert checks["connectivity"]["status"] == "ok"
    assert checks["repository"]["detail"].startswith(str(Path(root).resolve()))


def test_progress_quiet_when_piped(hist, rng):
    root, _ = hist
    write_safetensors(root / "m.safetensors", {"a": ("BF16", (512, 512), bf16(rng, (512, 512)))})
    res = mvc("commit", "-m", "big", cwd=root)
    assert "%" not in res.output and "it/s" not in res.output


def test_status_in_new_repo(tmp_path):
    root = tmp_path / "w"
    mvc("init", root)
    out = mvc("status", cwd=root).output
    assert "No commits yet" in out and "nothing to commit" in out
    assert mvc("log", cwd=root).output == ""
    time.sleep(0)


def test_log_graph_with_a_merge(hist, rng):
    """A merge commit (made through the object API until `mvc merge` exists) draws two lines of descent."""
    from mvc.store.objects import Commit

    root, ids = hist
    mvc("switch", "-c", "side", ids[0], cwd=root)
    (root / "side.txt").write_text("side")
    mvc("commit", "-m", "on side", cwd=root)
    mvc("switch", "main", cwd=root)
    with Repo(root) as r:
        side = r.refs.get("refs/heads/side")
        head = r.refs.head_commit()
        m = r.odb.put(Commit(r.commit_obj(head).tree, (head, side), "T <t@x>", int(time.time()) + 5, 0, "merge\n"))
        r.refs.move_head(m, head, "merge")
    lines = mvc("log", "--graph", cwd=root).output.splitlines()
    assert lines[0].startswith("* ") and "merge" in lines[0]
    assert lines[1].startswith("| \\")
    assert any(line.startswith("|/") for line in lines)
    commits = [line for line in lines if "*" in line]
    assert len(commits) == 5  # 3 on main, 1 on side, the merge
    assert commits[-1].startswith("* ") and "step 0" in commits[-1]
    # children before parents in plain log too
    order = [e["id"] for e in json.loads(mvc("log", "--json", cwd=root).output)]
    assert order[0] == m and order[-1] == ids[0]
