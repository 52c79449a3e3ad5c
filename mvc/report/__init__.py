"""`mvc report`: one self-contained HTML file of a model's history, compression and storage.

data.py collects (commits, op records, metrics, per-layer statistics, waves, storage, scores);
html.py draws it with plotly (the ``report`` extra), plotly.js inlined, tables beside charts.
"""

from __future__ import annotations

import os

from ..errors import MvcError
from ..progress import NULL, Progress
from .data import Report, build, build_diff


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.mvc-tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise MvcError(f"cannot write {path}: {e.strerror}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write(repo, path: str, spec: str | None = None, scores: str | None = None, progress: Progress = NULL,
          read_tensors: bool = True) -> Report:
    """Write the report of *spec* (a revision or A..B; default HEAD's history) to *path*; with
    *read_tensors* False, no statistic that reads tensor values (a quick report of a big model)."""
    from .html import render

    rep = build(repo, spec, scores, progress=progress, read_tensors=read_tensors)
    _write_atomic(path, render(rep))
    return rep


def write_diff(repo, a: str, b: str, path: str, progress: Progress = NULL) -> dict:
    """Write the per-layer heatmaps of the change A -> B to *path*."""
    from .html import render_diff

    d = build_diff(repo, a, b, progress)
    _write_atomic(path, render_diff(d))
    return d


__all__ = ["Report", "build", "build_diff", "write", "write_diff"]
