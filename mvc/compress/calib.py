"""Calibration data and what it measures: layer inputs (for Wanda and SparseGPT) and gradients
(for Taylor and Fisher scores), collected one layer at a time where the method allows."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UsageError
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

    def __init__(self, cols: int, gram: bool):
        import torch

        self.sq = torch.zeros(cols, dtype=torch.float64)
        self.gram = torch.zeros(cols, cols, dtype=torch.float32) if gram else None
        self.n = 0

    def add(self, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sq += (x.double() ** 2).sum(0)
        if self.gram is not None:
            self.gram += x.t() @ x
        self.n += x.shape[0]


def collect_inputs(model, linears, batches, gram: bool = False, batch: int = 8) -> dict:
    """Run the calibration windows through the model and gather InputStats for each of *linears*."""
    import torch

    stats, hooks = {}, []
    for li in linears:
        st = stats[li.name] = InputStats(li.weight().shape[1], gram)
        hooks.append(li.module.register_forward_hook(lambda _m, inp, _out, st=st: st.add(inp[0])))
    try:
        with torch.no_grad():
            for i in range(0, batches.shape[0], batch):
                model.model(input_ids=batches[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    return stats


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
