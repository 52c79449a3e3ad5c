"""Compression steps on the shipped demo model: evaluation, scoring, pruning, shedding, guards, waves."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from mvc import Repo
from mvc.compress import prune, shed
from mvc.compress import runner as ops
from mvc.compress.evaluate import evaluate, make_spec
from mvc.compress.runner import StepOptions
from tests.helpers import mvc, sha256
from tests.helpers import open_repo as _open

INF = float("inf")




def _matrices(repo, rev):
    t = repo.load(rev, path="model.safetensors")
    return {k: v for k, v in t.items() if ".layers." in k and v.dim() == 2}


# -- the shipped model and evaluation -----------------------------------------------------------
def test_demo_model_is_far_better_than_random(demo):
    res = mvc("eval", "--json", cwd=demo)
    first = json.loads(res.output)
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    assert first["ppl"] < vocab / 5  # a uniform guess scores the vocabulary size
    assert first["cached"] is False
    again = json.loads(mvc("eval", "--json", cwd=demo).output)
    assert again["cached"] is True and again["ppl"] == first["ppl"]
    other = json.loads(mvc("eval", "--json", "--tokens", "1024", cwd=demo).output)
    assert other["cached"] is False and other["tokens"] <= 1024


def test_demo_init_records_evaluation_and_history(demo):
    repo = _open(demo)
    assert repo.config["eval"]["ppl"] == "eval.txt"
    assert repo.config["calib"]["text"] == "calib.txt"
    assert len(repo.log()) == 1
    res = mvc("init", "--demo", str(demo), ok=False)
    assert res.exit_code != 0 and "already" in res.output


# -- pruning ------------------------------------------------------------------------------------
def test_wanda_and_sparsegpt_beat_magnitude_at_half_sparsity(demo):
    repo = _open(demo)
    spec = make_spec(repo)
    base = repo.refs.head_commit()
    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = prune.run(repo, StepOptions(spec, max_drop=INF), method, 0.5)
        (wave,) = out.waves
        assert wave.accepted and out.head == wave.commit
        ppl[method] = wave.metrics["ppl"]
        for name, w in _matrices(repo, out.head).items():
            zeros = int((w == 0).sum())
            assert zeros >= w.numel() // 2, name
            assert zeros <= w.numel() // 2 + w.shape[0], name  # exact counts, rounding per row or block at most
        repo.reset(base, hard=True)
    assert ppl["wanda"] < ppl["magnitude"]
    assert ppl["sparsegpt"] < ppl["magnitude"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_layer_by_layer_inputs_prune_exactly_as_whole_model_passes(demo, method):
    """LayerInputs runs each decoder layer on its own; measuring each layer through whole-model
    passes (as before) gives the same inputs: the same pruned weights, bit for bit."""
    from mvc.compress.calib import collect_inputs, make_calib, windows
    from mvc.compress.model import Model, open_source

    repo = _open(demo)
    cal = make_calib(repo, None)

    def whole_model_passes(model, linears):
        batches = windows(repo, model, cal)
        for layer in sorted({li.layer for li in linears}):
            group = [li for li in linears if li.layer == layer]
            stats = collect_inputs(model, group, batches, gram=method == "sparsegpt")
            for li in group:
                w = li.weight()
                if method == "sparsegpt":
                    prune.sparsegpt(w, stats[li.name].gram, stats[li.name].n, 0.5)
                else:
                    w[prune.mask_for(w.abs().float() * stats[li.name].sq.sqrt().float()[None, :], 0.5, "row")] = 0
                model.round_to_stored(li)

    models = []
    for way in ("layer by layer", "whole model"):
        model = Model(repo, open_source(repo, "HEAD"))
        lin = model.linears(["model.layers.[13].*"])  # two layers, one skipped between them
        if way == "whole model":
            whole_model_passes(model, lin)
        else:
            prune.apply_masks(repo, model, lin, method, lambda _n: 0.5, calib=cal)
        models.append(model)
    a, b = (m.state() for m in models)
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], models[0].originals[k])]
    assert len(changed) == 14  # 7 matrices in each of layers 1 and 3
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_2_of_4_masks_are_exact(demo, method):
    res = mvc("compress", "prune", "--method", method, "--pattern", "2:4", "--max-drop", "off", cwd=demo)
    assert "landed" in res.output
    repo = _open(demo)
    for name, w in _matrices(repo, "HEAD").items():
        groups = w.reshape(w.shape[0], -1, 4)
        assert bool(((groups == 0).sum(-1) >= 2).all()), name
        assert int((w == 0).sum()) == w.numel() // 2, name  # the trained weights have no zeros of their own
    op = repo.commit_obj(repo.refs.head_commit()).op
    assert op["params"]["pattern"] == "2:4" and op["method"] == method


def test_layer_sparsity_and_clusters(demo):
    repo = _open(demo)
    spec = make_spec(repo)
    out = prune.run(repo, StepOptions(spec, max_drop=INF), "magnitude", 0.5, layer_sparsity=["model.layers.0.*=0.25"],
                    clusters=3)
    assert out.waves[0].accepted
    for name, w in _matrices(repo, "HEAD").items():
        frac = float((w == 0).sum()) / w.numel()
        want = 0.25 if name.startswith("model.layers.0.") else 0.5
        assert abs(frac - want) < 0.01, (name, frac)
    assert repo.commit_obj(out.head).op["params"]["clusters"] == 3


def test_dry_run_writes_nothing(demo):
    repo = _open(demo)
    before = (dict(repo.backend.list_refs("")), repo.backend.stats()["objects"] if hasattr(repo.backend, "stats")
              else None)
    repo.close()
    res = mvc("compress", "prune", "--method", "wanda", "--sparsity", "0.5", "--dry-run", cwd=demo)
    assert "would be zeroed" in res.output and "425984/851968" in res.output
    res = mvc("compress", "shed", "--neurons", "0.25", "--dry-run", cwd=demo)
    assert "384 per layer, 96 removed" in res.output
    repo = _open(demo)
    assert dict(repo.backend.list_refs("")) == before[0]
    assert not os.path.exists(demo / ".mvc" / "tmp") or not os.listdir(demo / ".mvc" / "tmp")


# -- guards and waves ---------------------------------------------------------------------------
def test_max_drop_rejects_a_90_percent_prune_and_keeps_the_attempt(demo):
    repo = _open(demo)
    head = repo.refs.head_commit()
    h = sha256(demo / "model.safetensors")
    repo.close()
    res = mvc("compress", "prune", "--method", "magnitude", "--sparsity", "0.9", cwd=demo, ok=False)
    assert res.exit_code == 1
    assert "rejected" in res.output and "refs/attempts/main/1" in res.output
    repo = _open(demo)
    assert repo.refs.head_commit() == head
    assert sha256(demo / "model.safetensors") == h
    attempt = repo.refs.get("refs/attempts/main/1")
    op = repo.commit_obj(attempt).op
    assert repo.commit_obj(attempt).parents == (head,)
    assert op["metrics"]["after"]["ppl"] > op["metrics"]["before"]["ppl"] * 1.03
    assert repo.resolve("refs/attempts/main/1") == attempt
    assert mvc("status", cwd=demo).output.strip().endswith("clean")


def test_waves_make_at_most_five_commits_each_with_metrics(demo):
    repo = _open(demo)
    base = repo.refs.head_commit()
    repo.close()
    res = mvc("compress", "prune", "--method", "sparsegpt", "--sparsity", "0.6", "--waves", "5", cwd=demo, ok=False)
    repo = _open(demo)
    new = [e for e in repo.log() if e.oid != base]
    assert 1 <= len(new) <= 5
    strengths = []
    for e in new:
        op = e.commit.op
        assert op["op"] == "prune" and op["method"] == "sparsegpt"
        assert op["metrics"]["before"]["ppl"] > 0 and op["metrics"]["after"]["ppl"] > 0
        assert op["params"]["wave"][1] == 5 and op["tool"].startswith("mvc ")
        assert op["wall_s"] >= 0 and op["seed"] == 0
        strengths.append(op["params"]["strength"])
    assert strengths == sorted(strengths, reverse=True)  # newest first, each wave stronger
    if len(new) < 5:  # a guard stopped the run: it says so, exits 1, and keeps the attempt
        assert res.exit_code == 1 and repo.refs.get("refs/attempts/main/1")
    else:
        assert res.exit_code == 0


def test_loss_spike_z_score():
    assert ops.spike([10, 10.1, 10.2], 3) is None  # too little history
    z = ops.spike([10, 10.1, 10.2, 10.3, 20.0], 3)
    assert z is not None and z > 3
    assert ops.spike([10, 10.1, 10.2, 10.3, 10.41], 3) < 3
    assert ops.spike([10, 10.1, 10.2, 10.3, 20.0], 0) is None  # disabled


def test_spike_stops_waves_and_branch_stays_at_last_good_wave(demo, monkeypatch):
    repo = _open(demo)
    spec = make_spec(repo)
    monkeypatch.setattr(ops, "spike", lambda values, z: 99.0 if len(values) == 4 else None)
    out = prune.run(repo, StepOptions(spec, waves=4, max_drop=INF), "magnitude", 0.3)
    assert [w.accepted for w in out.waves] == [True, True, False]
    assert repo.refs.head_commit() == out.waves[1].commit
    assert "spike" in out.waves[2].reason and out.attempt


# -- shedding ------------------------------------------------------------------------------------
def test_shed_a_quarter_of_mlp_neurons_loads_in_transformers(demo):
    from transformers import AutoModelForCausalLM

    res = mvc("compress", "shed", "--neurons", "0.25", "--max-drop", "off", cwd=demo)
    assert "landed" in res.output
    cfg = json.loads((demo / "config.json").read_text())
    assert cfg["intermediate_size"] == 288
    model = AutoModelForCausalLM.from_pretrained(str(demo))
    for layer in model.model.layers:
        assert tuple(layer.mlp.up_proj.weight.shape) == (288, 128)
        assert tuple(layer.mlp.down_proj.weight.shape) == (128, 288)
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(out.logits).all()
    repo = _open(demo)
    op = repo.commit_obj(repo.refs.head_commit()).op
    assert op["op"] == "shed" and all(len(v) == 96 for v in op["params"]["removed"]["neurons"].values())


def test_shed_heads_keeps_config_valid(demo):
    res = mvc("compress", "shed", "--heads", "0.25", cwd=demo, ok=False)
    assert res.exit_code != 0 and "cannot express" in res.output and "0.5" in res.output
    mvc("compress", "shed", "--heads", "0.5", "--max-drop", "off", cwd=demo)
    cfg = json.loads((demo / "config.json").read_text())
    assert cfg["num_attention_heads"] == 2 and cfg["head_dim"] == 32
    repo = _open(demo)
    t = repo.load("HEAD", names=["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"])
    assert tuple(t["model.layers.0.self_attn.q_proj.weight"].shape) == (64, 128)
    assert tuple(t["model.layers.0.self_attn.o_proj.weight"].shape) == (128, 64)
    assert evaluate(repo, "HEAD", make_spec(repo))["ppl"] > 0


def test_min_keep_protects_every_layer(demo):
    repo = _open(demo)
    plan = shed.plan(repo, "HEAD", 0.99, 0.0, min_keep=100)
    assert plan["neurons"] == (384, 284)


# -- reverting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [["prune", "--method", "wanda", "--sparsity", "0.5"],
                                  ["shed", "--neurons", "0.25"]])
def test_every_step_reverts_bit_exactly(demo, step):
    files = ("model.safetensors", "config.json")
    before = {f: sha256(demo / f) for f in files}
    mvc("compress", *step, "--max-drop", "off", cwd=demo)
    assert sha256(demo / "model.safetensors") != before["model.safetensors"]
    mvc("revert", "HEAD", cwd=demo)
    assert {f: sha256(demo / f) for f in files} == before
    repo = _open(demo)
    assert repo.commit_obj(repo.refs.head_commit()).tree == repo.commit_obj(repo.resolve("HEAD~2")).tree


def test_op_record_in_log_json_and_show(demo):
    mvc("compress", "prune", "--method", "magnitude", "--sparsity", "0.2", "--max-drop", "off", cwd=demo)
    log = json.loads(mvc("log", "--json", cwd=demo).output)
    op = log[0]["op"]
    assert op["op"] == "prune" and op["params"]["sparsity"] == 0.2 and op["scope"] == ["*"]
    assert set(op["metrics"]) >= {"before", "after"} and "ppl" in op["metrics"]["after"]
    assert "op: prune (magnitude)" in mvc("show", cwd=demo).output
    assert "[prune]" in mvc("log", "--oneline", cwd=demo).output


# -- scoring --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "taylor", "fisher", "wanda"])
def test_score_reports_every_structure(demo, tmp_path, method):
    out = tmp_path / "scores.json"
    mvc("compress", "score", "--method", method, "-o", out, cwd=demo)
    report = json.loads(out.read_text())
    assert report["method"] == method and len(report["layers"]) == 4
    for row in report["layers"]:
        assert len(row["neurons"]) == 384 and len(row["heads"]) == 4
        assert min(row["neurons"]) >= 0 and max(row["neurons"]) > 0
    csv = tmp_path / "scores.csv"
    mvc("compress", "score", "--method", method, "-o", csv, cwd=demo)
    lines = csv.read_text().splitlines()
    assert lines[0] == "kind,layer,index,score" and len(lines) == 1 + 4 * (384 + 4)


def test_score_element_export(demo, tmp_path):
    from safetensors.torch import load_file

    el = tmp_path / "el.safetensors"
    mvc("compress", "score", "--method", "wanda", "--elements", el, cwd=demo)
    scores = load_file(str(el))
    w = _matrices(_open(demo), "HEAD")
    assert set(scores) == set(w)
    assert all(scores[k].shape == w[k].shape for k in w)


# -- evaluation by command -----------------------------------------------------------------------
def test_cmd_evaluation_and_guard(demo):
    ok = mvc("eval", "--cmd", "test -f model.safetensors", cwd=demo)
    assert "pass" in ok.output
    bad = mvc("eval", "--cmd", "test -f nothing-here", cwd=demo, ok=False)
    assert bad.exit_code == 1 and "fail" in bad.output
    repo = _open(demo)
    head = repo.refs.head_commit()
    repo.close()
    res = mvc("compress", "prune", "--sparsity", "0.3", "--cmd", "false", cwd=demo, ok=False)
    assert res.exit_code == 1 and "evaluation command failed" in res.output
    assert _open(demo).refs.head_commit() == head


# -- bad input -----------------------------------------------------------------------------------
def _unchanged(demo, fn):
    repo = _open(demo)
    head, refs = repo.refs.head_commit(), dict(repo.backend.list_refs(""))
    repo.close()
    res = fn()
    assert res.exit_code not in (0, 1) or "error:" in res.output
    assert "Traceback" not in res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1
    repo = _open(demo)
    assert repo.refs.head_commit() == head and dict(repo.backend.list_refs("")) == refs
    return res


def test_sparsity_outside_range(demo):
    for s in ("1.0", "-0.1", "1.5"):
        res = _unchanged(demo, lambda s=s: mvc("compress", "prune", "--sparsity", s, cwd=demo, ok=False))
        assert "outside [0, 1)" in res.output


def test_missing_evaluation_file(demo):
    res = _unchanged(demo, lambda: mvc("compress", "prune", "--sparsity", "0.5", "--ppl", "nope.txt",
                                       cwd=demo, ok=False))
    assert "nope.txt" in res.output and "does not exist" in res.output
    res = _unchanged(demo, lambda: mvc("compress", "prune", "--method", "wanda", "--sparsity", "0.5",
                                       "--calib", "missing.txt", cwd=demo, ok=False))
    assert "missing.txt" in res.output


def test_unknown_architecture(demo):
    cfg = json.loads((demo / "config.json").read_text())
    cfg["model_type"] = "resnet"
    (demo / "config.json").write_text(json.dumps(cfg))
    mvc("commit", "-m", "not a transformer", cwd=demo)
    res = _unchanged(demo, lambda: mvc("compress", "prune", "--sparsity", "0.5", cwd=demo, ok=False))
    assert "unknown architecture 'resnet'" in res.output


def test_already_quantized(demo):
    cfg = json.loads((demo / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (demo / "config.json").write_text(json.dumps(cfg))
    mvc("commit", "-m", "claims to be quantized", cwd=demo)
    res = _unchanged(demo, lambda: mvc("compress", "prune", "--sparsity", "0.5", cwd=demo, ok=False))
    assert "already quantized" in res.output


def test_dirty_work_tree_is_refused(demo):
    with open(demo / "config.json", "a") as f:
        f.write("\n")
    res = _unchanged(demo, lambda: mvc("compress", "prune", "--sparsity", "0.5", cwd=demo, ok=False))
    assert "uncommitted" in res.output


# -- other architectures -------------------------------------------------------------------------
def _save_model(path, model, tokenizer_from=None):
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer_from:
        shutil.copy(os.path.join(tokenizer_from, "tokenizer.json"), path / "tokenizer.json")


@pytest.mark.parametrize("kind", ["gpt2", "mistral", "bert"])
def test_other_architectures_prune_and_shed(tmp_path, kind):
    import transformers as T

    from mvc.compress.demo_model import DEMO_DIR

    torch.manual_seed(0)
    if kind == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=1024, n_embd=64, n_layer=2, n_head=4, n_positions=128))
    elif kind == "mistral":
        model = T.MistralForCausalLM(T.MistralConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2, max_position_embeddings=128))
    else:
        model = T.BertForMaskedLM(T.BertConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=128))
    work = tmp_path / kind
    work.mkdir()
    _save_model(work, model, DEMO_DIR)
    shutil.copy(os.path.join(DEMO_DIR, "eval.txt"), work / "eval.txt")
    shutil.copy(os.path.join(DEMO_DIR, "calib.txt"), work / "calib.txt")
    mvc("init", work)
    mvc("commit", "-m", kind, cwd=work)
    ev = ["--cmd", "true"] if kind == "bert" else ["--ppl", "eval.txt", "--tokens", "512", "--seq-len", "64"]
    for method in ("magnitude", "wanda", "sparsegpt"):
        mvc("compress", "prune", "--method", method, "--sparsity", "0.5", "--calib", "calib.txt",
            "--max-drop", "off", *ev, cwd=work)
        mvc("reset", "--hard", "HEAD~1", cwd=work)
    mvc("compress", "shed", "--neurons", "0.5", "--calib", "calib.txt", "--max-drop", "off", *ev, cwd=work)
    cfg = json.loads((work / "config.json").read_text())
    width = cfg.get("n_inner") or cfg.get("intermediate_size")
    assert width == (128 if kind == "gpt2" else 64)
    loaded = type(model).from_pretrained(str(work))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(loaded(input_ids=ids).logits).all()
    for name, w in Repo(str(work)).load("HEAD", path="model.safetensors").items():
        if kind == "gpt2" and name.endswith("mlp.c_fc.weight"):
            assert w.shape[1] == width
        if kind == "bert" and name.endswith("intermediate.dense.weight"):
            assert w.shape[0] == width


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_from_the_store_equals_the_model_in_memory(demo, method):
    """`mvc compress prune` runs from the store a decoder layer at a time; the model in memory
    (Model + apply_masks) gives the same tensors bit for bit and the same perplexity."""
    from mvc.compress.calib import make_calib
    from mvc.compress.evaluate import perplexity, text_windows
    from mvc.compress.model import Model, open_source

    repo = _open(demo)
    spec = make_spec(repo)
    src = open_source(repo, "HEAD")
    model = Model(repo, src)
    prune.apply_masks(repo, model, model.linears(), method, lambda _n: 0.5, calib=make_calib(repo, None))
    out = prune.run(repo, StepOptions(spec, max_drop=math.inf), method, 0.5)
    stored = repo.load(out.head, path="model.safetensors")
    state = model.state()
    assert stored.keys() == state.keys()
    assert all(torch.equal(stored[k], state[k]) for k in state)
    windows = text_windows(repo, src, spec.text, spec.tokens, spec.seq_len)
    assert repo.commit_obj(out.head).op["metrics"]["after"]["ppl"] == perplexity(model.model, windows)


@pytest.mark.parametrize("kind", ["llama", "llama-nf4", "llama-rtn-int4", "gpt2", "mistral"])
def test_layer_by_layer_perplexity_is_the_whole_models(demo, tmp_path, kind):
    """`mvc eval` measures from the store one decoder layer at a time: the same number as the
    whole model in memory, to the last bit (dequantized layers included)."""
    import transformers as T

    from mvc.compress import layerwise, quantize
    from mvc.compress.demo_model import DEMO_DIR
    from mvc.compress.evaluate import perplexity, text_windows
    from mvc.compress.model import Model, open_source

    work = demo
    if kind in ("gpt2", "mistral"):
        torch.manual_seed(0)
        model = (T.GPT2LMHeadModel(T.GPT2Config(vocab_size=1024, n_embd=64, n_layer=3, n_head=4, n_positions=128))
                 if kind == "gpt2" else
                 T.MistralForCausalLM(T.MistralConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=3, num_attention_heads=4,
                                                      num_key_value_heads=2, max_position_embeddings=128)))
        work = tmp_path / kind
        work.mkdir()
        _save_model(work, model, DEMO_DIR)
        shutil.copy(os.path.join(DEMO_DIR, "eval.txt"), work / "eval.txt")
        mvc("init", work)
        mvc("commit", "-m", kind, cwd=work)
    repo = _open(work)
    if kind.startswith("llama-"):
        quantize.run(repo, StepOptions(make_spec(repo), max_drop=math.inf), kind[len("llama-"):])
    src = open_source(repo, "HEAD", allow_quantized=True)
    windows = text_windows(repo, src, str(work / "eval.txt"), 1024, 64)
    whole = perplexity(Model(repo, src).model, windows)
    assert layerwise.perplexity(repo, src, windows) == whole
    assert 1 < whole < 2000


def test_heads_of_gpt2_are_refused(tmp_path):
    import transformers as T

    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    work = tmp_path / "g"
    work.mkdir()
    _save_model(work, model)
    mvc("init", work)
    mvc("commit", "-m", "gpt2", cwd=work)
    res = mvc("compress", "shed", "--heads", "0.5", "--cmd", "true", cwd=work, ok=False)
    assert res.exit_code != 0 and "cannot express fewer heads" in res.output


def test_math_sanity_of_sparsegpt_on_a_known_problem():
    """SparseGPT's update must not be worse than zeroing the same weights without updating the rest."""
    from mvc.compress.prune import sparsegpt

    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 3, 64)
    W = torch.randn(32, 64, generator=g)
    W2 = W.clone()
    mask = sparsegpt(W2, X.t() @ X, X.shape[0], 0.5)
    assert int(mask.sum()) == W.numel() // 2 and bool((W2[mask] == 0).all())
    plain = W.clone()
    plain[mask] = 0
    err_obs = ((X @ (W2 - W).t()) ** 2).sum()
    err_plain = ((X @ (plain - W).t()) ** 2).sum()
    assert err_obs < err_plain
    assert math.isfinite(float(err_obs))


def test_bisect_run_uses_the_default_evaluation(demo):
    repo = _open(demo)
    spec = make_spec(repo)
    base = repo.refs.head_commit()
    base_ppl = evaluate(repo, base, spec)["ppl"]
    commits = []
    for s in (0.1, 0.2, 0.8, 0.82):  # the planted regression: the jump to 80 %
        commits.append(prune.run(repo, StepOptions(spec, max_drop=INF), "magnitude", s).head)
    repo.close()
    mvc("bisect", "start", "HEAD", base, cwd=demo)
    res = mvc("bisect", "run", "--threshold", f"{base_ppl * 1.5:.3f}", cwd=demo)
    assert f"{commits[2]} is the first bad commit" in res.output
    mvc("bisect", "reset", cwd=demo)
    res = mvc("bisect", "run", cwd=demo, ok=False)
    assert res.exit_code != 0


def test_old_checkpoint_buffers_are_kept(tmp_path):
    """Checkpoints saved by older transformers hold BERT's `position_ids` buffer (all-MiniLM-L6-v2
    does): loading ignores it as transformers does, and the compressed file keeps it unchanged."""
    import transformers as T
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64))
    work = tmp_path / "bert"
    work.mkdir()
    model.save_pretrained(str(work), safe_serialization=True)
    state = load_file(str(work / "model.safetensors"))
    state["embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
    mvc("init", work)
    mvc("commit", "-m", "old bert", cwd=work)
    mvc("compress", "prune", "--sparsity", "0.5", "--cmd", "true", "--max-drop", "off", cwd=work)
    after = load_file(str(work / "model.safetensors"))
    assert torch.equal(after["embeddings.position_ids"], state["embeddings.position_ids"])
    assert float((after["encoder.layer.0.intermediate.dense.weight"] == 0).float().mean()) == 0.5


def test_eval_of_the_work_tree(demo):
    from safetensors.torch import load_file, save_file

    head_ppl = json.loads(mvc("eval", "--json", cwd=demo).output)["ppl"]
    clean = json.loads(mvc("eval", "--work-tree", "--json", cwd=demo).output)
    assert clean["ppl"] == head_ppl and clean["cached"] is True  # an unchanged work tree is HEAD's tree
    t = load_file(str(demo / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.weight"][:] = 0
    save_file(t, str(demo / "model.safetensors"), metadata={"format": "pt"})
    repo = _open(demo)
    refs = dict(repo.backend.list_refs(""))
    repo.close()
    dirty = json.loads(mvc("eval", "--work-tree", "--json", cwd=demo).output)
    assert dirty["ppl"] > head_ppl * 1.5 and dirty["rev"] != clean["rev"]
    repo = _open(demo)
    assert dict(repo.backend.list_refs("")) == refs  # nothing moved; the snapshot is unreferenced
    assert repo.commit_obj(dirty["rev"]).parents == (repo.refs.head_commit(),)
    assert "model.safetensors" in mvc("status", "--short", cwd=demo).output
