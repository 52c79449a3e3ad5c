"""The README's main job and the benchmark run end to end (small sizes)."""

import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from bench import peers
from mvc.store import kernels


def test_demo_runs_both_parts_of_the_main_job(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mvc.cli.demo", str(tmp_path / "d"), "--size-mib", "16"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "matches the first version" in res.stdout
    assert "1 tensor(s) changed" in res.stdout
    # then the bird-bone recipe on the demo model, with its table
    assert "recipe bird-bone: finished" in res.stdout
    table = [ln for ln in res.stdout.splitlines() if ln.startswith("| ") and "landed" in ln]
    assert [ln.split("|")[2].strip() for ln in table] == ["shed", "prune", "heal", "quantize"]


def test_bench_smoke(tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", "bench", "--store", "--size-mib", "16", "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(out.read_text())
    assert r["bit_exact"] is True
    assert 0.6 < r["store_ratio"] < 0.70
    assert r["commit_gbps"] > 0 and r["checkout_gbps"] > 0
    assert "| commit |" in res.stdout


def test_codec_bench_smoke(tmp_path):
    out = tmp_path / "codec.json"
    res = subprocess.run([sys.executable, "-m", "bench", "--codec", "--size-mib", "8", "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {(r["dtype"], r["coder"]): r for r in json.loads(out.read_text())}
    ours = rows[("bf16", "mvc (planes, Huffman-coded exponents)")]
    assert ours["ratio"] < rows[("bf16", "zstd level 1")]["ratio"] - 0.05
    assert "| fp32 | mvc" in res.stdout
    huff = rows[("bf16 exponent plane", "Huffman-only zstd frame (C kernels)")]
    tuned = rows[("bf16 exponent plane", "tuned zstd (strategy fast, min_match 7)")]
    assert huff.get("missing") or huff["ratio"] <= tuned["ratio"]
    assert "| three-way merge, every element conflicting, average |" in res.stdout
    # the DIFF kernel on each SIMD path, checked against the chunk it must give back (else rc 1)
    assert ("| undiff_parts, AVX2 at most |" in res.stdout) == kernels.undiff_parts_ready()


def test_side_by_side_smoke(tmp_path):
    """`python -m bench --size-mib 16 --systems mvc-full,mvc`: the peer benchmark's smoke mode, with
    mvc and mvc without deltas measured in lockstep (their rows in the pair's order)."""
    out = tmp_path / "peers"
    res = subprocess.run([sys.executable, "-m", "bench", "--size-mib", "16", "--systems", "mvc-full,mvc", "--dataset",
                          "llama", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "results.json").read_text())
    row, full = data["datasets"]["llama"]["rows"]
    assert full["system"] == "mvc-full" and full["error"] is None and full["bit_exact"] is True
    assert len(full["commit_s"]) == 7 and full["store"][-1] > row["store"][-1]  # deltas off: every version whole
    assert "repack_s" in row and "repack_s" not in full
    assert row["system"] == "mvc" and row["error"] is None and row["bit_exact"] is True
    assert len(row["store"]) == 7 and row["store"] == sorted(row["store"])
    edit = row["store"][5] - row["store"][4]
    assert edit <= 1.05 * data["datasets"]["llama"]["edited_layer_bytes"]  # one layer changed, one layer stored
    assert "| mvc |" in (out / "tables.md").read_text()


def test_lockstep_measurement_goes_on_when_one_system_fails(tmp_path):
    """A system that fails (here its commit command exits 1) is reported as failed, and the
    systems measured in lockstep with it are measured to the end."""
    class Broken(peers.Mvc):
        def commit_cmd(self, i):
            return "false"

    versions = []
    for i in range(3):
        p = tmp_path / f"v{i}.safetensors"
        save_file({"w": np.full((300, 500), i, dtype=np.float32)}, str(p))
        versions.append(str(p))
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    rows = peers.measure_together([(Broken, "broken", str(tmp_path / "a")), (peers.Mvc, "mvc", str(tmp_path / "b"))],
                                  versions, env, budget_s=120)
    assert rows[0]["error"].startswith("`false` exited 1") and rows[0]["bit_exact"] is False
    assert rows[1]["error"] is None and rows[1]["bit_exact"] is True and len(rows[1]["commit_s"]) == 3
    assert rows[1]["checkout_first_s"] > 0 and rows[1]["store_repacked"] > 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
