"""Layer-by-layer steps at scale (issue 16): --device, the memory plan and its check, --dry-run of a
7B-class model, per-layer progress, and the in-place SparseGPT Hessian."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from mvc.compress import layerwise
from mvc.compress.calib import LayerInputs, _gather, windows
from mvc.compress.device import parse_size
from mvc.compress.evaluate import make_spec, text_windows
from mvc.compress.model import Linear, open_source
from mvc.progress import Progress
from tests.helpers import mvc
from tests.helpers import open_repo as _open
from tests.test_compress import _unchanged

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA device exists")


# -- --device ---------------------------------------------------------------------------------
@NO_CUDA
@pytest.mark.parametrize("args", [
    ("eval", "--no-cache"),
    ("compress", "prune", "--method", "wanda", "--sparsity", "0.5"),
    ("compress", "prune", "--method", "sparsegpt", "--sparsity", "0.5"),
    ("compress", "shed", "--neurons", "0.25"),
    ("compress", "quantize", "--method", "rtn-int8"),
])
def test_cuda_where_there_is_none_is_one_line_and_commits_nothing(demo, args):
    for device in ("cuda", "cuda:1"):
        res = _unchanged(demo, lambda device=device: mvc(*args, "--device", device, cwd=demo, ok=False))
        assert res.exit_code == 2
        assert f"--device {device}: no CUDA device is available" in res.output


def test_a_device_that_is_not_one(demo):
    res = _unchanged(demo, lambda: mvc("compress", "prune", "--sparsity", "0.5", "--device", "tpu0",
                                       cwd=demo, ok=False))
    assert "--device tpu0: not a device" in res.output


def test_cpu_and_auto_give_the_numbers_of_before(demo):
    cpu = json.loads(mvc("eval", "--json", "--no-cache", "--device", "cpu", cwd=demo).output)
    auto = json.loads(mvc("eval", "--json", "--no-cache", cwd=demo).output)
    assert cpu["ppl"] == auto["ppl"]


# -- the memory plan --------------------------------------------------------------------------
def test_a_step_that_does_not_fit_stops_before_it_starts(demo):
    res = _unchanged(demo, lambda: mvc("compress", "prune", "--method", "sparsegpt", "--sparsity", "0.5",
                                       "--max-memory", "100MiB", cwd=demo, ok=False))
    assert res.exit_code == 2
    assert "prune needs" in res.output and "100 MiB is free on cpu (--max-memory)" in res.output
    assert "with layer" in res.output
    repo = _open(demo)
    assert not [r for r, _ in repo.backend.list_refs("refs/attempts/")]
    res = _unchanged(demo, lambda: mvc("eval", "--no-cache", "--max-memory", "0.2GiB", cwd=demo, ok=False))
    assert "eval needs" in res.output
    ok = mvc("compress", "prune", "--method", "wanda", "--sparsity", "0.5", "--max-memory", "64GiB",
             "--max-drop", "off", cwd=demo)
    assert "landed" in ok.output


def test_sizes():
    assert parse_size("8GiB") == 8 << 30 and parse_size("1500MiB") == 1500 << 20 and parse_size("4096") == 4096
    assert parse_size("1.5G") == int(1.5 * 2**30) and parse_size(None) is None
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def _llama_7b(directory, layers: int = 32):
    """A Mistral-7B-shaped checkpoint of zeros (a sparse file: it takes no disk, and its chunks are
    one stored chunk) with the demo's tokenizer."""
    from mvc.compress.demo_model import DEMO_DIR

    cfg = json.load(open(os.path.join(DEMO_DIR, "config.json")))
    hidden, inter, kv, vocab = 4096, 14336, 1024, 32000
    cfg.update(hidden_size=hidden, intermediate_size=inter, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096)
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    header, off = {}, 0
    for name, shape in shapes:
        n = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)
    (directory / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "eval.txt", "calib.txt"):
        (directory / name).write_bytes(open(os.path.join(DEMO_DIR, name), "rb").read())
    return off


def test_dry_run_plans_a_7b_model_without_loading_it(tmp_path):
    repo_dir = tmp_path / "m7b"
    repo_dir.mkdir()
    size = _llama_7b(repo_dir)
    assert size > 14 * 10**9
    mvc("init", str(repo_dir))
    mvc("-q", "commit", "-m", "mistral-7b shaped, zeros", cwd=repo_dir)
    fd = os.open(repo_dir / "model.safetensors", os.O_RDONLY)  # reading its holes filled the page cache
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    rss = tmp_path / "rss"
    code = ("import sys\nfrom mvc.cli.main import cli\n"
            "try:\n    cli(sys.argv[2:], prog_name='mvc')\nexcept SystemExit as e:\n    code = e.code\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "open(sys.argv[1], 'w').write(hwm)\nsys.exit(code)\n")
    p = subprocess.run([sys.executable, "-c", code, str(rss), "-C", str(repo_dir), "compress", "prune",
                        "--method", "sparsegpt", "--sparsity", "0.5", "--calib", "calib.txt", "--ppl", "eval.txt",
                        "--tokens", "2048", "--dry-run", "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    mem = out["memory"]
    assert mem["layers"] == 32 and len(out["tensors"]) == 32 * 7
    parts = mem["parts"]
    # a layer's 218 M parameters in float32 (and their bf16 copy), the float64 + float32 Hessian of the
    # 14336-wide down projection (2.3 GiB): the peak is while pruning, not while evaluating
    assert parts["one layer (float32, and its stored copy)"] == 218_112_000 * 6
    assert parts["SparseGPT Hessian (float64 and float32)"] == 12 * 14336 ** 2
    assert mem["phase"] == "pruning" and "logits" not in parts
    assert 5 * 2**30 < mem["peak_bytes"] < 8 * 2**30
    assert int(rss.read_text()) * 1024 < 1 * 2**30  # planned, not allocated
    text = mvc("compress", "prune", "--method", "wanda", "--sparsity", "0.5", "--calib", "calib.txt",
               "--dry-run", cwd=repo_dir).output
    assert "planned peak memory" in text and "one of 32 layers in memory at a time" in text
    # no calibration text configured: the dry run still plans (the step itself would ask for it)
    text = mvc("compress", "prune", "--method", "sparsegpt", "--sparsity", "0.5", "--dry-run", cwd=repo_dir).output
    assert "planned peak memory" in text and "SparseGPT Hessian" in text


# -- progress ---------------------------------------------------------------------------------
class Notes(Progress):
    def __init__(self):
        self.notes, self.started = [], []

    def start(self, label, total_bytes, total_tensors=0, unit="B"):
        self.started.append((label, total_bytes, unit))

    def note(self, text):
        self.notes.append(text)


def test_layer_by_layer_progress(demo):
    repo = _open(demo)
    src = open_source(repo, "HEAD")
    spec = make_spec(repo)
    p = Notes()
    ppl = layerwise.perplexity(repo, src, text_windows(repo, src, spec.text, spec.tokens, spec.seq_len), progress=p)
    assert ppl > 1
    assert p.started == [("evaluating", 4, "layer")]
    assert [n.split(",")[0] for n in p.notes] == [f"layer {i}/4" for i in range(1, 5)]
    assert all("tokens/s" in n and "GiB" in n for n in p.notes)


# -- what a layer holds -----------------------------------------------------------------------
def test_linears_fed_the_same_input_share_their_statistics(demo):
    from mvc.compress.calib import make_calib

    repo = _open(demo)
    src = open_source(repo, "HEAD")
    sm = layerwise.StreamedModel(repo, src)
    inputs = LayerInputs(sm, windows(repo, sm, make_calib(repo, None)))
    sm.materialize(0)
    names = [n for n in src.where if ".layers.0." in n and n.endswith("proj.weight")]
    group = [Linear(n, "", 0, sm.model.get_submodule(n[:-len(".weight")])) for n in names]
    stats = inputs.stats(group, gram=True)
    by = {n.split(".")[-2]: stats[n] for n in names}
    assert by["q_proj"] is by["k_proj"] is by["v_proj"]
    assert by["gate_proj"] is by["up_proj"]
    assert len({id(s) for s in stats.values()}) == 4  # q/k/v, o, gate/up, down
    # each the statistics of its own input, measured alone
    alone = _gather([group[names.index(next(n for n in names if "k_proj" in n))]], True,
                    lambda: inputs._run(0))
    (only,) = alone.values()
    assert torch.equal(only.gram, by["k_proj"].gram) and only.n == by["k_proj"].n


def test_in_place_hessian_inverse_matches_the_plain_computation():
    """prune.sparsegpt factors and inverts H in place through transposed views; the upper Cholesky
    factor of H^-1 must be the one the out-of-place calls give."""
    from mvc.compress.prune import sparsegpt

    torch.manual_seed(0)
    x = torch.randn(512, 96)
    gram = x.t() @ x
    w = torch.randn(32, 96)
    ref_w = w.clone()
    mask = sparsegpt(w, gram, 512, 0.5)
    # the plain chain, as the reference implementation writes it
    H = gram.double() * (2.0 / 512)
    H += 0.01 * torch.diag(H).mean() * torch.eye(96, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Ht = H.clone().mT
    torch.linalg.cholesky(Ht, upper=True, out=Ht)
    torch.cholesky_inverse(Ht, upper=True, out=Ht)
    torch.linalg.cholesky(Ht, out=Ht)
    assert torch.allclose(Ht.mT, Hinv, rtol=1e-10, atol=1e-12)
    assert int(mask.sum()) == 32 * 48 and torch.all(w[mask] == 0) and not torch.equal(w, ref_w)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_layer_by_layer_scores_are_the_whole_models(demo, method):
    from mvc.compress.calib import make_calib
    from mvc.compress.model import Model
    from mvc.compress.score import element_scores, summarize

    repo = _open(demo)
    src = open_source(repo, "HEAD")
    cal = make_calib(repo, None) if method == "wanda" else None
    model = Model(repo, src)
    want = element_scores(repo, model, model.linears(), method, cal)
    report, got = layerwise.score(repo, src, method, cal, elements=True)
    assert list(got) == list(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert report == summarize(model, want)
    scoped, none_kept = layerwise.score(repo, src, method, cal, scope=["*.mlp.*"])
    assert none_kept == {} and all(".mlp." in t["name"] for t in scoped["tensors"])
    assert [r["layer"] for r in scoped["layers"]] == [0, 1, 2, 3] and "neurons" in scoped["layers"][0]


@pytest.mark.parametrize("method,group", [("rtn-int8", 0), ("rtn-int4", 64)])
def test_streamed_rtn_quantization_is_the_whole_models(demo, tmp_path, method, group):
    """The step quantizes from the store a tensor at a time; files, tensors and perplexity are those
    of the whole model quantized in memory."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mvc.compress import quantize
    from mvc.compress.evaluate import perplexity
    from mvc.compress.model import Model
    from mvc.compress.runner import StepOptions

    repo = _open(demo)
    src = open_source(repo, "HEAD")
    model = Model(repo, src)
    lin = model.linears()
    width = quantize.RTN[method]
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir()
    streamed.mkdir()
    counts = quantize.rtn_quantize_dir(model, method, group, lin, lambda n: width, str(whole))
    assert layerwise.rtn_quantize_files(repo, src, {li.name for li in lin}, lambda n: width, group,
                                        str(streamed)) == counts
    a, b = load_file(whole / "model.safetensors"), load_file(streamed / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    with safe_open(whole / "model.safetensors", "pt") as fa, safe_open(streamed / "model.safetensors", "pt") as fb:
        assert fa.metadata() == fb.metadata()
    assert (whole / "config.json").read_text() == (streamed / "config.json").read_text()
    # the step: what it records is the perplexity of the whole model, dequantized in memory
    spec = make_spec(repo)
    quantize.load_dequantized(model, str(whole))
    want = perplexity(model.model, text_windows(repo, src, spec.text, spec.tokens, spec.seq_len))
    out = quantize.run(repo, StepOptions(spec, max_drop=float("inf")), method, group_size=group)
    assert out.waves[0].accepted and out.waves[0].metrics["ppl"] == want
    stored = repo.load(out.head, path="model.safetensors")
    assert all(torch.equal(stored[k], b[k]) for k in b)
