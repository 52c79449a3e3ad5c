"""`mvc report` and `mvc diff --html`: one self-contained HTML file, rendered by a real headless
Chromium (Debian's `chromium`, installed here when missing), checked through its DOM, its
console and a screenshot."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mvc.report.data import layer_role, waves
from tests.helpers import bf16, f32, mvc, mvc_proc, write_safetensors
from tests.helpers import open_repo as _open

#: what would make a browser fetch something: an external script, style, image, frame or import
EXTERNAL = re.compile(r"""<(?:script|img|iframe|link|source|embed)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//"""
                      r"""|url\(\s*["']?(?:https?:)?//|@import""", re.I)


@pytest.fixture(scope="session")
def chromium():
    """The path of a headless-capable Chromium; installed with apt-get when missing (as root)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, check=True, env=env,
                       stdout=subprocess.DEVNULL)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no chromium and no way to install it (apt-get as root)")
    return exe


def render(chromium: str, page: Path, tmp: Path) -> tuple[str, list[str], Path]:
    """(rendered DOM, console messages, screenshot) of *page*, with the network unreachable."""
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=15000",
              f"--user-data-dir={tmp / 'profile'}"]
    res = subprocess.run([*common, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    shot = tmp / "shot.png"
    subprocess.run([*common, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=180, check=True)
    return res.stdout, console, shot


def charts_by_section(dom: str) -> dict[str, int]:
    """Rendered plotly charts (an svg drawn by plotly.js) per report section."""
    out: dict[str, int] = {}
    for m in re.finditer(r'<figure[^>]*data-section="(\w+)"(.*?)</figure>', dom, re.S):
        if "main-svg" in m.group(2):
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def not_blank(shot: Path) -> float:
    """The share of the screenshot's pixels that are not background."""
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    return float((px < 235).mean())


@pytest.fixture(scope="module")
def history(tmp_path_factory, demo_base):
    """The demo after a rejected prune attempt, `mvc compress run bird-bone` and a scores file."""
    path = tmp_path_factory.mktemp("report") / "repo"
    shutil.copytree(demo_base, path)
    res = mvc("compress", "prune", "--method", "magnitude", "--sparsity", "0.9", "--waves", "2",
              "--max-drop", "1%", cwd=path, ok=False)
    assert res.exit_code == 1 and "refs/attempts/main/1" in res.output, res.output
    res = mvc("compress", "run", "bird-bone", cwd=path)
    assert "recipe bird-bone: finished" in res.output
    mvc("compress", "score", "--method", "magnitude", "HEAD~1", "-o", str(path.parent / "scores.json"), cwd=path)
    return path


def test_report_of_bird_bone(history, chromium, tmp_path):
    out = tmp_path / "report.html"
    res = mvc_proc("report", "-o", out, "--scores", history.parent / "scores.json", cwd=history)
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}" in res.stdout
    text = out.read_text()
    assert out.stat().st_size < 20 * 2**20
    assert not EXTERNAL.search(text), EXTERNAL.search(text).group(0)
    repo = _open(history)
    head = repo.refs.head_commit()
    steps = [e for e in repo.log() if e.commit.op]
    attempt = repo.backend.list_refs("refs/attempts/")["refs/attempts/main/1"]
    dom, console, shot = render(chromium, out, tmp_path)
    assert console == []
    charts = charts_by_section(dom)
    for section in ("timeline", "layers", "importance", "waves", "storage"):
        assert charts.get(section, 0) >= 1, charts
    assert sum(charts.values()) >= 3
    assert not_blank(shot) > 0.02
    # the report names every step's kind and commit, the head, and the rejected attempt
    assert head in dom
    for e in steps:
        assert f"c-{e.oid}" in dom and e.commit.op["op"] in dom
    assert {"shed", "prune", "heal", "quantize"} <= {e.commit.op["op"] for e in steps}
    assert f"c-{attempt}" in dom and "refs/attempts/main/1" in dom
    # the guard each step recorded is drawn, and every chart has its numbers as a table
    assert all(e.commit.op.get("guard") for e in steps)
    assert "guard (" in dom
    assert dom.count("<details class=\"data\">") + dom.count("<details class=data>") >= sum(charts.values()) - 2


def test_report_data_matches_the_history(history):
    from mvc.report import build

    repo = _open(history)
    rep = build(repo, None, str(history.parent / "scores.json"))
    ids = [c.id for c in rep.commits if c.status == "history"]
    assert ids == [e.oid for e in reversed(repo.log())]
    assert rep.head == repo.refs.head_commit() and rep.metric == "ppl"
    for c in rep.commits:  # every step commit's metric is its op record's
        if c.op:
            assert c.metric == c.op["metrics"]["after"]["ppl"]
    (prune,) = [s for s in rep.waves if s["op"] == "prune" and s["of"] == 4]
    assert [w["wave"] for w in prune["waves"]] == [1, 2, 3, 4]
    assert prune["max_drop"] == 0.4 and prune["spike_z"] == 4
    # z-scores as the runner computes them: none before the third wave
    assert prune["waves"][0]["z"] is None and prune["waves"][1]["z"] is None
    assert prune["waves"][2]["z"] is not None
    (rejected,) = [s for s in rep.waves if s["waves"][-1]["status"] == "attempt"]
    assert rejected["op"] == "prune" and rejected["waves"][-1]["drop"] > 0.01
    # heatmaps: head quantized (nf4 everywhere), sparsity read before it, half the weights zero
    rng = rep.layers["range"]
    assert {m for row in rng["method"]["values"] for m in row} == {"nf4"}
    assert rep.layers["sparsity_at"] != rep.head
    sparsity = [v for row in rng["sparsity"]["values"] for v in row]
    assert all(0.45 <= v <= 0.55 for v in sparsity), sparsity
    assert rng["sparsity"]["roles"] == ["q", "k", "v", "o", "gate", "up", "down"]
    # storage: what each commit added is what `mvc show --stat` reports
    from mvc.graph import added_by

    for c, row in zip(rep.commits, rep.storage["commits"]):
        assert row["stored"] == added_by(repo, c.id)["stored"]
    assert rep.scores["method"] == "magnitude" and len(rep.scores["layers"]) == 4


def test_report_of_plain_commits(tmp_path, chromium, rng):
    """No compression history: storage and commits sections, no errors; the Python API."""
    work = tmp_path / "w"
    mvc("init", work)
    write_safetensors(work / "m.safetensors", {"a": ("BF16", (64, 64), bf16(rng, (64, 64)))})
    mvc("commit", "-m", "one", cwd=work)
    write_safetensors(work / "m.safetensors", {"a": ("BF16", (64, 64), bf16(rng, (64, 64))),
                                               "b": ("BF16", (8, 8), bf16(rng, (8, 8)))})
    mvc("commit", "-m", "two", cwd=work)
    repo = _open(work)
    out = tmp_path / "plain.html"
    rep = repo.report(None, str(out))
    assert [c.message.strip() for c in rep.commits] == ["one", "two"]
    dom, console, shot = render(chromium, out, tmp_path)
    assert console == []
    charts = charts_by_section(dom)
    assert charts.get("storage", 0) >= 1 and "timeline" not in charts and "waves" not in charts
    assert 'id="commits"' in dom and repo.refs.head_commit() in dom
    assert not_blank(shot) > 0.02


def test_diff_html_reuses_the_heatmaps(history, chromium, tmp_path):
    out = tmp_path / "d.html"
    repo = _open(history)
    shed = next(e.oid for e in repo.log() if (e.commit.op or {}).get("op") == "shed")
    mvc("diff", f"{shed}~1", shed, "--html", out, cwd=history)
    dom, console, _ = render(chromium, out, tmp_path)
    assert console == []
    assert charts_by_section(dom).get("layers", 0) >= 3
    assert "reshaped" in dom  # shedding changed the MLP's shapes


@pytest.mark.parametrize("args, message", [
    (["HEAD..HEAD"], "no commits in HEAD..HEAD"),
    (["nosuchrev"], "nosuchrev"),
    (["--scores", "bad.json"], "bad.json is not JSON"),
    (["--scores", "list.json"], "has no \"layers\" list"),
    (["--scores", "missing.json"], "cannot read missing.json"),
    (["-o", "no/such/dir/r.html"], "cannot write no/such/dir/r.html"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, rng, args, message):
    work = tmp_path / "w"
    mvc("init", work)
    write_safetensors(work / "m.safetensors", {"a": ("F32", (4,), f32(rng, (4,)))})
    mvc("commit", "-m", "one", cwd=work)
    (work / "bad.json").write_text("{not json")
    (work / "list.json").write_text(json.dumps({"layers": 3}))
    res = mvc_proc("report", *args, cwd=work)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not (work / "report.html").exists() and not list(work.glob("*.mvc-tmp"))


@pytest.mark.parametrize("name, want", [
    ("model.layers.3.self_attn.q_proj.weight", (3, "q")),
    ("model.layers.12.mlp.down_proj.weight", (12, "down")),
    ("model.layers.0.mlp.gate_proj.weight.qweight", (0, "gate")),
    ("transformer.h.2.attn.c_attn.weight", (2, "qkv")),
    ("transformer.h.2.mlp.c_proj.weight", (2, "down")),
    ("transformer.h.2.attn.c_proj.weight", (2, "o")),
    ("bert.encoder.layer.1.attention.self.key.weight", (1, "k")),
    ("bert.encoder.layer.1.attention.output.dense.weight", (1, "o")),
    ("bert.encoder.layer.1.output.dense.weight", (1, "down")),
    ("model.layers.0.input_layernorm.weight", None),
    ("model.layers.0.self_attn.q_proj.weight.absmax", None),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
])
def test_layer_and_role_of_a_name(name, want):
    assert layer_role(name) == want


def test_waves_group_steps_and_score_spikes():
    from mvc.compress.runner import spike
    from mvc.report.data import CommitInfo

    ppl = [10.0, 10.1, 10.3, 10.6, 13.0]
    commits = [CommitInfo("b", "", 0, [], None, "history", metric=ppl[0])]
    for k in range(1, 5):
        op = {"op": "prune", "method": "m", "params": {"wave": [k, 4], "strength": k / 4},
              "metrics": {"before": {"ppl": ppl[k - 1]}, "after": {"ppl": ppl[k]}},
              "guard": {"max_drop": 0.5, "spike_z": 3}}
        commits.append(CommitInfo(f"w{k}", "", k, [commits[-1].id], op, "history" if k < 4 else "attempt",
                                  metric=ppl[k]))
    (step,) = waves(commits, "ppl")
    assert [w["commit"] for w in step["waves"]] == ["w1", "w2", "w3", "w4"]
    assert step["before"] == 10.0 and step["max_drop"] == 0.5
    assert step["waves"][3]["z"] == pytest.approx(spike(ppl, 1.0)) and step["waves"][3]["z"] > 3
    assert step["waves"][3]["drop"] == pytest.approx(0.3)


def test_cluster_adaptive_pruning_is_recorded_and_drawn(demo, chromium, tmp_path):
    mvc("compress", "prune", "--method", "magnitude", "--sparsity", "0.3", "--clusters", "3", "--max-drop", "off",
        cwd=demo)
    repo = _open(demo)
    op = repo.commit_obj(repo.refs.head_commit()).op
    detail = op["params"]["cluster_detail"]
    q = detail["model.layers.0.self_attn.q_proj.weight"]
    assert len(detail) == 28 and 1 <= len(q["rows"]) <= 3 and sum(q["rows"]) == 128
    assert q["mean_score"] == sorted(q["mean_score"])
    assert all(t is None or t <= 1 for t in q["threshold"])
    out = tmp_path / "c.html"
    rep = repo.report(None, str(out))
    assert rep.clusters["commit"] == repo.refs.head_commit() and len(rep.clusters["matrices"]) == 28
    dom, console, _ = render(chromium, out, tmp_path)
    assert console == [] and charts_by_section(dom).get("importance") == 1
    assert "clusters of cluster-adaptive pruning" in dom


def test_hostile_op_records_and_messages_are_drawn_as_text(tmp_path, chromium, rng):
    """Op records and messages come from other repositories: wrong types and markup neither break
    the report nor run in it."""
    from mvc.store.objects import Commit

    work = tmp_path / "w"
    mvc("init", work)
    write_safetensors(work / "m.safetensors", {"model.layers.0.mlp.up_proj.weight": ("F32", (4, 4), f32(rng, (16,)))})
    mvc("commit", "-m", "base", cwd=work)
    repo = _open(work)
    head = repo.refs.head_commit()
    evil = "<img src=x onerror=alert(1)></script><script>alert(2)</script>"
    ops = [{"op": ["prune"], "method": {"x": 1}, "params": [1, 2], "metrics": "high", "guard": 3},
           {"op": evil, "method": evil, "params": {"wave": [1, 2], "strength": "s"},
            "metrics": {"before": {"ppl": 10.0}, "after": {"ppl": 11.0}}, "guard": {"max_drop": "x"}}]
    for op in ops:
        c = Commit(repo.commit_obj(head).tree, (head,), "me <me@x>", 1, 0, evil, op)
        oid = repo.odb.put(c)
        repo.refs.set_ref("refs/heads/main", oid, head, "test")
        head = oid
    out = tmp_path / "h.html"
    repo.report(None, str(out))
    text = out.read_text()
    assert "<script>alert(2)" not in text and "<img src=x" not in text
    dom, console, _ = render(chromium, out, tmp_path)
    assert console == [] and "alert" not in "".join(console)
    assert "<img src=\"x\"" not in dom and "<script>alert" not in dom


def test_no_tensor_stats_reads_no_values(history, tmp_path, monkeypatch):
    from mvc.report import build
    from mvc.store.odb import ObjectDB

    def no_chunks(self, *a, **k):
        raise AssertionError("a chunk was read")

    monkeypatch.setattr(ObjectDB, "read_chunk", no_chunks)
    monkeypatch.setattr(ObjectDB, "read_chunks", no_chunks)
    rep = build(_open(history), None, read_tensors=False)
    rng = rep.layers["range"]
    assert all(v is None for row in rng["sparsity"]["values"] for v in row)
    assert {m for row in rng["method"]["values"] for m in row} == {"nf4"}
    res = mvc_proc("report", "--no-tensor-stats", "-o", tmp_path / "q.html", cwd=history)
    assert res.returncode == 0 and "sparsity (fraction" not in (tmp_path / "q.html").read_text()
