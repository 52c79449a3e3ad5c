"""The README's main job and the benchmark run end to end (small sizes)."""

import json
import subprocess
import sys


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


def test_side_by_side_smoke(tmp_path):
    """`python -m bench --size-mib 16 --systems mvc`: the peer benchmark's smoke mode."""
    out = tmp_path / "peers"
    res = subprocess.run([sys.executable, "-m", "bench", "--size-mib", "16", "--systems", "mvc", "--dataset", "llama",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "results.json").read_text())
    (row,) = data["datasets"]["llama"]["rows"]
    assert row["system"] == "mvc" and row["error"] is None and row["bit_exact"] is True
    assert len(row["store"]) == 7 and row["store"] == sorted(row["store"])
    edit = row["store"][5] - row["store"][4]
    assert edit <= 1.05 * data["datasets"]["llama"]["edited_layer_bytes"]  # one layer changed, one layer stored
    assert "| mvc |" in (out / "tables.md").read_text()
