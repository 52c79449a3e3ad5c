"""Models travel with `git push` and `git clone` (issue 15): the real git binary, a bare Git
repository as origin, and the paired mvc remote on a real S3-compatible server (moto on
127.0.0.1) or in a file:// directory. Bytes are counted at the server."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from mvc.hooks.git import mvcconfig
from mvc.hooks.git.pointer import parse
from mvc.hooks.git.transfer import parse_push_updates
from mvc.store.lmdb_backend import LmdbBackend
from tests.helpers import bf16, mvc_cmd, sha256, write_safetensors
from tests.remotes import CREDS, free_port

pytestmark = pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
                                reason="git is not installed")


class Paired:
    """The mvc remote under test: its URL, `remote add` arguments, and its bytes as stored."""

    def __init__(self, kind, tmp_path, request):
        self.kind = kind
        self.env = dict(os.environ, **CREDS)
        self.env.pop("MVC_SKIP_SMUDGE", None)
        if kind == "file":
            self.url, self.args, self.endpoint = f"file://{tmp_path / 'mvc-remote'}", [], None
        else:
            import boto3

            self.endpoint = request.getfixturevalue("s3_server")
            self.bucket = "git-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
            boto3.client("s3", endpoint_url=self.endpoint, **_creds()).create_bucket(Bucket=self.bucket)
            self.url, self.args = f"s3://{self.bucket}/team/models", ["--endpoint-url", self.endpoint]

    def stored_bytes(self) -> int:
        """Every byte the remote holds, counted where it is kept."""
        if self.kind == "file":
            root = self.url[len("file://"):]
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, **_creds())
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="team/models/")
        return sum(o["Size"] for page in pages for o in page.get("Contents", []))


def _creds():
    return {"aws_access_key_id": CREDS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": CREDS["AWS_SECRET_ACCESS_KEY"],
            "region_name": CREDS["AWS_DEFAULT_REGION"]}


@pytest.fixture(params=["s3", "file"])
def paired(request, tmp_path):
    return Paired(request.param, tmp_path, request)


def run(cwd, *args, env=None, check=True, tool="git", stdin=None):
    argv = (["git"] if tool == "git" else mvc_cmd()) + [str(a) for a in args]
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, input=stdin)
    if check and res.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(map(str, args))}: {res.stderr}")
    return res


def mvc(cwd, *args, **kw):
    return run(cwd, *args, tool="mvc", **kw)


def new_git(path, env):
    path.mkdir()
    run(path, "init", "-q", "-b", "main", env=env)
    run(path, "config", "user.email", "t@example.com", env=env)
    run(path, "config", "user.name", "T", env=env)


def team_repo(tmp_path, paired, rng, n=4, side=1024):
    """Repository A: mvc installed, a model committed, origin a bare repository, the mvc remote
    paired and .mvcconfig committed. Returns (A, bare, tensors)."""
    env = paired.env
    bare = tmp_path / "origin.git"
    run(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare), env=env)
    a = tmp_path / "a"
    new_git(a, env)
    mvc(a, "git", "install", env=env)
    mvc(a, "git", "track", "*.safetensors", env=env)
    run(a, "remote", "add", "origin", str(bare), env=env)
    out = mvc(a, "remote", "add", "origin", paired.url, *paired.args, env=env).stdout
    assert "paired" in out and ".mvcconfig" in out
    tensors = {f"layers.{i}.weight": ("BF16", (side, side), bf16(rng, (side, side))) for i in range(n)}
    write_safetensors(a / "model.safetensors", tensors)
    run(a, "add", ".gitattributes", ".mvcconfig", "model.safetensors", env=env)
    run(a, "commit", "-q", "-m", "base", env=env)
    return a, bare, tensors


def model_repo(tmp_path, rng, side: int, env) -> tuple:
    """Repository g: mvc installed, m.safetensors committed, no remote. Returns (g, its SHA-256)."""
    g = tmp_path / "g"
    new_git(g, env)
    mvc(g, "git", "install", env=env)
    mvc(g, "git", "track", "*.safetensors", env=env)
    write_safetensors(g / "m.safetensors", {"w": ("BF16", (side, side), bf16(rng, (side, side)))})
    run(g, "add", ".", env=env)
    run(g, "commit", "-q", "-m", "m", env=env)
    return g, sha256(g / "m.safetensors")


def store_bytes(gitrepo) -> int:
    b = LmdbBackend(str(gitrepo / ".git" / "mvc" / "store"), create=False)
    try:
        return b.stats()["stored_bytes"]
    finally:
        b.close()


def test_push_uploads_only_the_new_tensor_and_a_clone_gets_every_version(paired, tmp_path, rng):
    env = paired.env
    a, bare, tensors = team_repo(tmp_path, paired, rng)
    v1 = sha256(a / "model.safetensors")
    cfg = mvcconfig.read(str(a))
    assert cfg["origin"].url == paired.url and cfg["origin"].endpoint_url == (paired.endpoint or None)
    assert "testing" not in (a / ".mvcconfig").read_text()  # a URL, never a credential

    before = paired.stored_bytes()
    res = run(a, "push", "-q", "origin", "main", env=env)
    assert "uploaded" in res.stderr
    first_push = paired.stored_bytes() - before
    assert first_push >= 0.9 * store_bytes(a)  # the model went up (compressed)

    tensors["layers.2.weight"] = ("BF16", (1024, 1024), bf16(rng, (1024, 1024)))  # a one-tensor edit
    write_safetensors(a / "model.safetensors", tensors)
    local_before = store_bytes(a)
    run(a, "commit", "-q", "-am", "edit layer 2", env=env)
    new_compressed = store_bytes(a) - local_before
    v2 = sha256(a / "model.safetensors")
    before = paired.stored_bytes()
    run(a, "push", "-q", "origin", "main", env=env)
    sent = paired.stored_bytes() - before
    assert 0 < sent <= 1.05 * new_compressed, (sent, new_compressed)
    assert run(a, "push", "origin", "main", env=env).stderr.count("uploaded") == 0  # nothing left to send

    b = tmp_path / "b"
    run(tmp_path, "clone", "-q", str(bare), str(b), env=env)
    assert parse((b / "model.safetensors").read_bytes()) is not None  # no filter configured yet
    out = mvc(b, "git", "install", env=env).stdout
    assert "checked out 1 model file" in out
    assert sha256(b / "model.safetensors") == v2
    assert run(b, "status", "--porcelain", env=env).stdout == ""
    run(b, "checkout", "HEAD~1", "--", "model.safetensors", env=env)  # fetched on demand by the filter
    assert sha256(b / "model.safetensors") == v1
    fsck = json.loads(mvc(b, "git", "fsck", "--json", env=env).stdout)
    assert fsck["ok"] is True


def test_skip_smudge_then_fetch_and_pull(paired, tmp_path, rng):
    env = paired.env
    a, bare, tensors = team_repo(tmp_path, paired, rng, n=2, side=256)
    v1 = sha256(a / "model.safetensors")
    tensors["layers.0.weight"] = ("BF16", (256, 256), bf16(rng, (256, 256)))
    write_safetensors(a / "model.safetensors", tensors)
    run(a, "commit", "-q", "-am", "two", env=env)
    v2 = sha256(a / "model.safetensors")
    run(a, "push", "-q", "origin", "main", env=env)

    b = tmp_path / "b"
    skip = dict(env, MVC_SKIP_SMUDGE="1")
    run(tmp_path, "clone", "-q", str(bare), str(b), env=skip)
    mvc(b, "git", "install", env=skip)
    assert parse((b / "model.safetensors").read_bytes()) is not None  # pointers stay
    assert run(b, "status", "--porcelain", env=skip).stdout == ""
    out = mvc(b, "git", "fetch", env=env).stdout
    assert "fetched" in out and "1 model file" in out
    assert parse((b / "model.safetensors").read_bytes()) is not None  # fetch alone leaves the work tree
    assert "checked out 1 model file" in mvc(b, "git", "pull", env=skip).stdout  # MVC_SKIP_SMUDGE ignored
    assert sha256(b / "model.safetensors") == v2
    assert "here already" in mvc(b, "git", "fetch", env=env).stdout
    assert json.loads(mvc(b, "git", "fsck", "--json", env=env, check=False).stdout)["ok"] is False
    mvc(b, "git", "fetch", "--all", env=env)  # the whole history: every version is here now
    assert json.loads(mvc(b, "git", "fsck", "--json", env=env).stdout)["ok"] is True
    run(b, "checkout", "HEAD~1", "--", "model.safetensors", env=env)
    assert sha256(b / "model.safetensors") == v1


def test_unreachable_remote_fails_the_file_with_one_line_and_writes_nothing(tmp_path, rng):
    env = dict(os.environ, **CREDS)
    paired = Paired("file", tmp_path, None)
    a, bare, _ = team_repo(tmp_path, paired, rng, n=1, side=128)
    run(a, "push", "-q", "origin", "main", env=env)
    b = tmp_path / "b"
    run(tmp_path, "clone", "-q", "--no-checkout", str(bare), str(b), env=env)
    mvc(b, "git", "install", env=env)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run(b, "checkout", "main", "--", ".mvcconfig", ".gitattributes", env=env)
    (b / ".mvcconfig").write_text(f'[remote "origin"]\n\turl = s3://bucket/x\n\tendpoint-url = {dead}\n')
    res = run(b, "checkout", "main", "--", "model.safetensors", env=env, check=False)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mvc:")]
    assert len(lines) == 1 and "mvc remote origin (s3://bucket/x)" in lines[0] and "Traceback" not in res.stderr
    assert not (b / "model.safetensors").exists()  # nothing half-written


def test_a_failed_upload_fails_git_push_and_the_ref_stays(tmp_path, rng, s3_server):
    env = dict(os.environ, **CREDS)
    paired = Paired("file", tmp_path, None)
    a, bare, _ = team_repo(tmp_path, paired, rng, n=1, side=128)
    mvc(a, "remote", "remove", "origin", env=env)
    assert mvcconfig.read(str(a)) == {}  # the empty work-tree file wins over the committed one
    mvc(a, "remote", "add", "origin", "s3://no-such-bucket/x", "--endpoint-url", s3_server, env=env)
    res = run(a, "push", "origin", "main", env=env, check=False)
    assert res.returncode != 0
    assert "bucket 'no-such-bucket' does not exist" in res.stderr and "Traceback" not in res.stderr
    assert run(bare, "branch", "--list", env=env).stdout == ""  # Git moved no ref


def test_push_to_an_unpaired_network_remote_explains_how_to_pair(tmp_path, rng):
    env = dict(os.environ, **CREDS)
    g, _ = model_repo(tmp_path, rng, 64, env)
    head = run(g, "rev-parse", "HEAD", env=env).stdout.strip()
    # what Git runs before talking to https://example.invalid (the hook is the real installed one)
    res = subprocess.run([str(g / ".git" / "hooks" / "pre-push"), "team", "https://example.invalid/m.git"],
                         cwd=g, input=f"refs/heads/main {head} refs/heads/main {'0' * 40}\n",
                         capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "no paired mvc remote" in res.stderr and "mvc remote add team" in res.stderr
    # a push with no model in it needs no pairing
    res = subprocess.run([str(g / ".git" / "hooks" / "pre-push"), "team", "https://example.invalid/m.git"],
                         cwd=g, input="", capture_output=True, text=True, env=env)
    assert res.returncode == 0


def test_local_bare_remote_without_pairing_keeps_the_objects_itself(tmp_path, rng):
    env = dict(os.environ, **CREDS)
    g, want = model_repo(tmp_path, rng, 128, env)
    bare = tmp_path / "shared.git"
    run(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare), env=env)
    res = run(g, "push", str(bare), "main", env=env)
    assert "uploaded" in res.stderr and (bare / "mvc" / "store" / "data.mdb").exists()
    c = tmp_path / "c"
    run(tmp_path, "clone", "-q", str(bare), str(c), env=env)
    mvc(c, "git", "install", env=env)
    assert sha256(c / "m.safetensors") == want


def test_pushing_an_annotated_tag_uploads_its_commits_models(tmp_path, rng):
    env = dict(os.environ, **CREDS)
    g, _ = model_repo(tmp_path, rng, 128, env)
    run(g, "tag", "-a", "v1", "-m", "release", env=env)
    bare = tmp_path / "shared.git"
    run(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare), env=env)
    assert "uploaded" in run(g, "push", str(bare), "v1", env=env).stderr
    mvc(g, "git", "uninstall", env=env)
    assert not (g / ".git" / "hooks" / "pre-push").exists()


def test_remote_commands_in_a_git_work_tree(tmp_path):
    env = dict(os.environ)
    g = tmp_path / "g"
    new_git(g, env)
    res = mvc(g, "remote", "add", "origin", "file:///tmp/x", check=False)
    assert res.returncode != 0 and "mvc git install" in res.stderr  # not installed: a hint, not a crash
    mvc(g, "git", "install")
    mvc(g, "remote", "add", "origin", "s3://b/p", "--endpoint-url", "http://127.0.0.1:9")
    assert json.loads(mvc(g, "remote", "list", "--json").stdout) == {
        "origin": {"url": "s3://b/p", "endpoint_url": "http://127.0.0.1:9"}}
    assert "already exists" in mvc(g, "remote", "add", "origin", "s3://b/q", check=False).stderr
    for bad, why in (("s3://key:secret@b/p", "credentials"), ("http://b/p", "is not s3://")):
        res = mvc(g, "remote", "add", "other", bad, check=False)
        assert res.returncode != 0 and why in res.stderr and "Traceback" not in res.stderr
    mvc(g, "remote", "remove", "origin")
    assert json.loads(mvc(g, "remote", "list", "--json").stdout) == {}


@pytest.mark.parametrize("text, why", [
    ('[remote "o"]\n\turl = s3://AKIA:secret@bucket/p\n', "credentials"),
    ('[remote "o"]\n\turl = https://evil.example/x\n', "is not s3://"),
    ('[remote "o"]\n\tendpoint-url = http://127.0.0.1:9\n', "has no url"),
    ('[remote "o"]\n\turl = s3://b/p\n\tendpoint-url = ftp://x\n', "is not an http"),
    ('[remote "../x"]\n\turl = s3://b/p\n', "not a valid remote name"),
    ('[remote "o"\n', "cannot be read"),
])
def test_a_hostile_mvcconfig_is_refused_in_one_line(tmp_path, text, why):
    g = tmp_path / "g"
    new_git(g, dict(os.environ))
    (g / ".mvcconfig").write_text(text)
    with pytest.raises(mvcconfig.ConfigError, match=why):
        mvcconfig.read(str(g))


def test_mvcconfig_ignores_includes_and_other_sections(tmp_path):
    g = tmp_path / "g"
    new_git(g, dict(os.environ))
    (tmp_path / "inc").write_text('[remote "evil"]\n\turl = s3://evil/x\n')
    (g / ".mvcconfig").write_text(f'[include]\n\tpath = {tmp_path / "inc"}\n[core]\n\tx = 1\n'
                                  '[remote "origin"]\n\turl = s3://b/p\n')
    assert list(mvcconfig.read(str(g))) == ["origin"]


def test_mvcconfig_is_read_from_the_index_or_head_when_not_in_the_work_tree(tmp_path):
    g = tmp_path / "g"
    new_git(g, dict(os.environ))
    (g / ".mvcconfig").write_text('[remote "origin"]\n\turl = s3://b/p\n')
    run(g, "add", ".mvcconfig")
    run(g, "commit", "-q", "-m", "cfg")
    os.remove(g / ".mvcconfig")
    assert mvcconfig.read(str(g))["origin"].url == "s3://b/p"


@pytest.mark.parametrize("text", [
    "refs/heads/main abc refs/heads/main 0\n",
    "only three fields here\n",
    "a " + "0" * 40 + " b " + "0" * 41 + "\n",
])
def test_pre_push_input_is_parsed_strictly(text):
    with pytest.raises(Exception, match="unexpected input line"):
        parse_push_updates(text.encode())


def test_pre_push_input_parses_sha1_and_sha256_ids():
    one, two = "a" * 40, "b" * 64
    assert parse_push_updates(f"refs/heads/x {one} refs/heads/x {'0' * 40}\nr {two} r {two}\n\n".encode()) == [
        (one, "0" * 40), (two, two)]
