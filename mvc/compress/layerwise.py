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
from .model import Source, install_low_rank, model_class

#: per causal architecture: the final norm and the head, applied to the last layer's output
TAIL = {"llama": ("model.norm", "lm_head"), "mistral": ("model.norm", "lm_head"),
         "qwen2": ("model.norm", "lm_head"), "gpt2": ("transformer.ln_f", "lm_head")}


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
                        import json

                        rtn = {k: v for k, v in json.loads(meta[RTN_META]).items() if k + ".qweight" in state}
                        meta = {**meta, RTN_META: json.dumps(rtn)}
                    state = dequantize_state(state, meta)
                out.update({n: v.float() if v.is_floating_point() else v for n, v in state.items()})
        return out

    @staticmethod
    def _assign(module, state: dict, prefix: str) -> None:
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(own, strict=False, assign=True)
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
