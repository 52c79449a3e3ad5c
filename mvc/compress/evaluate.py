"""Evaluation of a revision: perplexity on a text file, or a user command (bisect's contract).

Results are cached in the store per (tree id, evaluation spec), so each version is evaluated
once. A repository's default evaluation lives in its config under ``eval``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

from ..errors import MvcError, UsageError
from ..pipeline import Materializer
from ..state import CFG_EVAL, KV_EVAL
from ..store.ids import hash_object

DEFAULT_TOKENS = 4096
DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class EvalSpec:
    """What to measure. ``text_id`` is the text's content hash: a changed text is a new spec."""

    kind: str  # "ppl" | "cmd"
    text: str | None = None  # absolute path of the text (ppl)
    text_id: str | None = None
    tokens: int = DEFAULT_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    cmd: str | None = None
    seed: int = 0
    env: dict | None = field(default=None, compare=False, hash=False)  # --cmd's environment (the CLI's)
    #: where perplexity is computed (--device; None: auto) and the memory it may take (--max-memory):
    #: how, not what, so neither is part of the cached result's key
    device: str | None = field(default=None, compare=False, hash=False)
    max_memory: int | None = field(default=None, compare=False, hash=False)

    @property
    def metric(self) -> str:
        return "ppl" if self.kind == "ppl" else "pass"

    def key(self) -> dict:
        d = asdict(self)
        for k in ("text", "env", "device", "max_memory"):
            d.pop(k)
        return d

    def describe(self) -> str:
        if self.kind == "ppl":
            name = os.path.basename(self.text or "?")
            return f"perplexity on {name} ({self.tokens} tokens, windows of {self.seq_len})"
        return f"command {self.cmd!r}"


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError as e:
        raise UsageError(f"evaluation text {path} does not exist", hint="pass --ppl TEXTFILE") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"evaluation text {path} cannot be read as UTF-8 text ({e})") from e


def make_spec(repo, ppl: str | None = None, cmd: str | None = None, tokens: int | None = None,
              seq_len: int | None = None, base_dir: str | None = None, env: dict | None = None,
              device: str | None = None, max_memory: int | None = None) -> EvalSpec:
    """The evaluation asked for, else the repository's default (config ``eval``), else an error."""
    if ppl and cmd:
        raise UsageError("pass --ppl or --cmd, not both")
    cfg = repo.config.get(CFG_EVAL) or {}
    if not ppl and not cmd:
        if not cfg:
            raise UsageError("no evaluation given and the repository has no default",
                             hint="pass --ppl TEXTFILE or --cmd CMD (`mvc eval --set-default` keeps one)")
        ppl, cmd = cfg.get("ppl"), cfg.get("cmd")
        base_dir = repo.root
        tokens = tokens or cfg.get("tokens")
        seq_len = seq_len or cfg.get("seq_len")
    tokens = tokens or DEFAULT_TOKENS
    seq_len = seq_len or DEFAULT_SEQ_LEN
    if tokens < 2 or seq_len < 2:
        raise UsageError("--tokens and --seq-len must be at least 2")
    if cmd:
        shlex.split(cmd)
        return EvalSpec("cmd", cmd=cmd, env=env, device=device, max_memory=max_memory)
    path = os.path.join(base_dir or repo.cwd or os.getcwd(), ppl)
    text = read_text(path)
    return EvalSpec("ppl", text=os.path.abspath(path), text_id=hash_object("chunk", text.encode()).hex(),
                    tokens=tokens, seq_len=seq_len, device=device, max_memory=max_memory)


def spec_config(spec: EvalSpec, root: str) -> dict:
    """The config entry that makes *spec* the repository's default (paths relative to the root)."""
    if spec.kind == "cmd":
        return {"cmd": spec.cmd}
    rel = os.path.relpath(spec.text, root)
    return {"ppl": rel, "tokens": spec.tokens, "seq_len": spec.seq_len}


def _cache_key(tree_id: str, spec: EvalSpec) -> bytes:
    body = json.dumps(spec.key(), sort_keys=True).encode()
    return KV_EVAL + tree_id.encode() + b"/" + hash_object("chunk", body).hex()[:32].encode()


def cached(repo, tree_id: str, spec: EvalSpec) -> dict | None:
    raw = repo.backend.kv_get(_cache_key(tree_id, spec))
    return json.loads(raw) if raw else None


def remember(repo, tree_id: str, spec: EvalSpec, result: dict) -> None:
    repo.backend.kv_put_many({_cache_key(tree_id, spec): json.dumps(result, sort_keys=True).encode()})


def _tokenizer_entry(src):
    entry = src.tree.as_dict().get(src.prefix + "tokenizer.json")
    if entry is None:
        raise UsageError(f"no {src.prefix}tokenizer.json beside the model: perplexity needs the tokenizer",
                         hint="commit the model's tokenizer.json, or evaluate with --cmd")
    return entry


def tokenizer_for(repo, src):
    """The tokenizer of the model in *src* (its tokenizer.json, parsed by the tokenizers library)."""
    from tokenizers import Tokenizer

    from .model import read_file

    raw = read_file(repo, _tokenizer_entry(src).oid)
    try:
        return Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises its own Exception subclasses
        raise MvcError(f"{src.prefix}tokenizer.json cannot be parsed: {e}") from e


_WINDOWS: dict = {}  # (tokenizer id, text file state, tokens, seq_len) -> token windows; waves reuse them


def text_windows(repo, src, path: str, tokens: int, seq_len: int):
    """The first *tokens* tokens of the text at *path* (tokenized by the model's own tokenizer) as
    (windows, seq_len) token ids; seq_len is capped at the model's context length."""
    import torch

    max_len = src.config.get("max_position_embeddings") or src.config.get("n_positions")
    seq = min(seq_len, max_len or seq_len)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    key = (_tokenizer_entry(src).oid, path, st and (st.st_mtime_ns, st.st_size), tokens, seq)
    if key in _WINDOWS:
        return _WINDOWS[key]
    ids = tokenizer_for(repo, src).encode(read_text(path)).ids[:tokens]
    n = len(ids) // seq
    if n == 0:
        raise UsageError(f"{path} has {len(ids)} tokens, fewer than one window of {seq}",
                         hint="use a longer text or a smaller --seq-len")
    if len(_WINDOWS) >= 8:
        _WINDOWS.clear()
    _WINDOWS[key] = torch.tensor(ids[:n * seq], dtype=torch.long).view(n, seq)
    return _WINDOWS[key]


def perplexity(model, windows, batch: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every window, deterministic."""
    import torch

    torch.manual_seed(0)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            x = windows[i:i + batch]
            logits = model(input_ids=x).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    return math.exp(total / count)


def run_command(repo, tree, spec: EvalSpec, rev: str) -> dict:
    """Check the tree out into a scratch directory and run the command there (exit 0 = good)."""
    with tempfile.TemporaryDirectory(dir=repo.tmp_dir(), prefix="eval-") as d, \
            Materializer(repo.odb, workers=repo.workers) as mat:
        for e in tree.entries:
            full = os.path.join(d, e.path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                mat.write(e.oid, f)
        env = dict(spec.env, MVC_EVAL_REV=rev, MVC_EVAL_DIR=d) if spec.env is not None else None
        try:
            res = subprocess.run(shlex.split(spec.cmd), cwd=d, env=env, capture_output=True, text=True)
        except OSError as e:
            raise UsageError(f"cannot run evaluation command {spec.cmd!r}: {e.strerror}") from e
    out: dict = {"pass": res.returncode == 0, "exit": res.returncode}
    if res.returncode == 125:
        out["skip"] = True
    lines = res.stdout.strip().splitlines()
    try:
        out["score"] = float(lines[-1].split()[-1])
    except (IndexError, ValueError):
        pass
    return out


def evaluate(repo, rev: str, spec: EvalSpec, model_dir: str = "", use_cache: bool = True, progress=None) -> dict:
    """The metrics of *rev* under *spec*: {"ppl": ..., "tokens": ...} or {"pass": ..., "exit": ...}."""
    commit = repo.resolve(rev)
    return evaluate_tree(repo, repo.commit_obj(commit).tree, spec, commit, model_dir=model_dir,
                         use_cache=use_cache, progress=progress)


def evaluate_tree(repo, tree_id: str, spec: EvalSpec, commit: str | None, model=None, tree=None,
                  model_dir: str = "", use_cache: bool = True, src=None, progress=None) -> dict:
    """Evaluate a stored tree (cached by tree id). *model* (a compress.model.Model holding exactly
    this tree's tensors) saves loading it; *commit* names the tree for --cmd and for loading;
    *src* (a Source of the tree) stands for a tree not committed yet."""
    from . import layerwise
    from .model import Model, open_source

    if use_cache and (hit := cached(repo, tree_id, spec)) is not None:
        return dict(hit, cached=True)
    if spec.kind == "cmd":
        result = run_command(repo, tree or repo.odb.get(tree_id, "tree"), spec, commit or tree_id)
    else:
        if src is None:
            src = model.src if model is not None else open_source(repo, commit, model_dir, allow_quantized=True)
        if not src.arch.causal:
            raise UsageError(f"perplexity needs a causal language model; {src.arch.model_type} is an encoder",
                             hint="evaluate it with --cmd CMD")
        windows = text_windows(repo, src, spec.text, spec.tokens, spec.seq_len)
        if model is not None:
            ppl = perplexity(model.model, windows)
        elif src.arch.model_type in layerwise.TAIL:  # from the store, one layer in memory at a time
            ppl = layerwise.perplexity(repo, src, windows, device=spec.device, max_memory=spec.max_memory,
                                       progress=progress)
        else:
            ppl = perplexity(Model(repo, src).model, windows)
        result = {"ppl": ppl, "tokens": int(windows.numel())}
    remember(repo, tree_id, spec, result)
    return dict(result, cached=False)


def drop(spec: EvalSpec, before: dict, after: dict) -> float:
    """How much worse *after* is than *before*, as a fraction (ppl: relative rise; cmd: 1 if it fails)."""
    if spec.kind == "cmd":
        return 0.0 if after.get("pass") else 1.0
    return (after["ppl"] - before["ppl"]) / before["ppl"]
