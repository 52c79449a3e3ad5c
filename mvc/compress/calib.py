"""Calibration data and what it measures: layer inputs (for Wanda and SparseGPT) and gradients
(for Taylor and Fisher scores), collected one layer at a time where the method allows."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import MvcError, UsageError
from ..state import CFG_CALIB
from .evaluate import read_text, text_windows

DEFAULT_CALIB_TOKENS = 2048
DEFAULT_CALIB_SEQ = 128


@dataclass(frozen=True)
class Calib:
    text: str
    tokens: int = DEFAULT_CALIB_TOKENS
    seq_len: int = DEFAULT_CALIB_SEQ


def make_calib(repo, path: str | None, tokens: int | None = None) -> Calib:
    """--calib FILE, else the repository's config ``calib``; an error names both when neither is set."""
    if path:
        full = os.path.join(repo.cwd or os.getcwd(), path)
    elif (cfg := repo.config.get(CFG_CALIB)):
        full = os.path.join(repo.root, cfg["text"])
        tokens = tokens or cfg.get("tokens")
    else:
        raise UsageError("this method needs calibration text",
                         hint="pass --calib TEXTFILE (or use --method magnitude)")
    read_text(full)  # fails early, with the path, when it is missing
    return Calib(os.path.abspath(full), tokens or DEFAULT_CALIB_TOKENS)


def windows(repo, model, calib: Calib):
    return text_windows(repo, model.src, calib.text, calib.tokens, calib.seq_len)


class InputStats:
    """Per-column sums of squares of a layer's inputs (and, with gram=True, X^T X)."""

    def __init__(self, cols: int, gram: bool, device=None):
        import torch

        self.sq = torch.zeros(cols, dtype=torch.float64, device=device)
        self.gram = torch.zeros(cols, cols, dtype=torch.float32, device=device) if gram else None
        self.n = 0

    def add(self, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sq += (x.double() ** 2).sum(0)
        if self.gram is not None:
            self.gram += x.t() @ x
        self.n += x.shape[0]


def _gather(linears, gram: bool, run) -> dict:
    """InputStats of each of *linears*, from their inputs while *run()* runs (without gradients).
    Linears fed the very same tensor (q, k and v; gate and up) share one InputStats: it is
    measured once, and a layer holds one X^T X per distinct input."""
    import torch

    stats, hooks, followers = {}, [], set()
    last: list = []  # [the tensor last measured, its stats]

    def hook(li):
        def measure(_m, inp, _out):
            x = inp[0]
            st = stats.get(li.name)
            if last and last[0] is x and (st is None or st is last[1]):
                if st is None:  # first batch: found to share its input with the linear before
                    stats[li.name] = last[1]
                    followers.add(li.name)
                return
            if li.name in followers:
                raise MvcError(f"{li.name} no longer shares its input with the linear run before it")
            if st is None:
                st = stats[li.name] = InputStats(li.weight().shape[1], gram, x.device)
            st.add(x)
            last[:] = [x, st]
        return measure

    for li in linears:
        hooks.append(li.module.register_forward_hook(hook(li)))
    try:
        with torch.no_grad():
            run()
    finally:
        last.clear()
        for h in hooks:
            h.remove()
    return stats


def collect_inputs(model, linears, batches, gram: bool = False, batch: int = 8) -> dict:
    """Run the calibration windows through the model and gather InputStats for each of *linears*."""
    def run():
        for i in range(0, batches.shape[0], batch):
            model.model(input_ids=batches[i:i + batch])

    return _gather(linears, gram, run)


class _Stop(Exception):
    """Raised by the hook that captures the first decoder layer's inputs: nothing after it runs."""


class LayerInputs:
    """The calibration windows' hidden states at the input of one decoder layer at a time.

    The model runs once, up to its first decoder layer (whose inputs, with every keyword the model
    passes it — attention mask, position embeddings — are kept); after that each layer runs on
    its own: ``stats`` measures the inputs of some of the current layer's linears, ``advance``
    runs the layer (as it is now: pruned) to make the next layer's inputs. L layers cost L layer
    passes, not the L whole-model passes of measuring each layer through the model, and the
    inputs are the same: those of the model with every earlier layer already changed."""

    def __init__(self, model, batches, batch: int = 8):
        import torch

        self.model = model
        self.layers = decoder_layers(model)
        self.index = 0
        self.items: list[tuple[tuple, dict]] = []

        def capture(_module, args, kwargs):
            self.items.append((args, kwargs))
            raise _Stop

        hook = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        # no KV cache: each layer runs more than once on the same inputs
        extra = {"use_cache": False} if getattr(model.hf_config, "use_cache", None) is not None else {}
        try:
            with torch.no_grad():
                for i in range(0, batches.shape[0], batch):
                    try:
                        model.model(input_ids=batches[i:i + batch], **extra)
                    except _Stop:
                        pass
        finally:
            hook.remove()
        if len(self.items) != -(-batches.shape[0] // batch):
            raise MvcError("the model did not reach its first decoder layer on the calibration text")

    def _run(self, layer: int):
        import torch

        with torch.no_grad():
            return [self.layers[layer](*args, **kwargs) for args, kwargs in self.items]

    def stats(self, linears, gram: bool = False) -> dict:
        """InputStats of *linears* (all in one layer, at or after the current one)."""
        layer = linears[0].layer
        self.advance_to(layer)
        return _gather(linears, gram, lambda: self._run(layer))

    def advance_to(self, layer: int) -> None:
        """Run the layers before *layer* (as they are now) on the kept inputs."""
        while self.index < layer:
            items = []
            for (args, kwargs), out in zip(self.items, self._run(self.index)):
                hidden = out[0] if isinstance(out, tuple) else out
                if args:
                    items.append(((hidden, *args[1:]), kwargs))
                else:  # the hidden states passed by keyword
                    items.append(((), {**kwargs, "hidden_states": hidden}))
            self.items = items
            self.index += 1


def decoder_layers(model):
    """The model's list of decoder (or encoder) layers, found from its matrices' names."""
    import re

    pat = re.compile(model.src.arch.layers)
    for name in model.src.where:
        m = pat.search(name)
        if m is not None:
            path = name[:m.start(1)].rstrip(".")
            try:
                return model.model.get_submodule(path)
            except AttributeError as e:
                raise MvcError(f"no module {path!r} holds the layers of {name!r}") from e
    raise MvcError("the model has no decoder layers mvc can find")


def collect_grads(model, linears, batches, batch: int = 4) -> tuple[dict, dict]:
    """Sum of gradients and sum of squared per-batch gradients of the LM loss, per linear weight."""
    import torch

    grad_sum = {li.name: torch.zeros_like(li.weight()) for li in linears}
    grad_sq = {li.name: torch.zeros_like(li.weight()) for li in linears}
    m = model.model
    for p in m.parameters():
        p.requires_grad_(False)
    for li in linears:
        li.module.weight.requires_grad_(True)
    try:
        for i in range(0, batches.shape[0], batch):
            x = batches[i:i + batch]
            m.zero_grad(set_to_none=True)
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
            for li in linears:
                g = li.module.weight.grad
                g = g.t() if li.conv1d else g
                grad_sum[li.name] += g
                grad_sq[li.name] += g * g
    finally:
        m.zero_grad(set_to_none=True)
        for p in m.parameters():
            p.requires_grad_(False)
    return grad_sum, grad_sq
