"""Models whose weights stay in the store: built empty (the meta device), with the embeddings, the
final norm and the head loaded, and each decoder layer loaded when it runs and dropped after it.
Memory is one layer in float32 plus the activations, not the whole model.

``perplexity`` measures a stored model this way (`mvc eval`); its number is the one the whole model
in memory gives (same operations, same order: tests/test_compress.py checks it).
"""

from __future__ import annotations

import math
import re

from ..errors import MvcError
from .calib import LayerInputs
from .model import Source, install_low_rank, model_class, really_unexpected

#: per causal architecture: the final norm and the head, applied to the last layer's output
TAIL = {"llama": ("model.norm", "lm_head"), "mistral": ("model.norm", "lm_head"),
         "qwen2": ("model.norm", "lm_head"), "gpt2": ("transformer.ln_f", "lm_head")}


def _trim() -> None:
    """Hand the memory a dropped layer held back to the system (glibc keeps freed blocks under its
    mmap threshold in the heap, so RSS would grow by a layer per layer)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class StreamedModel:
    """A transformers model built on the meta device whose decoder layers are loaded one at a
    time from *src*'s revision (dequantized where the revision is quantized)."""

    def __init__(self, repo, src: Source):
        from accelerate import init_empty_weights

        self.repo = repo
        self.src = src
        cls, self.hf_config = model_class(src)
        with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
            self.model = cls(self.hf_config)
            install_low_rank(self.model, src.config)
        self.model.float().eval()
        pat = re.compile(src.arch.layers)
        self.layer_of: dict[str, int] = {}
        self.layers_path = ""
        for name in src.where:
            m = pat.search(name)
            if m is not None:
                self.layer_of[name] = int(m.group(1))
                self.layers_path = name[:m.start(1)].rstrip(".")
        outside = [n for n in src.where if n not in self.layer_of]
        self._assign(self.model, self._load(outside), "")
        self._tie()

    def _load(self, names: list[str]) -> dict:
        """The named stored tensors (and their quantization companions) as float32, dequantized."""

        import json

        from ..formats.quantized import RTN_META, dequantize_state
        from ..load import safetensors_metadata, tensor_bytes, to_torch
        from ..pipeline import Materializer

        want = set(names)  # stored names: a quantized weight's companions are among them
        out = {}
        with Materializer(self.repo.odb, workers=self.repo.workers) as mat:
            for path in sorted({self.src.where[n] for n in names}):
                picked = {n: t for n, t in self.src.files[path] if n in want}
                state = {n: to_torch(t, tensor_bytes(mat, t)) for n, t in picked.items()}
                if self.src.quantized:
                    f = self.repo.odb.get(self.src.tree.as_dict()[path].oid, "file")
                    meta = safetensors_metadata(mat, f) or {}
                    if RTN_META in meta:  # only this subset's entries
                        rtn = {k: v for k, v in json.loads(meta[RTN_META]).items() if k + ".qweight" in state}
                        meta = {**meta, RTN_META: json.dumps(rtn)}
                    state = dequantize_state(state, meta)
                out.update({n: v.float() if v.is_floating_point() else v for n, v in state.items()})
        return out

    @staticmethod
    def _assign(module, state: dict, prefix: str) -> None:
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        _missing, unexpected = module.load_state_dict(own, strict=False, assign=True)
        unexpected = really_unexpected(module, unexpected)
        if unexpected:
            raise MvcError(f"the weights do not fit {type(module).__name__}: unexpected tensor {unexpected[0]!r}")

    def _tie(self) -> None:
        """A head tied to the embeddings (no lm_head.weight stored) shares their tensor."""
        head = getattr(self.model, "lm_head", None)
        if head is not None and head.weight.is_meta:
            emb = self.model.get_input_embeddings()
            head.weight = emb.weight

    def materialize(self, layer: int) -> None:
        names = [n for n, i in self.layer_of.items() if i == layer]
        self._assign(self.model, self._load(names), "")
        module = self.model.get_submodule(f"{self.layers_path}.{layer}")
        if any(p.is_meta for p in module.parameters()):
            bad = next(n for n, p in module.named_parameters() if p.is_meta)
            raise MvcError(f"layer {layer} has no stored tensor for {bad!r}")

    def release(self, layer: int) -> None:
        self.model.get_submodule(f"{self.layers_path}.{layer}").to("meta")
        _trim()

    @property
    def num_layers(self) -> int:
        return max(self.layer_of.values()) + 1


def perplexity(repo, src: Source, windows, batch: int = 8) -> float:
    """The perplexity() of evaluate.py, one decoder layer in memory at a time."""
    import torch

    tail = TAIL.get(src.arch.model_type)
    if tail is None:
        raise MvcError(f"no layer-by-layer evaluation for {src.arch.model_type}")
    sm = StreamedModel(repo, src)
    inputs = LayerInputs(sm, windows, batch)
    for layer in range(sm.num_layers):
        sm.materialize(layer)
        inputs.advance_to(layer + 1)
        sm.release(layer)
    norm, head = (sm.model.get_submodule(p) for p in tail)
    total, count = 0.0, 0
    with torch.no_grad():
        for k, (args, kwargs) in enumerate(inputs.items):
            hidden = args[0] if args else kwargs["hidden_states"]
            x = windows[k * batch:(k + 1) * batch]
            logits = head(norm(hidden)).float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    return math.exp(total / count)


def source_with_tree(repo, src: Source, tree) -> Source:
    """*src* for another tree of the same model whose files hold the same tensor names (a pruned
    wave): its tensors' metadata read from the tree."""
    import dataclasses

    entries = tree.as_dict()
    files, where = {}, {}
    for path in src.files:
        f = repo.odb.get(entries[path].oid, "file")
        metas = repo.odb.get_many([tid for _n, tid in f.tensors], "tensor")
        files[path] = [(n, t) for (n, _tid), t in zip(f.tensors, metas)]
        where.update({n: path for n, _tid in f.tensors})
    return dataclasses.replace(src, tree=tree, files=files, where=where)


def _store_tensor(ing, value, meta) -> str:
    """Store a tensor made in memory (its stored dtype and shape, as *meta*), each chunk tried as a
    delta against the same chunk of *meta*; returns its id."""
    import torch

    from ..pipeline import CHUNK_SIZE
    from ..store.objects import DTYPES, Tensor

    data = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if len(data) != meta.nbytes:
        raise MvcError(f"a pruned tensor of {len(data)} bytes where {meta.nbytes} were stored")
    size, is_float = DTYPES[meta.dtype]
    fs = size if is_float and size > 1 else 0
    chunks = []
    for k, i in enumerate(range(0, len(data), CHUNK_SIZE)):
        base = [meta.chunks[k]] if k < len(meta.chunks) and meta.chunk_size == CHUNK_SIZE else []
        chunks.append(ing.add_chunk(data[i:i + CHUNK_SIZE], fs, base))
    return ing.add_meta(Tensor(meta.dtype, tuple(meta.shape), CHUNK_SIZE, tuple(chunks)))


def prune(repo, src: Source, method: str, sparsity_of, pattern, clusters: int, seed: int, calib,
          scope=None, embeddings: bool = False, progress=None, cluster_info: dict | None = None):
    """The prune step from the store, one decoder layer in memory at a time: each layer is loaded,
    measured on the calibration inputs (Wanda, SparseGPT), pruned, rounded to its stored dtype,
    its changed matrices stored, the pruned layer run to make the next layer's inputs, and the
    layer dropped. Returns (the new tree, {tensor: (pruned, total)}). The files keep their headers
    (a prune changes values, not shapes or dtypes)."""
    import torch

    from ..load import _TORCH_DTYPES
    from ..pipeline import Ingestor
    from ..store.objects import File, Tree
    from .calib import windows
    from .model import Linear, linear_names
    from .prune import prune_matrix

    names = linear_names(src, scope, embeddings)
    sm = StreamedModel(repo, src)
    batches = windows(repo, sm, calib) if method != "magnitude" else None
    inputs = LayerInputs(sm, batches) if batches is not None else None
    last = max(layer for _n, _r, layer in names)
    counts: dict = {}
    new_ids: dict[str, str] = {}
    entries = src.tree.as_dict()
    with Ingestor(repo.odb, store=True, workers=repo.workers,
                  bases=repo.delta_bases([src.commit] if src.commit else [])) as ing:
        for layer in ([-1] if any(n[2] < 0 for n in names) else []) + list(range(last + 1)):
            mine = [(n, role) for n, role, i in names if i == layer]
            loaded = layer >= 0 and bool(mine or inputs is not None)  # layer -1: embeddings, always loaded
            if loaded:
                sm.materialize(layer)
            group = [Linear(n, role, layer, sm.model.get_submodule(n[:-len(".weight")])) for n, role in mine]
            stats = inputs.stats(group, gram=method == "sparsegpt") if inputs is not None and group else {}
            for li in group:
                counts[li.name] = prune_matrix(li, method, stats, sparsity_of(li.name), pattern, clusters, seed,
                                               cluster_info)
                meta = src.tensor_meta(li.name)
                w = li.module.weight.data  # as stored: GPT-2's Conv1D keeps (in, out)
                stored = w.to(getattr(torch, _TORCH_DTYPES[meta.dtype]))
                w.copy_(stored.float())  # the model that runs on is the one stored
                new_ids[li.name] = _store_tensor(ing, stored, meta)
                del stored
                _trim()
                if progress is not None:
                    progress.advance(nbytes=w.numel() * 4, tensors=1)
            if inputs is not None and layer >= 0 and layer < last:
                inputs.advance_to(layer + 1)
            if loaded:
                sm.release(layer)
        changed = {}
        for path in src.files:
            f = repo.odb.get(entries[path].oid, "file")
            if any(n in new_ids for n, _ in f.tensors):
                nf = File(f.format, f.size, f.chunks, tuple((n, new_ids.get(n, tid)) for n, tid in f.tensors))
                changed[path] = (entries[path].mode, ing.add_meta(nf))
        ing.flush(wait=True)
    tree = Tree.build({**{p: (e.mode, e.oid) for p, e in entries.items()}, **changed})
    return tree, counts
