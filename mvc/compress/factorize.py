"""Low-rank factorization: W (out × in) ≈ B·A with A (r × in), B (out × r), from a truncated SVD.

Plain:   W = U Σ Vᵀ,  A = Σ_r^½ V_rᵀ,  B = U_r Σ_r^½.
Whitened (activation-aware, as ASVD does): with s_j = ‖X_:,j‖₂ / sqrt(n) from calibration,
W·diag(s) = U Σ Vᵀ,  A = Σ_r^½ V_rᵀ diag(s)⁻¹,  B = U_r Σ_r^½, so the truncation keeps what
matters for the inputs the layer actually sees.
The rank is given (--rank) or the smallest r whose σ² carry --energy of the total; a layer is
factorized only when r·(in + out) < in·out (otherwise it would grow). The model's config
records ``mvc_low_rank: {module: r}``; mvc's loader builds each such Linear as two.
"""

from __future__ import annotations

CONFIG_KEY = "mvc_low_rank"


def low_rank_module(in_f: int, out_f: int, rank: int, bias: bool):
    import torch

    class LowRankLinear(torch.nn.Module):
        """y = b(a(x)): a Linear factorized into two thinner ones."""

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(in_f, rank, bias=False)
            self.b = torch.nn.Linear(rank, out_f, bias=bias)

        def forward(self, x):
            return self.b(self.a(x))

    return LowRankLinear()


def install(model_module, ranks: dict) -> None:
    """Replace each named Linear of *model_module* by a LowRankLinear of the recorded rank."""
    from .model import is_conv1d

    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model_module.get_submodule(parent_name) if parent_name else model_module
        old = getattr(parent, child)
        w = old.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if is_conv1d(old) else tuple(w.shape)
        new = low_rank_module(in_f, out_f, int(rank), getattr(old, "bias", None) is not None)
        setattr(parent, child, new.to(w.dtype))


def choose_rank(s, rank: int | None, energy: float | None) -> int:
    import torch

    if rank is not None:
        return max(1, min(rank, s.numel()))
    e = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    return int(torch.searchsorted(e, torch.tensor(energy, dtype=e.dtype)).item()) + 1


def factor(w, rank: int | None, energy: float | None, scale=None):
    """(A, B, r) for weight w (out, in); *scale*: per-input whitening s_j, or None."""
    import torch

    w = w.double()
    ws = w * scale.double()[None, :] if scale is not None else w
    u, s, vh = torch.linalg.svd(ws, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    a = root[:, None] * vh[:r]
    if scale is not None:
        a = a / scale.double().clamp_min(1e-12)[None, :]
    b = u[:, :r] * root[None, :]
    return a.float(), b.float(), r
