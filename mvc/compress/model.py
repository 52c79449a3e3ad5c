"""The model adapter: a transformers model loaded from a revision, its prunable layers, and the
way its changed tensors go back into the store as a new tree.

Architectures are recognised by ``model_type`` in config.json; each names its decoder/encoder
layers' roles (attention q/k/v/o, MLP gate/up/down). Nothing from the repository is executed:
config.json only selects a class that transformers itself ships (never ``trust_remote_code``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import MvcError, UsageError
from ..pipeline import Materializer
from ..store.objects import Tree

# role -> module path inside one layer; "qkv" is GPT-2's fused projection
_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_GPT2 = {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
_BERT = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
         "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}


@dataclass(frozen=True)
class Arch:
    model_type: str
    roles: dict
    layers: str  # regex of a layer's prefix, one group: the layer index
    causal: bool
    inter_key: str  # config key of the MLP width
    conv1d: bool = False  # GPT-2: weights stored (in, out)
    heads_sheddable: bool = False  # the config can express fewer heads (explicit head_dim)


ARCHS = {
    "llama": Arch("llama", _LLAMA, r"model\.layers\.(\d+)\.", True, "intermediate_size", heads_sheddable=True),
    "mistral": Arch("mistral", _LLAMA, r"model\.layers\.(\d+)\.", True, "intermediate_size", heads_sheddable=True),
    "qwen2": Arch("qwen2", _LLAMA, r"model\.layers\.(\d+)\.", True, "intermediate_size", heads_sheddable=True),
    "gpt2": Arch("gpt2", _GPT2, r"transformer\.h\.(\d+)\.", True, "n_inner", conv1d=True),
    "bert": Arch("bert", _BERT, r"(?:bert\.)?encoder\.layer\.(\d+)\.", False, "intermediate_size"),
}
_EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|lm_head)\.weight$")
_QUANT_DTYPES = {"I8", "U8", "I4", "U4", "F8_E4M3", "F8_E5M2"}


@dataclass
class Linear:
    """One prunable matrix: its tensor name, role, layer, and the module that owns it."""

    name: str
    role: str
    layer: int
    module: object = field(repr=False, default=None)

    @property
    def conv1d(self) -> bool:
        """GPT-2's Conv1D stores its weight transposed, (in, out)."""
        return is_conv1d(self.module)

    def weight(self):
        """The weight as (out, in), a view into the module."""
        w = self.module.weight.data
        return w.t() if self.conv1d else w


@dataclass
class Source:
    """Where a model lives in a revision: its directory, config, and which file holds each tensor."""

    rev: str
    commit: str
    tree: Tree
    prefix: str  # model directory inside the tree, "" or "dir/"
    config: dict
    arch: Arch
    files: dict  # path -> list of (tensor name, Tensor meta) in data order
    where: dict  # tensor name -> path
    quantized: bool = False

    def tensor_meta(self, name):
        return dict(self.files[self.where[name]])[name]


def is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"


def read_file(repo, oid: str) -> bytes:
    """The bytes of a stored (small) file, verified."""
    with Materializer(repo.odb, workers=1) as mat:
        return mat.read_bytes(oid)


def open_source(repo, rev: str = "HEAD", model_dir: str = "", allow_quantized: bool = False) -> Source:
    """Find the model in *rev*: config.json and the safetensors files beside it (metadata only).
    A quantized model is refused unless *allow_quantized* (evaluation reads it dequantized)."""
    commit = repo.resolve(rev)
    tree = repo.odb.get(repo.commit_obj(commit).tree, "tree")
    prefix = model_dir.strip("/") + "/" if model_dir.strip("/") else ""
    entries = tree.as_dict()
    cfg_entry = entries.get(prefix + "config.json")
    if cfg_entry is None:
        raise UsageError(f"no {prefix}config.json in {rev}",
                         hint="compression needs a transformers model directory; pass --model DIR")
    try:
        config = json.loads(read_file(repo, cfg_entry.oid))
    except ValueError as e:
        raise MvcError(f"{prefix}config.json in {rev} is not valid JSON ({e})") from e
    mtype = config.get("model_type") if isinstance(config, dict) else None
    if mtype not in ARCHS:
        raise UsageError(f"unknown architecture {mtype!r} in {prefix}config.json",
                         hint=f"supported: {', '.join(sorted(ARCHS))}")
    if config.get("quantization_config") and not allow_quantized:
        raise UsageError(f"the model in {rev} is already quantized "
                         f"({config['quantization_config'].get('quant_method', '?')})",
                         hint="compress the full-precision parent instead")
    files, where = {}, {}
    for path, e in entries.items():
        if not path.startswith(prefix) or "/" in path[len(prefix):] or not path.endswith(".safetensors"):
            continue
        f = repo.odb.get(e.oid, "file")
        files[path] = [(n, repo.odb.get(tid, "tensor")) for n, tid in f.tensors]
        for n, t in files[path]:
            packed = n.endswith((".qweight", ".SCB")) or ".quant_state." in n
            if (packed or (t.dtype in _QUANT_DTYPES and n.endswith(".weight"))) and not allow_quantized:
                raise UsageError(f"the model in {rev} is already quantized ({n} is {t.dtype})",
                                 hint="compress the full-precision parent instead")
            where[n] = path
    if not files:
        raise UsageError(f"no .safetensors weights beside {prefix}config.json in {rev}")
    src = Source(rev, commit, tree, prefix, config, ARCHS[mtype], files, where)
    src.quantized = bool(config.get("quantization_config"))
    return src


def linear_names(src: Source, scope: list[str] | None = None, embeddings: bool = False) -> list[tuple[str, str, int]]:
    """(tensor name, role, layer) of the prunable matrices, in layer order, from metadata alone."""
    from fnmatch import fnmatchcase

    out = []
    pat = re.compile(src.arch.layers)
    by_path = {v: k for k, v in src.arch.roles.items()}
    for name in src.where:
        if not name.endswith(".weight"):
            continue
        m = pat.search(name)
        if m is not None:
            rel = name[m.end():-len(".weight")]
            role = by_path.get(rel)
            if role is None:
                continue
            item = (name, role, int(m.group(1)))
        elif embeddings and _EMBEDDINGS.search(name):
            item = (name, "embedding", -1)
        else:
            continue
        if scope and not any(fnmatchcase(name, s) for s in scope):
            continue
        out.append(item)
    out.sort(key=lambda x: (x[2], x[0]))
    if not out:
        raise UsageError("no prunable layers matched" + (f" --scope {' '.join(scope)}" if scope else ""),
                         hint="scopes are globs over tensor names, e.g. 'model.layers.*.mlp.*'")
    return out


def model_class(src: Source) -> tuple:
    """(the transformers class, its config) for *src*'s config.json: the class its
    ``architectures`` names if transformers ships it, else the auto class for its model type."""
    import transformers

    try:
        hf_config = transformers.AutoConfig.for_model(
            **{k: v for k, v in src.config.items() if k not in ("transformers_version", "quantization_config")})
    except _config_errors() as e:
        raise MvcError(f"config.json cannot be read by transformers: {e}") from e
    arch_names = src.config.get("architectures") or []
    cls = getattr(transformers, arch_names[0], None) if arch_names else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        cls = (transformers.AutoModelForCausalLM if src.arch.causal else transformers.AutoModel)._model_mapping[
            type(hf_config)]
    return cls, hf_config


def really_unexpected(model, unexpected: list[str]) -> list[str]:
    """The unexpected tensors of a load that matter: not what transformers itself ignores when
    loading (non-persistent buffers old checkpoints saved, BERT's `position_ids`; its own ignore
    patterns). Such tensors are written back as they were."""
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    buffers = {n for n, _ in model.named_buffers()}
    return [u for u in unexpected if u not in buffers and not any(re.search(p, u) for p in ignored)]


def install_low_rank(model, config: dict) -> None:
    """Replace the linears a factorized config names by their two low-rank factors."""
    from .factorize import CONFIG_KEY, install

    if config.get(CONFIG_KEY):
        install(model, config[CONFIG_KEY])


class Model:
    """A transformers model built from a Source, in float32 for the math, plus the stored tensors."""

    def __init__(self, repo, src: Source):
        import torch

        self.repo = repo
        self.src = src
        self.originals = {}
        for path in src.files:
            if src.quantized:  # evaluated in float32, as the quantize step does (StreamedModel too)
                from ..formats.quantized import dequantize_state

                meta = file_metadata(repo, src.tree.as_dict()[path].oid) or {}
                self.originals.update(dequantize_state(repo.load(src.commit, path=path), meta, dtype=torch.float32))
            else:
                self.originals.update(repo.load(src.commit, path=path))
        self.cast = None  # a torch dtype every floating tensor is stored as (quantize --method fp16|bf16)
        cls, self.hf_config = model_class(src)
        torch.manual_seed(0)
        self.model = cls(self.hf_config).float().eval()
        self.removed: set = set()  # stored tensors the step dropped (factorized weights)
        self.added: dict = {}  # new tensor name -> the stored tensor it replaces (same file, dtype)
        self._install_low_rank(src.config)
        state = {k: v.float() for k, v in self.originals.items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        missing = [m for m in missing if m not in tied and not m.endswith("lm_head.weight")]
        unexpected = really_unexpected(self.model, unexpected)
        if missing or unexpected:
            bad = (missing or unexpected)[0]
            raise MvcError(f"the weights do not fit {cls.__name__}: "
                           f"{'missing' if missing else 'unexpected'} tensor {bad!r}")
        self.params = dict(self.model.named_parameters())

    def _install_low_rank(self, config: dict) -> None:
        install_low_rank(self.model, config)

    def round_to_stored(self, li: Linear) -> None:
        """Round a changed weight to its stored dtype, so the model in memory is the one committed."""
        w = li.module.weight.data
        w.copy_(w.to(self.stored_dtype(li.name)).float())

    def stored_dtype(self, name: str):
        orig = self.originals[self.added.get(name, name)].dtype
        return self.cast if self.cast is not None and orig.is_floating_point else orig

    def rebuild(self, config: dict) -> None:
        """Re-create the transformers model for a changed config (after shedding), same tensors."""
        import transformers

        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.src.config = config
        try:
            self.hf_config = transformers.AutoConfig.for_model(
                **{k: v for k, v in config.items() if k != "transformers_version"})
        except _config_errors() as e:  # transformers' own validation of the new shapes
            raise MvcError(f"transformers rejects the changed config: {e}") from e
        self.model = type(self.model)(self.hf_config).float().eval()
        self._install_low_rank(config)
        self.model.load_state_dict(state, strict=False)
        self.params = dict(self.model.named_parameters())

    def linears(self, scope=None, embeddings=False) -> list[Linear]:
        out = []
        for name, role, layer in linear_names(self.src, scope, embeddings):
            module = self.model.get_submodule(name[:-len(".weight")])
            out.append(Linear(name, role, layer, module))
        return out

    def num_layers(self) -> int:
        return max(li.layer for li in self.linears()) + 1

    def state(self) -> dict:
        """The current tensors in their stored dtypes, keyed like the files."""
        sd = self.model.state_dict()
        out = {}
        for name, orig in self.originals.items():
            if name in self.removed:
                continue
            cur = sd.get(name)
            out[name] = (orig if cur is None else cur).to(self.stored_dtype(name))
        for name in self.added:
            out[name] = sd[name].to(self.stored_dtype(name))
        return out


def _config_errors() -> tuple:
    """What building a transformers config from untrusted JSON can raise."""
    from huggingface_hub.errors import StrictDataclassError

    return (TypeError, ValueError, KeyError, StrictDataclassError)


def file_metadata(repo, file_oid: str) -> dict | None:
    """The ``__metadata__`` of a stored safetensors file (read from its header chunks only)."""
    from ..load import safetensors_metadata

    with Materializer(repo.odb, workers=1) as mat:
        return safetensors_metadata(mat, repo.odb.get(file_oid, "file"))


def with_files(repo, tree: Tree, files: dict, drop=(), base_commits=()) -> Tree:
    """*tree* without the paths in *drop*, plus {tree path: local file} ingested into the store
    (a replaced entry keeps its mode); new chunks may be deltas against *base_commits*' tensors."""
    from ..pipeline import Ingestor
    from ..store.objects import MODE_FILE, check_path

    entries = {p: (e.mode, e.oid) for p, e in tree.as_dict().items() if p not in drop}
    with Ingestor(repo.odb, store=True, workers=repo.workers, bases=repo.delta_bases(list(base_commits))) as ing:
        for path, local in sorted(files.items()):
            mode = entries.get(path, (MODE_FILE, None))[0]
            entries[check_path(path)] = (mode, ing.ingest(local, path))
        ing.flush(wait=True)
    return Tree.build(entries)


def build_tree(repo, src: Source, tensors: dict, originals: dict, scratch: str, config: dict | None = None,
               placed: dict | None = None) -> Tree:
    """A new tree: *src*'s tree with each safetensors file that holds a changed tensor rewritten
    (written into the directory *scratch* first).

    *tensors* maps every tensor name to its new value; files whose tensors all equal *originals*
    bit for bit keep their entries. Unchanged tensors dedupe in the store. *placed*: new tensor
    name -> the stored tensor whose file it goes into.
    """
    from safetensors.torch import save_file

    entries = src.tree.as_dict()
    files = {}
    for n, (path, items) in enumerate(src.files.items()):
        names = {name for name, _meta in items}
        new = {name: tensors[name].contiguous() for name in names if name in tensors}
        new.update({name: tensors[name].contiguous() for name, beside in (placed or {}).items() if beside in names})
        if new.keys() == names and all(same_tensor(new[k], originals[k]) for k in names):
            continue
        local = os.path.join(scratch, f"{n}.safetensors")
        save_file(new, local, metadata=file_metadata(repo, entries[path].oid))
        files[path] = local
    if config is not None:
        local = os.path.join(scratch, "config.json")
        with open(local, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        files[src.prefix + "config.json"] = local
    return with_files(repo, src.tree, files, base_commits=(src.commit,))


def same_tensor(a, b) -> bool:
    """Bit-for-bit equality of two torch tensors (dtype, shape and bytes; NaN and -0.0 count)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def tree_from_dir(repo, src: Source, out_dir: str) -> Tree:
    """*src*'s tree with the model's weight files (and config.json) replaced by the safetensors
    files, index and config.json that a writer (transformers' save_pretrained) left in *out_dir*."""
    files = {src.prefix + name: os.path.join(out_dir, name) for name in os.listdir(out_dir)
             if name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json")}
    drop = {*src.files, src.prefix + "model.safetensors.index.json"}
    return with_files(repo, src.tree, files, drop, base_commits=(src.commit,))
