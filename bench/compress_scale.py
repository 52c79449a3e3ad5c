"""Compression at model scale: a generated Llama of a given size, committed, then each step timed
with its peak RSS (issue 16's measurement).

    python -m bench --compress-scale [--size-mib 1570] [--tokens 2048] [--steps eval,prune-wanda,...]

The model is a transformers Llama (hidden 2048, MLP 5632, 16 heads; the demo's tokenizer, so the
vocabulary is 1024) with as many decoder layers as fit *size_mib* of bf16, weights N(0, 0.02),
written a tensor at a time. Each step is the real console command (`mvc compress …`, `mvc eval`)
in its own process, started from the same base commit on a branch of its own; peak RSS is the
process's own VmHWM (bench/peak.py). The default size, 1570 MiB, is the 826 M-parameter model of
issue 16 (16 layers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from mvc.synth import write_bf16_file

HIDDEN, INTER, HEADS = 2048, 5632, 16
LAYER_MIB = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) / 2**20

#: step name -> the mvc arguments (T: evaluation tokens)
STEPS = {
    "eval": ["eval", "--ppl", "eval.txt", "--tokens", "{T}"],
    "score-wanda": ["compress", "score", "--method", "wanda", "--calib", "calib.txt", "-o", "scores.json"],
    "prune-magnitude": ["compress", "prune", "--method", "magnitude", "--sparsity", "0.5", "--max-drop", "off",
                        "--ppl", "eval.txt", "--tokens", "{T}"],
    "prune-wanda": ["compress", "prune", "--method", "wanda", "--sparsity", "0.5", "--max-drop", "off",
                    "--ppl", "eval.txt", "--tokens", "{T}", "--calib", "calib.txt"],
    "prune-sparsegpt": ["compress", "prune", "--method", "sparsegpt", "--sparsity", "0.5", "--max-drop", "off",
                        "--ppl", "eval.txt", "--tokens", "{T}", "--calib", "calib.txt"],
    "quantize-rtn-int8": ["compress", "quantize", "--method", "rtn-int8", "--max-drop", "off",
                          "--ppl", "eval.txt", "--tokens", "{T}"],
    "quantize-nf4": ["compress", "quantize", "--method", "nf4", "--max-drop", "off",
                     "--ppl", "eval.txt", "--tokens", "{T}"],
}


def write_llama(directory: str, layers: int, seed: int = 0) -> int:
    """A transformers Llama checkpoint (config.json, model.safetensors, the demo's tokenizer and
    texts) in *directory*; returns the number of parameters."""
    from mvc.compress.demo_model import DEMO_DIR

    with open(os.path.join(DEMO_DIR, "config.json")) as f:
        config = json.load(f)
    vocab = config["vocab_size"]
    config.update(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                  head_dim=HIDDEN // HEADS, num_hidden_layers=layers, max_position_embeddings=2048)
    shapes = [("model.embed_tokens.weight", (vocab, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{m}_proj.weight", (HIDDEN, HIDDEN)) for m in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
                   (p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (vocab, HIDDEN))]
    write_bf16_file(os.path.join(directory, "model.safetensors"), shapes, np.random.default_rng(seed),
                    ones=lambda name: name.endswith("norm.weight"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "eval.txt", "calib.txt"):
        shutil.copyfile(os.path.join(DEMO_DIR, name), os.path.join(directory, name))
    return sum(int(np.prod(s)) for _n, s in shapes)


def run(size_mib: int, workdir: str, tokens: int, steps: list[str], mvc_cmd, timed, machine) -> dict:
    layers = max(1, round(size_mib / LAYER_MIB))
    params = write_llama(workdir, layers)
    raw = os.path.getsize(os.path.join(workdir, "model.safetensors"))
    run_ = [*mvc_cmd()]
    subprocess.run(run_ + ["init", "."], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    commit_s, commit_rss = timed(["-q", "commit", "-m", "base"], workdir)
    out = {"layers": layers, "params": params, "size_bytes": raw, "tokens": tokens, "machine": machine(),
           "rows": [{"step": "commit", "s": commit_s, "peak_rss": commit_rss}]}
    for step in steps:
        if step not in STEPS:
            raise SystemExit(f"unknown step {step!r}: choose from {', '.join(STEPS)}")
        subprocess.run(run_ + ["-q", "switch", "-c", f"bench-{step}", "main"], cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        args = [a.replace("{T}", str(tokens)) for a in STEPS[step]]
        s, rss = timed(["-q", *args], workdir)
        out["rows"].append({"step": step, "command": "mvc " + " ".join(args), "s": s, "peak_rss": rss})
        print(f"  {step}: {s:.1f} s, {rss / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return out


def report(res: dict) -> str:
    limit = 0.5 * res["size_bytes"] + 2**30
    lines = [f"model: {res['params'] / 1e6:.0f} M parameters, {res['layers']} layers, "
             f"{res['size_bytes'] / 2**30:.2f} GiB bf16; evaluation tokens {res['tokens']}",
             f"issue 16's memory limit: 0.5 × the bf16 model + 1 GiB = {limit / 2**30:.2f} GiB", "",
             "| step | command | time | peak RSS | within the limit |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        ok = "yes" if r["peak_rss"] <= limit else "**no**"
        lines.append(f"| {r['step']} | `{r.get('command', 'mvc commit')}` | {r['s']:.1f} s | "
                     f"{r['peak_rss'] / 2**30:.2f} GiB | {ok} |")
    return "\n".join(lines)
