""".mvcconfig: where a Git repository's model objects live (docs/pointer-spec.md §4).

A committed file at the top of the work tree, in Git's config syntax, like git-lfs's
.lfsconfig, so that every clone knows its mvc remotes:

    [remote "origin"]
        url = s3://bucket/models
        endpoint-url = https://minio.example.com

An mvc remote is paired with the Git remote of the same name. Only URLs are kept, never a
credential (S3 credentials come from the AWS environment). The file comes from a clone, so it
is read as hostile input: Git parses it (`git config --file`/`--blob`, which never follows
include directives there), and every entry is checked before it is used.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from urllib.parse import urlsplit

from ...errors import MvcError
from ...refs import check_ref_name

FILENAME = ".mvcconfig"
MAX_BYTES = 64 << 10  # a handful of remotes; anything larger is not a config this tool wrote
_KEY = re.compile(r"\Aremote\.(.+)\.(url|endpoint-url)\Z")


class ConfigError(MvcError):
    pass


@dataclass(frozen=True)
class Paired:
    """An mvc remote for a Git remote (NAME is the Git remote's name)."""

    name: str
    url: str
    endpoint_url: str | None = None


def check_remote_url(url: str, what: str = "url") -> str:
    """An s3:// or file:// URL with no user name or password in it (one line if not)."""
    if not url or any(c in url for c in "\r\n\x00") or len(url) > 4096:
        raise ConfigError(f"{FILENAME}: {what} {url[:80]!r} is empty, too long or has a control character")
    if what == "url" and not (url.startswith("s3://") or url.startswith("file://")):
        raise ConfigError(f"{FILENAME}: url {url[:80]!r} is not s3://BUCKET[/PREFIX] or file:///PATH")
    if what == "endpoint-url" and not (url.startswith("http://") or url.startswith("https://")):
        raise ConfigError(f"{FILENAME}: endpoint-url {url[:80]!r} is not an http(s):// URL")
    if not url.startswith("file://"):
        try:
            parts = urlsplit(url)
        except ValueError as e:
            raise ConfigError(f"{FILENAME}: {what} {url[:80]!r} is not a URL ({e})") from e
        if "@" in parts.netloc:
            raise ConfigError(f"{FILENAME}: {what} {url[:80]!r} holds credentials",
                              hint="keep credentials in the AWS environment, never in a committed file")
    return url


def _git_config(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "config", *args], cwd=cwd, capture_output=True)
    except FileNotFoundError as e:
        raise MvcError("git is not installed", hint="apt-get install git") from e


def parse_listing(raw: bytes) -> dict[str, Paired]:
    """Entries of `git config --null --list` output -> remotes, checked."""
    found: dict[str, dict[str, str]] = {}
    for item in raw.split(b"\0"):
        if not item:
            continue
        key_b, _, value_b = item.partition(b"\n")
        try:
            key, value = key_b.decode("utf-8"), value_b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{FILENAME} is not UTF-8") from e
        m = _KEY.match(key)
        if not m:
            continue  # another tool's section, or a newer mvc's key: not ours to judge
        name, field = m.groups()
        try:
            check_ref_name(name, "remote")
        except MvcError as e:
            raise ConfigError(f"{FILENAME}: {e}") from e
        found.setdefault(name, {})[field] = check_remote_url(value, field)
    out = {}
    for name, fields in found.items():
        if "url" not in fields:
            raise ConfigError(f"{FILENAME}: remote {name!r} has no url")
        out[name] = Paired(name, fields["url"], fields.get("endpoint-url"))
    return out


def read(workdir: str, worktree_only: bool = False) -> dict[str, Paired]:
    """The remotes of .mvcconfig: the work tree's file, else the index's, else HEAD's (during a
    clone's checkout a model file can be smudged before .mvcconfig is written)."""
    path = os.path.join(workdir, FILENAME)
    if worktree_only and not os.path.lexists(path):
        return {}
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isfile(path):
            raise ConfigError(f"{FILENAME} is not a regular file")
        if os.path.getsize(path) > MAX_BYTES:
            raise ConfigError(f"{FILENAME} is over {MAX_BYTES // 1024} KiB")
        res = _git_config(["--file", path, "--null", "--list"], workdir)
    else:
        for blob in (":" + FILENAME, "HEAD:" + FILENAME):
            size = subprocess.run(["git", "cat-file", "-s", blob], cwd=workdir, capture_output=True, text=True)
            if size.returncode == 0:
                if int(size.stdout.strip() or 0) > MAX_BYTES:
                    raise ConfigError(f"{FILENAME} ({blob}) is over {MAX_BYTES // 1024} KiB")
                res = _git_config(["--blob", blob, "--null", "--list"], workdir)
                break
        else:
            return {}
    if res.returncode != 0:
        msg = res.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ConfigError(f"{FILENAME} cannot be read: {msg[0] if msg else 'git config failed'}")
    return parse_listing(res.stdout)


def add(workdir: str, name: str, url: str, endpoint_url: str | None = None) -> Paired:
    check_ref_name(name, "remote")
    check_remote_url(url)
    if endpoint_url:
        check_remote_url(endpoint_url, "endpoint-url")
    if name in read(workdir, worktree_only=True):
        raise ConfigError(f"remote {name!r} already exists in {FILENAME}",
                          hint=f"`mvc remote remove {name}` first")
    path = os.path.join(workdir, FILENAME)
    for key, value in (("url", url), ("endpoint-url", endpoint_url)):
        if value:
            res = _git_config(["--file", path, f"remote.{name}.{key}", value], workdir)
            if res.returncode != 0:
                raise ConfigError(f"cannot write {FILENAME}: {res.stderr.decode('utf-8', 'replace').strip()}")
    return Paired(name, url, endpoint_url)


def remove(workdir: str, name: str) -> None:
    if name not in read(workdir, worktree_only=True):
        raise ConfigError(f"no remote named {name!r} in {FILENAME}", hint="`mvc remote list` shows them")
    path = os.path.join(workdir, FILENAME)
    res = _git_config(["--file", path, "--remove-section", f"remote.{name}"], workdir)
    if res.returncode != 0:
        raise ConfigError(f"cannot write {FILENAME}: {res.stderr.decode('utf-8', 'replace').strip()}")
    # an empty file stays: it says "no remotes" even where the index still holds the old one


def resolve(workdir: str, git_remote: str | None) -> Paired | None:
    """The mvc remote for Git remote *git_remote*: the one of the same name, else the only one
    there is. None: .mvcconfig names no remote that fits."""
    paired = read(workdir)
    if git_remote and git_remote in paired:
        return paired[git_remote]
    if len(paired) == 1:
        return next(iter(paired.values()))
    return None


def default_git_remote(workdir: str) -> str:
    """The Git remote a fetch talks to: the current branch's upstream remote, else origin."""
    branch = subprocess.run(["git", "symbolic-ref", "-q", "--short", "HEAD"], cwd=workdir,
                            capture_output=True, text=True).stdout.strip()
    if branch:
        res = subprocess.run(["git", "config", "--get", f"branch.{branch}.remote"], cwd=workdir,
                             capture_output=True, text=True)
        if res.stdout.strip():
            return res.stdout.strip()
    return "origin"
