"""Compression part 2 on the shipped demo model: quantization, factorization, healing, recipes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mvc.compress import factorize, heal, prune, quantize
from mvc.compress.evaluate import evaluate, make_spec
from mvc.compress.runner import StepOptions
from mvc.graph import closure
from tests.helpers import mvc, mvc_cmd, sha256
from tests.helpers import open_repo as _open

INF = float("inf")
BIRD_BONE = Path(__file__).resolve().parent.parent / "mvc" / "compress" / "recipes" / "bird-bone.yaml"




def _stored_bytes(repo, commit: str) -> int:
    """Bytes in the store of everything *commit* reaches (its compressed size)."""
    reach = closure(repo.odb.get, [(commit, "commit")])
    return sum(len(repo.backend.get(bytes.fromhex(oid))) for oid in reach)


# -- quantization ----------------------------------------------------------------------------------
def test_nf4_and_int8_store_the_low_bit_form(demo):
    repo = _open(demo)
    spec = make_spec(repo)
    base = repo.refs.head_commit()
    parent = _stored_bytes(repo, base)
    limits = {"nf4": 0.35, "int8": 0.60}
    for method, limit in limits.items():
        before = repo.backend.stats()["stored_bytes"]
        out = quantize.run(repo, StepOptions(spec, max_drop=INF), method)
        added = repo.backend.stats()["stored_bytes"] - before
        assert added <= limit * parent, (method, added, parent)
        op = repo.commit_obj(out.head).op
        assert op["op"] == "quantize" and op["method"] == method
        assert op["metrics"]["before"]["ppl"] > 0 and op["metrics"]["after"]["ppl"] > 0
        t = repo.load(out.head, path="model.safetensors")
        q = t["model.layers.0.self_attn.q_proj.weight"]
        assert q.dtype == (torch.uint8 if method == "nf4" else torch.int8)
        repo.reset(base, hard=True)


def test_transformers_loads_nf4_and_matches_dequantized_load(demo):
    from transformers import AutoConfig, AutoModelForCausalLM

    mvc("compress", "quantize", "--method", "nf4", "--max-drop", "off", cwd=demo)
    cfg = json.loads((demo / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    q = AutoModelForCausalLM.from_pretrained(str(demo), device_map="cpu", dtype=torch.float32)
    assert type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # transformers keeps the unquantized parameters (embeddings, norms, LM head) in the stored bf16
    # whatever dtype= says; upcast them (exact) so both sides compute in float32
    for p in q.parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    # on CPUs with AVX512-BF16, bitsandbytes swaps in a bf16 kernel for no-grad inference (about 1 %
    # off); its reference path (dequantize, then a float32 matmul) is what must match
    for m in q.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        want = q(input_ids=ids).logits
    repo = _open(demo)
    state = repo.load("HEAD", path="model.safetensors", dequantize=True)
    plain_cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "transformers_version")}
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**plain_cfg)).float().eval()
    plain.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-3
    # and mvc evaluates the quantized commit from the store (no cache) to the value it recorded
    rec = repo.commit_obj(repo.refs.head_commit()).op["metrics"]["after"]["ppl"]
    assert evaluate(repo, "HEAD", make_spec(repo), use_cache=False)["ppl"] == pytest.approx(rec, rel=1e-6)


def test_rtn_int4_groups_and_mixed_bits(demo):
    repo = _open(demo)
    spec = make_spec(repo)
    orig = repo.load("HEAD", path="model.safetensors")
    out = quantize.run(repo, StepOptions(spec, max_drop=INF), "rtn-int4", group_size=64, bits={"model.layers.0.*": 8})
    raw = repo.load(out.head, path="model.safetensors")
    assert raw["model.layers.1.mlp.up_proj.weight.qweight"].shape == (384, 64)  # two int4 per byte
    assert raw["model.layers.0.mlp.up_proj.weight.qweight"].dtype == torch.int8
    deq = repo.load(out.head, path="model.safetensors", dequantize=True)
    assert set(deq) == set(orig)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        w, d = orig[name].float(), deq[name].float()
        assert d.shape == w.shape and deq[name].dtype == orig[name].dtype
        rel = ((d - w).norm() / w.norm()).item()
        assert rel < (0.01 if ".layers.0." in name else 0.15), (name, rel)
    assert torch.equal(deq["model.embed_tokens.weight"], orig["model.embed_tokens.weight"])


def test_quantize_bad_bit_widths(demo):
    repo = _open(demo)
    head = repo.refs.head_commit()
    repo.close()
    for args, needle in ((["--method", "rtn-int4", "--bits", "model.*=3"], "GLOB=4 or GLOB=8"),
                         (["--method", "nf4", "--group-size", "64"], "--group-size applies to rtn"),
                         (["--method", "rtn-int8", "--group-size", "3"], "positive even number"),
                         (["--method", "nf4", "--bits", "model.*=8"], "apply to rtn-int8/rtn-int4, not nf4"),
                         (["--method", "int8", "--double-quant"], "--double-quant applies to nf4 and fp4")):
        res = mvc("compress", "quantize", *args, cwd=demo, ok=False)
        assert res.exit_code not in (0, 1) and needle in res.output and "Traceback" not in res.output, args
    assert _open(demo).refs.head_commit() == head


def test_a_quantized_model_is_not_compressed_again(demo):
    mvc("compress", "quantize", "--method", "rtn-int8", "--max-drop", "off", cwd=demo)
    res = mvc("compress", "prune", "--sparsity", "0.5", cwd=demo, ok=False)
    assert res.exit_code != 0 and "already quantized" in res.output


# -- factorization ---------------------------------------------------------------------------------
def test_factorize_energy_lowers_parameters_and_runs(demo):
    repo = _open(demo)
    spec = make_spec(repo)
    before = repo.load("HEAD", path="model.safetensors")
    out = factorize.run(repo, StepOptions(spec, max_drop=INF), energy=0.9, scope=["model.layers.*.mlp.*"])
    after = repo.load(out.head, path="model.safetensors")
    ranks = repo.commit_obj(out.head).op["params"]["ranks"]
    assert ranks and all(k.split(".")[-2] == "mlp" for k in ranks)
    for mod, r in ranks.items():
        w = before[mod + ".weight"]
        a, b = after[mod + ".a.weight"], after[mod + ".b.weight"]
        assert mod + ".weight" not in after
        assert a.shape == (r, w.shape[1]) and b.shape == (w.shape[0], r)
        assert a.numel() + b.numel() < w.numel()
    assert json.loads((demo / "config.json").read_text())["mvc_low_rank"] == ranks
    ppl = evaluate(repo, out.head, spec, use_cache=False)["ppl"]
    assert ppl == pytest.approx(out.waves[0].metrics["ppl"], rel=1e-6) and ppl < 1024
    mvc("revert", "HEAD", cwd=demo)
    assert repo.load("HEAD", path="model.safetensors").keys() == before.keys()


def test_factorize_bad_input(demo):
    for args, needle in ((["--rank", "4", "--energy", "0.5"], "exactly one"), (["--energy", "1.5"], "outside (0, 1)"),
                         (["--rank", "1000"], "no layer gets smaller")):
        res = mvc("compress", "factorize", *args, "--max-drop", "off", cwd=demo, ok=False)
        assert res.exit_code not in (0, 1) and needle in res.output, args


# -- healing ---------------------------------------------------------------------------------------
def test_heal_recovers_half_the_loss_and_keeps_zeros(demo):
    repo = _open(demo)
    spec = make_spec(repo)
    base_ppl = evaluate(repo, "HEAD", spec)["ppl"]
    pruned = prune.run(repo, StepOptions(spec, max_drop=INF), "magnitude", 0.5)
    pruned_ppl = pruned.waves[0].metrics["ppl"]
    zeros = {k: v == 0 for k, v in repo.load("HEAD", path="model.safetensors").items() if ".layers." in k}
    healed = heal.run(repo, StepOptions(spec))
    assert healed.waves[0].accepted
    healed_ppl = healed.waves[0].metrics["ppl"]
    assert (pruned_ppl - healed_ppl) >= 0.5 * (pruned_ppl - base_ppl), (base_ppl, pruned_ppl, healed_ppl)
    after = repo.load("HEAD", path="model.safetensors")
    changed = 0
    for k, z in zeros.items():
        assert bool((after[k][z] == 0).all()), k
        changed += int((after[k] != 0).sum() > 0)
    op = repo.commit_obj(healed.head).op
    assert op["op"] == "heal" and op["params"]["rank"] == 16 and op["params"]["steps"] == 50
    assert op["params"]["against"] == pruned.base  # damage measured against the unpruned model
    tree = repo.odb.get(repo.commit_obj(healed.head).tree, "tree").as_dict()
    adapters = [p for p in tree if p.startswith("adapters/")]
    assert any(p.endswith("adapter_model.safetensors") for p in adapters)
    assert any(p.endswith("adapter_config.json") for p in adapters)
    h = sha256(demo / "model.safetensors")
    mvc("revert", "HEAD", cwd=demo)
    assert sha256(demo / "model.safetensors") != h
    assert torch.equal(repo.load("HEAD", path="model.safetensors")["model.layers.0.mlp.up_proj.weight"],
                       repo.load(pruned.head, path="model.safetensors")["model.layers.0.mlp.up_proj.weight"])
    assert not (demo / "adapters").exists()


def test_heal_without_text(tmp_path):
    from mvc.compress.demo_model import DEMO_DIR

    work = tmp_path / "w"
    work.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "eval.txt"):
        shutil.copy(os.path.join(DEMO_DIR, f), work / f)
    mvc("init", work)
    mvc("commit", "-m", "model", cwd=work)
    mvc("compress", "prune", "--sparsity", "0.3", "--ppl", "eval.txt", "--max-drop", "off", cwd=work)
    head = _open(work).refs.head_commit()
    res = mvc("compress", "heal", "--ppl", "eval.txt", cwd=work, ok=False)
    assert res.exit_code not in (0, 1) and "needs calibration text" in res.output
    assert _open(work).refs.head_commit() == head


# -- recipes ---------------------------------------------------------------------------------------
def test_bird_bone_runs_and_resumes_after_a_kill(demo):
    proc = subprocess.Popen(mvc_cmd() + ["compress", "run", str(BIRD_BONE)], cwd=demo, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    first = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if line.startswith("step 1/5") and "landed" in line:
            first = line.split()[4]
            proc.send_signal(signal.SIGKILL)  # midway: step 1 landed, step 2 is running
            break
    proc.wait()
    assert first is not None
    res = subprocess.run(mvc_cmd() + ["compress", "run", str(BIRD_BONE)], cwd=demo, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "step 1/5 shed      skipped" in res.stdout and first in res.stdout
    assert "recipe bird-bone: finished" in res.stdout
    repo = _open(demo)
    ops = [e.commit.op["op"] for e in repo.log() if e.commit.op]
    assert ops.count("shed") == 1 and ops.count("heal") == 1 and ops.count("quantize") == 1
    assert 1 <= ops.count("prune") <= 4
    assert repo.log()[-2].oid.startswith(first)
    assert json.loads((demo / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert json.loads(mvc("fsck", "--json", cwd=demo).output)["ok"] is True
    again = subprocess.run(mvc_cmd() + ["compress", "run", str(BIRD_BONE)], cwd=demo, capture_output=True, text=True)
    progress_lines = [ln for ln in again.stdout.splitlines() if ln.startswith("step ")]
    assert again.returncode == 0 and sum("skipped" in ln for ln in progress_lines) == 4  # nothing redone


def test_bisect_metric_finds_the_planted_regression(demo, tmp_path):
    recipe = tmp_path / "planted.yaml"
    recipe.write_text("name: planted\nsteps:\n"
                      "  - prune: {method: magnitude, sparsity: 0.1, max_drop: off}\n"
                      "  - prune: {method: magnitude, sparsity: 0.2, max_drop: off}\n"
                      "  - prune: {method: magnitude, sparsity: 0.85, max_drop: off}   # the regression\n"
                      "  - quantize: {method: bf16, max_drop: off}\n"
                      "  - prune: {method: magnitude, sparsity: 0.86, max_drop: off}\n")
    repo = _open(demo)
    base = repo.refs.head_commit()
    base_ppl = evaluate(repo, base, make_spec(repo))["ppl"]
    repo.close()
    mvc("compress", "run", recipe, cwd=demo)
    repo = _open(demo)
    planted = next(e.oid for e in repo.log() if (e.commit.op or {}).get("recipe", {}).get("step") == 2)
    repo.close()
    mvc("bisect", "start", "HEAD", base, cwd=demo)
    res = mvc("bisect", "run", "--metric", "--threshold", f"{base_ppl * 2:.2f}", *mvc_cmd(), "eval", "--value",
              cwd=demo)
    assert f"{planted} is the first bad commit" in res.output


@pytest.mark.parametrize("body,needle", [
    ("steps:\n  - prune: {sparsity: 0.5}\n  - squeeze: {}\n", ":3: unknown step 'squeeze'"),
    ("steps:\n  - prune:\n      method: wanda\n      sparsty: 0.5\n", ":4: unknown key 'sparsty' in the prune step"),
    ("name: x\nstepz: []\n", ":2: unknown key 'stepz'"),
    ("steps:\n  - prune: {sparsity: lots}\n", ":2: prune.sparsity"),
    ("steps: [\n", "not valid YAML"),
    ("steps:\n  - prune: {sparsity: 1.5}\n", ":2: prune: sparsity 1.5 is outside [0, 1)"),
])
def test_bad_recipes_name_the_line_and_commit_nothing(demo, tmp_path, body, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body)
    repo = _open(demo)
    head = repo.refs.head_commit()
    repo.close()
    res = mvc("compress", "run", recipe, cwd=demo, ok=False)
    assert res.exit_code not in (0, 1) and needle in res.output and "Traceback" not in res.output, res.output
    assert _open(demo).refs.head_commit() == head


def test_sensitivity_scan_gives_sensitive_layers_more_bits(demo):
    repo = _open(demo)
    spec = make_spec(repo)
    base = repo.refs.head_commit()
    uniform = quantize.run(repo, StepOptions(spec, max_drop=INF), "rtn-int4", group_size=64)
    repo.reset(base, hard=True)
    mixed = quantize.run(repo, StepOptions(spec, max_drop=INF), "rtn-int4", group_size=64, budget_bits=5.0)
    params = repo.commit_obj(mixed.head).op["params"]
    sizes = {k: v.numel() for k, v in repo.load(base, path="model.safetensors").items() if k in params["bits"]}
    avg = sum(params["bits"][k] * n for k, n in sizes.items()) / sum(sizes.values())
    assert 4 < avg <= 5.0
    most = max(params["sensitivity"], key=params["sensitivity"].get)
    assert params["bits"][most] == 8
    assert mixed.waves[0].metrics["ppl"] < uniform.waves[0].metrics["ppl"]
    stored = repo.load(mixed.head, path="model.safetensors")
    assert stored[most + ".qweight"].dtype == torch.int8  # 8 bits: one value per byte
    least = min(params["sensitivity"], key=params["sensitivity"].get)
    if params["bits"][least] == 4:
        assert stored[least + ".qweight"].shape[1] * 2 == sizes[least] // stored[least + ".qweight"].shape[0]
