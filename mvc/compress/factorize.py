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

from ..errors import UsageError
from .calib import collect_inputs, make_calib, windows
from .model import Model, linear_names, open_source
from .runner import Change, Outcome, StepOptions, calib_desc
from .runner import run as run_step

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


def run(repo, opts: StepOptions, rank: int | None = None, energy: float | None = None, scope=None,
        whiten: bool = False) -> Outcome:
    """Replace chosen linear layers by two thin ones (truncated SVD; --whiten: activation-aware)."""
    if (rank is None) == (energy is None):
        raise UsageError("pass exactly one of --rank R or --energy E")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank} must be at least 1")
    if energy is not None and not 0 < energy < 1:
        raise UsageError(f"--energy {energy:g} is outside (0, 1)", hint="for example 0.9")
    src = open_source(repo, "HEAD", opts.model_dir)
    if src.config.get(CONFIG_KEY):
        raise UsageError("this model is already factorized; factorize its parent instead")
    linear_names(src, scope)
    cal = make_calib(repo, opts.calib) if whiten else None
    params = {k: v for k, v in {"rank": rank, "energy": energy, "whiten": whiten or None,
                                "calib": calib_desc(cal)}.items() if v is not None}

    def apply(model: Model, strength: float, scratch: str):
        import torch

        lin = [li for li in model.linears(scope) if li.role != "embedding"]
        scales = {}
        if whiten:
            stats = collect_inputs(model, lin, windows(repo, model, cal))
            scales = {n: (st.sq / max(1, st.n)).sqrt().float() for n, st in stats.items()}
        ranks, counts, skipped = {}, {}, []
        for li in lin:
            w = li.weight().float()
            out_f, in_f = w.shape
            a, b, r = factor(w, rank, energy, scales.get(li.name))
            if r * (in_f + out_f) >= in_f * out_f:
                skipped.append(li.name)
                continue
            mod_name = li.name[:-len(".weight")]
            bias = getattr(li.module, "bias", None)
            install(model.model, {mod_name: r})
            new = model.model.get_submodule(mod_name)
            with torch.no_grad():
                new.a.weight.copy_(a.to(model.stored_dtype(li.name)).float())
                new.b.weight.copy_(b.to(model.stored_dtype(li.name)).float())
                if bias is not None:
                    new.b.bias.copy_(bias)
            model.removed.add(li.name)
            model.added[mod_name + ".a.weight"] = li.name
            model.added[mod_name + ".b.weight"] = li.name
            if bias is not None:
                model.removed.add(mod_name + ".bias")
                model.added[mod_name + ".b.bias"] = mod_name + ".bias"
            ranks[mod_name] = r
            counts[li.name] = (in_f * out_f - r * (in_f + out_f), in_f * out_f)
        if not ranks:
            raise UsageError("no layer gets smaller at that rank/energy (r·(in+out) must be < in·out)",
                             hint="lower --rank or --energy, or choose larger layers with --scope")
        cfg = dict(model.src.config)
        cfg[CONFIG_KEY] = ranks
        model.src.config = cfg
        return Change(counts, {"ranks": ranks, "skipped": skipped or None}, cfg)

    return run_step(repo, opts, op="factorize", method="svd-whitened" if whiten else "svd", params=params,
                    strengths=[1.0], apply=apply, scope=scope)
