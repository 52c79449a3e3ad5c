"""Benchmarks. The default: mvc side by side with Git LFS, DVC, git-theta, ZipNN and zstd
(bench/peers.py). `--store`: commit and checkout throughput, store ratio, no-op status time and
peak RSS on a generated model:

    python -m bench [--size-mib 512] [--systems mvc,git-lfs,dvc,git-theta,zipnn,zstd] [--out DIR]
    python -m bench --store [--size-mib 1024] [--largest-mib N] [--shards K] [--out results.json]
    python -m bench --many-tensors 100000

Each mvc command runs as its own process (the real console command); its peak RSS comes
from wait4(), so every number is what a user's shell would see.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from mvc.filehash import sha256_file as sha256
from mvc.synth import write_model

from . import peers as peers_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mvc_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "mvc")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "mvc"]


def timed(args: list[str], cwd: str, env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one mvc process, measured by the process itself."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "bench.peak", rss.name, "--", *args], cwd=cwd,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))
        wall = time.perf_counter() - t
        if p.returncode != 0:
            raise SystemExit(f"mvc {' '.join(args)} failed: {p.stderr.decode()}")
        return wall, int(open(rss.name).read() or 0)


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def run(size_mib: int, largest_mib: int | None, shards: int, workdir: str) -> dict:
    model = os.path.join(workdir, "model.safetensors")
    files = write_model(model, size_mib, seed=0, largest_mib=largest_mib, shards=shards)
    raw = sum(os.path.getsize(f) for f in files)
    hashes = {f: sha256(f) for f in files}
    subprocess.run(mvc_cmd() + ["init", "."], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    commit_s, commit_rss = timed(["-q", "commit", "-m", "bench"], workdir)
    from mvc import Repo

    with Repo(workdir) as r:
        stored = r.backend.stats()["stored_bytes"]
    status_runs = []
    for _ in range(5):  # the plain console command, as a user types it
        t = time.perf_counter()
        subprocess.run(mvc_cmd() + ["status"], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
        status_runs.append(time.perf_counter() - t)
    for f in files:
        os.remove(f)
    os.sync()
    checkout_s, checkout_rss = timed(["-q", "checkout", "-f", "main"], workdir)
    exact = all(sha256(f) == h for f, h in hashes.items())
    # the same with the numpy fallback of the C kernels, into a second repository
    slow = os.path.join(workdir, "fallback")
    os.makedirs(slow)
    for f in files:
        os.link(f, os.path.join(slow, os.path.basename(f)))
    subprocess.run(mvc_cmd() + ["init", "."], cwd=slow, check=True, stdout=subprocess.DEVNULL)
    numpy_env = {"MVC_NO_NATIVE": "1"}
    fb_commit_s, _ = timed(["-q", "commit", "-m", "bench"], slow, numpy_env)
    for f in files:
        os.remove(os.path.join(slow, os.path.basename(f)))
    fb_checkout_s, _ = timed(["-q", "checkout", "-f", "main"], slow, numpy_env)
    exact &= all(sha256(os.path.join(slow, os.path.basename(f))) == h for f, h in hashes.items())
    # the zstd command line on the same files: what a user without mvc would do
    zstd_c = zstd_d = None
    if shutil.which("zstd"):
        t = time.perf_counter()
        for f in files:
            subprocess.run(["zstd", "-1", "-T2", "-q", "-f", f, "-o", f + ".zst"], check=True)
        zstd_c = time.perf_counter() - t
        t = time.perf_counter()
        for f in files:
            subprocess.run(["zstd", "-d", "-q", "-f", f + ".zst", "-o", f + ".out"], check=True)
        zstd_d = time.perf_counter() - t
    # ZipNN (its Python package, 2 threads) on the same files, as a process per file like the others
    zipnn_c = zipnn_d = zipnn_ratio = None
    if importlib.util.find_spec("zipnn") is not None:
        codec_cmd = [sys.executable, "-m", "bench.filecodec", "zipnn"]
        here = {"cwd": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        t = time.perf_counter()
        for f in files:
            subprocess.run(codec_cmd + ["compress", f, f + ".znn"], check=True, **here)
        zipnn_c = time.perf_counter() - t
        zipnn_ratio = sum(os.path.getsize(f + ".znn") for f in files) / raw
        t = time.perf_counter()
        for f in files:
            subprocess.run(codec_cmd + ["decompress", f + ".znn", f + ".zout"], check=True, **here)
        zipnn_d = time.perf_counter() - t
        exact &= all(sha256(f + ".zout") == h for f, h in hashes.items())
    return {
        "zipnn_compress_gbps": raw / zipnn_c / 1e9 if zipnn_c else None,
        "zipnn_decompress_gbps": raw / zipnn_d / 1e9 if zipnn_d else None, "zipnn_ratio": zipnn_ratio,
        "fallback_commit_gbps": raw / fb_commit_s / 1e9, "fallback_checkout_gbps": raw / fb_checkout_s / 1e9,
        "zstd_compress_gbps": raw / zstd_c / 1e9 if zstd_c else None,
        "zstd_decompress_gbps": raw / zstd_d / 1e9 if zstd_d else None,
        "size_bytes": raw, "files": len(files), "largest_mib": largest_mib,
        "commit_s": commit_s, "commit_gbps": raw / commit_s / 1e9, "commit_peak_rss_mib": commit_rss / 2**20,
        "checkout_s": checkout_s, "checkout_gbps": raw / checkout_s / 1e9,
        "checkout_peak_rss_mib": checkout_rss / 2**20, "bit_exact": exact,
        "store_bytes": stored, "store_ratio": stored / raw,
        "noop_status_s": statistics.median(status_runs), "machine": machine(),
    }


def perturb(src: str, dst: str, seed: int) -> None:
    """A fine-tune of *src*: random low mantissa bits of every bf16 element flipped, streamed."""
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    with open(src, "rb") as f, open(dst, "wb") as g:
        (n,) = struct.unpack("<Q", f.read(8))
        g.write(struct.pack("<Q", n) + f.read(n))
        while block := f.read(64 << 20):
            u = np.frombuffer(block, "<u2") ^ rng.integers(0, 8, len(block) // 2, dtype=np.uint16)
            g.write(u.tobytes())


def run_merge(size_mib: int, workdir: str) -> dict:
    """Two branches fine-tune every tensor of one model; `mvc merge --strategy average` joins them."""
    model = os.path.join(workdir, "model.safetensors")
    base = os.path.join(workdir, "base.bin")
    write_model(base, size_mib, seed=0)
    raw = os.path.getsize(base)
    run = [*mvc_cmd()]
    subprocess.run(run + ["init", "."], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, ".mvcignore"), "w") as f:
        f.write("base.bin\n.mvcignore\n")
    os.replace(base, model)
    subprocess.run(run + ["-q", "commit", "-m", "base"], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    for branch, seed in (("a", 1), ("b", 2)):
        subprocess.run(run + ["-q", "switch", "-c", branch, "main"], cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        perturb(model, model + ".new", seed)
        os.replace(model + ".new", model)
        subprocess.run(run + ["-q", "commit", "-m", f"tune {branch}"], cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL)
    subprocess.run(run + ["-q", "switch", "a"], cwd=workdir, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    merge_s, merge_rss = timed(["-q", "merge", "b", "--strategy", "average"], workdir)
    return {"size_bytes": raw, "merge_s": merge_s, "merge_gbps": raw / merge_s / 1e9,
            "merge_peak_rss_mib": merge_rss / 2**20, "machine": machine()}


def run_small(count: int, workdir: str) -> dict:
    """One safetensors file of *count* tiny float32 tensors (20 elements each): per-tensor cost,
    not per-byte work. Times commit, status after a touch, a diff against an edit, checkout."""
    import numpy as np
    from safetensors.numpy import save_file

    model = os.path.join(workdir, "many.safetensors")
    rng = np.random.default_rng(0)
    tensors = {f"layer{i // 100}.t{i % 100}": rng.standard_normal(20).astype(np.float32) for i in range(count)}
    save_file(tensors, model)
    raw, committed = os.path.getsize(model), sha256(model)
    subprocess.run(mvc_cmd() + ["init", "."], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    out = {"tensors": count, "size_bytes": raw, "machine": machine()}
    out["commit_s"], _ = timed(["-q", "commit", "-m", "many"], workdir)
    os.utime(model)
    out["status_after_touch_s"], _ = timed(["status"], workdir)
    tensors["layer0.t0"] = tensors["layer0.t0"] + 1
    save_file(tensors, model)
    out["diff_s"], _ = timed(["diff"], workdir)
    os.remove(model)
    out["checkout_s"], _ = timed(["-q", "checkout", "-f", "main"], workdir)
    out["bit_exact"] = sha256(model) == committed
    return out


def run_git(size_mib: int, workdir: str) -> dict:
    """`git add` of the model through the mvc filter, against `mvc commit` of the same model."""
    model_dir = os.path.join(workdir, "mvcrepo")
    git_dir_ = os.path.join(workdir, "gitrepo")
    os.makedirs(model_dir)
    os.makedirs(git_dir_)
    write_model(os.path.join(model_dir, "model.safetensors"), size_mib, seed=0)
    os.link(os.path.join(model_dir, "model.safetensors"), os.path.join(git_dir_, "model.safetensors"))
    raw = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    subprocess.run(mvc_cmd() + ["init", "."], cwd=model_dir, check=True, stdout=subprocess.DEVNULL)
    commit_s, _ = timed(["-q", "commit", "-m", "bench"], model_dir)
    env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@x", GIT_COMMITTER_NAME="b",
               GIT_COMMITTER_EMAIL="b@x")
    for args in (["git", "init", "-q"], mvc_cmd() + ["git", "install"], mvc_cmd() + ["git", "track", "*.safetensors"],
                 ["git", "add", ".gitattributes"]):
        subprocess.run(args, cwd=git_dir_, check=True, stdout=subprocess.DEVNULL, env=env)
    t = time.perf_counter()
    subprocess.run(["git", "add", "model.safetensors"], cwd=git_dir_, check=True, env=env)
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(["git", "status", "--porcelain"], cwd=git_dir_, check=True, stdout=subprocess.DEVNULL, env=env)
    status_s = time.perf_counter() - t
    return {"size_bytes": raw, "commit_s": commit_s, "commit_gbps": raw / commit_s / 1e9, "git_add_s": add_s,
            "git_add_gbps": raw / add_s / 1e9, "ratio": commit_s / add_s, "git_status_s": status_s,
            "machine": machine()}


def run_remote(size_mib: int, workdir: str) -> dict:
    """push and clone against a local S3-compatible server (moto), and what a lazy clone transfers."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mvc-bench")
        src = os.path.join(workdir, "src")
        os.makedirs(src)
        write_model(os.path.join(src, "model.safetensors"), size_mib, seed=0)
        raw = os.path.getsize(os.path.join(src, "model.safetensors"))
        for args in (["init", "."], ["-q", "commit", "-m", "bench"],
                     ["remote", "add", "origin", "s3://mvc-bench/m", "--endpoint-url", endpoint]):
            subprocess.run(mvc_cmd() + args, cwd=src, check=True, stdout=subprocess.DEVNULL)
        push_s, push_rss = timed(["-q", "push"], src)
        clone_s, clone_rss = timed(["-q", "clone", "s3://mvc-bench/m", "copy", "--endpoint-url", endpoint], workdir)
        exact = sha256(os.path.join(src, "model.safetensors")) == sha256(os.path.join(workdir, "copy",
                                                                                       "model.safetensors"))
        from mvc import Repo
        from mvc.remote.s3 import S3Remote
        from mvc.remote.sync import add_remote, fetch

        # the same through a file:// remote (a directory: a shared filesystem)
        fileurl = "file://" + os.path.join(workdir, "file-remote")
        subprocess.run(mvc_cmd() + ["remote", "add", "shared", fileurl], cwd=src, check=True, stdout=subprocess.DEVNULL)
        fpush_s, _ = timed(["-q", "push", "shared"], src)
        fclone_s, _ = timed(["-q", "clone", fileurl, "file-copy"], workdir)
        exact = exact and sha256(os.path.join(src, "model.safetensors")) == sha256(
            os.path.join(workdir, "file-copy", "model.safetensors"))
        lazy = Repo.init(os.path.join(workdir, "lazy"))
        add_remote(lazy, "origin", "s3://mvc-bench/m", endpoint)
        remote = S3Remote("s3://mvc-bench/m", endpoint_url=endpoint)
        fetch(lazy, remote, "origin", lazy=True)
        return {"size_bytes": raw, "push_s": push_s, "push_gbps": raw / push_s / 1e9, "push_peak_rss_mib":
                push_rss / 2**20, "clone_s": clone_s, "clone_gbps": raw / clone_s / 1e9,
                "clone_peak_rss_mib": clone_rss / 2**20, "bit_exact": exact, "lazy_clone_bytes": remote.received,
                "file_push_gbps": raw / fpush_s / 1e9, "file_clone_gbps": raw / fclone_s / 1e9,
                "machine": machine()}
    finally:
        server.terminate()
        server.wait(timeout=10)


def report(res: dict) -> str:
    rows = [
        ("model", f"{res['size_bytes'] / 2**30:.2f} GiB bf16 in {res['files']} file(s)"
         + (f", largest tensor {res['largest_mib']} MiB" if res["largest_mib"] else "")),
        ("commit", f"{res['commit_gbps']:.2f} GB/s ({res['commit_s']:.2f} s), "
                   f"peak RSS {res['commit_peak_rss_mib']:.0f} MiB"),
        ("checkout", f"{res['checkout_gbps']:.2f} GB/s ({res['checkout_s']:.2f} s), "
                     f"peak RSS {res['checkout_peak_rss_mib']:.0f} MiB, bit-exact: {res['bit_exact']}"),
        ("same, numpy fallback of the C kernels (MVC_NO_NATIVE=1)",
         f"commit {res['fallback_commit_gbps']:.2f} GB/s, checkout {res['fallback_checkout_gbps']:.2f} GB/s"),
        ("`zstd -1 -T2` / `zstd -d` on the same files (CLI)",
         f"{res['zstd_compress_gbps']:.2f} / {res['zstd_decompress_gbps']:.2f} GB/s" if res["zstd_compress_gbps"]
         else "zstd not installed"),
        ("ZipNN (2 threads, a process per file) on the same files",
         f"compress {res['zipnn_compress_gbps']:.2f} / decompress {res['zipnn_decompress_gbps']:.2f} GB/s, "
         f"{res['zipnn_ratio']:.4f} of raw" if res.get("zipnn_compress_gbps") else "zipnn not installed"),
        ("store", f"{res['store_bytes'] / 2**20:.1f} MiB = {res['store_ratio']:.4f} of raw"),
        ("no-op status", f"{res['noop_status_s'] * 1000:.0f} ms (median of 5)"),
        ("machine", res["machine"]),
    ]
    return "\n".join(f"| {k} | {v} |" for k, v in [("measure", "result"), ("---", "---"), *rows])


def _peers(args, argv) -> None:
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = [x for x in systems if x not in peers_mod.ALL]
    if unknown:
        raise SystemExit(f"unknown system {unknown[0]!r}; choose from {', '.join(peers_mod.ALL)}")
    size = args.size_mib or 512
    workdir = args.workdir or tempfile.mkdtemp(prefix="mvc-bench-peers-")
    t = time.perf_counter()
    try:
        res = peers_mod.run_all(size, systems, args.dataset, workdir, args.budget_s)
        if "zipnn" in systems and "mvc" in systems:  # the codec targets, on the same machine in the same run
            from . import codec as codec_bench

            res["codec"] = codec_bench.run(min(size, 256))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    res["machine"] = machine()
    res["seconds"] = time.perf_counter() - t
    text = f"$ python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}\n\n" + peers_mod.report(res)
    if res.get("codec"):
        from . import codec as codec_bench

        text += "\n### chunk codec on the same machine (2 threads)\n\n" + codec_bench.report(res["codec"]) + "\n\n"
    text += f"machine: {res['machine']}; whole run {res['seconds']:.0f} s\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(res, f, indent=2)
        with open(os.path.join(args.out, "tables.md"), "w") as f:
            f.write(text)
        for p in peers_mod.charts(res, args.out):
            print(f"wrote {p}")


def _print_table(rows, report, argv, out) -> None:
    """The command, the markdown table, the machine; the rows as JSON to --out."""
    print(f"$ python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(report(rows))
    print(f"machine: {machine()}")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=None, help="model size (default 512 side by side, else 1024)")
    ap.add_argument("--systems", default=",".join(peers_mod.ALL), help="side by side: which systems, comma-separated")
    ap.add_argument("--dataset", choices=["llama", "minilm", "both"], default="both",
                    help="side by side: the generated Llama history, the real MiniLM one, or both")
    ap.add_argument("--budget-s", type=float, default=300,
                    help="side by side: seconds each system gets per dataset before it is stopped (and reported)")
    ap.add_argument("--install-peers", action="store_true", help="install git-lfs, dvc, git-theta, zipnn, matplotlib")
    ap.add_argument("--store", action="store_true", help="instead: mvc's own commit/checkout/status benchmark")
    ap.add_argument("--largest-mib", type=int, default=None, help="add an embedding of this size")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--workdir", help="directory to work in (default: a temporary one, removed after)")
    ap.add_argument("--merge", action="store_true",
                    help="instead: merge two branches that both fine-tuned every tensor (--strategy average)")
    ap.add_argument("--git", action="store_true", help="instead: `git add` through the mvc filter vs `mvc commit`")
    ap.add_argument("--remote", action="store_true", help="instead: push and clone against a local S3 server (moto)")
    ap.add_argument("--git-transfer", action="store_true",
                    help="instead: git push/clone of a model and a one-tensor edit, mvc's filter vs Git LFS")
    ap.add_argument("--codec", action="store_true", help="instead: mvc's chunk codec against ZipNN and zstd")
    ap.add_argument("--many-tensors", type=int, default=0, metavar="N",
                    help="instead: commit, status, diff and checkout of one file of N tiny tensors")
    ap.add_argument("--compression", action="store_true",
                    help="instead: every compression method on the shipped demo model (perplexity table)")
    ap.add_argument("--compress-scale", action="store_true",
                    help="instead: compression steps on a generated Llama of --size-mib (default 1570: 0.8 B "
                         "parameters), time and peak RSS of each")
    ap.add_argument("--tokens", type=int, default=2048, help="--compress-scale: evaluation tokens")
    ap.add_argument("--steps", default="eval,prune-magnitude,prune-wanda,prune-sparsegpt,quantize-rtn-int8,"
                                       "quantize-nf4,score-wanda",
                    help="--compress-scale: which steps, comma-separated")
    args = ap.parse_args(argv)
    if args.install_peers:
        peers_mod.install()
        return
    side_by_side = not (args.store or args.merge or args.git or args.remote or args.codec or args.compression
                        or args.many_tensors or args.git_transfer or args.compress_scale)
    if side_by_side:
        _peers(args, argv)
        return
    if args.compress_scale:
        from . import compress_scale

        workdir = args.workdir or tempfile.mkdtemp(prefix="mvc-bench-")
        try:
            res = compress_scale.run(args.size_mib or 1570, workdir, args.tokens, args.steps.split(","),
                                     mvc_cmd, timed, machine)
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        _print_table(res, compress_scale.report, argv, args.out)
        return
    args.size_mib = args.size_mib or 1024
    if args.compression:
        from . import compression

        _print_table(compression.run(), compression.report, argv, args.out)
        return
    if args.codec:
        from . import codec as codec_bench

        _print_table(codec_bench.run(args.size_mib), codec_bench.report, argv, args.out)
        print(codec_bench.report_kernels(codec_bench.bench_kernels()))
        print(codec_bench.report_undiff_parts(codec_bench.bench_undiff_parts()))
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="mvc-bench-")
    try:
        if args.many_tensors:
            res = run_small(args.many_tensors, workdir)
        elif args.merge:
            res = run_merge(args.size_mib, workdir)
        elif args.git:
            res = run_git(args.size_mib, workdir)
        elif args.git_transfer:
            from .gittransfer import run_git_transfer

            res = run_git_transfer(args.size_mib, workdir, mvc_cmd())
        elif args.remote:
            res = run_remote(args.size_mib, workdir)
        else:
            res = run(args.size_mib, args.largest_mib, args.shards, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"$ python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}")
    if args.remote:
        print(f"| {res['size_bytes'] / 2**30:.2f} GiB | push {res['push_gbps']:.2f} GB/s ({res['push_s']:.1f} s, "
              f"{res['push_peak_rss_mib']:.0f} MiB) | clone {res['clone_gbps']:.2f} GB/s ({res['clone_s']:.1f} s, "
              f"{res['clone_peak_rss_mib']:.0f} MiB), bit-exact {res['bit_exact']} | lazy clone "
              f"{res['lazy_clone_bytes'] / 1e6:.2f} MB | file:// push {res['file_push_gbps']:.2f} GB/s, clone "
              f"{res['file_clone_gbps']:.2f} GB/s |")
        return
    if args.git_transfer:
        from .gittransfer import render

        print(render(res))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)
        return
    if args.many_tensors:
        print(f"| {res['tensors']:,} tensors, {res['size_bytes'] / 2**20:.1f} MiB | commit {res['commit_s']:.1f} s | "
              f"status after touch {res['status_after_touch_s']:.1f} s | diff {res['diff_s']:.1f} s | checkout "
              f"{res['checkout_s']:.1f} s, bit-exact {res['bit_exact']} |")
        return
    if args.git:
        print(f"| {res['size_bytes'] / 2**30:.2f} GiB | mvc commit {res['commit_gbps']:.2f} GB/s | git add "
              f"{res['git_add_gbps']:.2f} GB/s | ratio {res['ratio']:.2f} | git status after add "
              f"{res['git_status_s'] * 1000:.0f} ms |")
        return
    if args.merge:
        print(f"| merge of two {res['size_bytes'] / 2**30:.2f} GiB branches, every element conflicting, average | "
              f"{res['merge_s']:.1f} s ({res['merge_gbps']:.2f} GB/s of model), peak RSS "
              f"{res['merge_peak_rss_mib']:.0f} MiB |")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)
        return
    print(report(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    if not res["bit_exact"]:
        raise SystemExit("checkout was not bit-exact")


if __name__ == "__main__":
    main()
