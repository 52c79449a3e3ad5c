"""Compression operations that produce commits: score, prune, shed, quantize, factorize, heal,
and recipes that chain them. ``runner`` runs any step (waves, evaluation, guard, op record);
each operation has its own module with ``run(repo, StepOptions, ...)``.

torch, transformers, bitsandbytes, accelerate and peft are the ``compress`` extra: versioning
installs without them, and ``require()`` turns their absence into one clear error.
"""

from __future__ import annotations

import importlib.util

#: what the compress extra installs (import names)
EXTRA = ("torch", "transformers", "bitsandbytes", "accelerate", "peft", "yaml")


def require(what: str = "compression") -> None:
    """Raise MissingExtraError naming the first module of the extra that is not installed."""
    from ..errors import MissingExtraError

    for name in EXTRA:
        if importlib.util.find_spec(name) is None:
            raise MissingExtraError(what, name)
