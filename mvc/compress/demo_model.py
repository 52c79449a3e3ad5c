"""The demo model that ships with mvc (made by scripts/make_demo_model.py) and `mvc init --demo`."""

from __future__ import annotations

import os
import shutil

from ..errors import MvcError
from ..state import CFG_CALIB, CFG_EVAL

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "eval.txt", "calib.txt")
EVAL = {"ppl": "eval.txt", "tokens": 8192, "seq_len": 256}
CALIB = {"text": "calib.txt", "tokens": 2048}


def init_demo(path: str, branch: str = "main", author: str | None = None):
    """A new repository in *path* whose first commit is the demo model, with its default evaluation
    (perplexity on the held-out eval.txt) and calibration text (calib.txt) in the config."""
    from ..repo import Repo

    missing = [f for f in FILES if not os.path.isfile(os.path.join(DEMO_DIR, f))]
    if missing:
        raise MvcError(f"this mvc installation lacks the demo model ({missing[0]})",
                       hint="reinstall mvc, or run scripts/make_demo_model.py")
    os.makedirs(path, exist_ok=True)
    clash = [f for f in FILES if os.path.exists(os.path.join(path, f))]
    if clash:
        raise MvcError(f"{os.path.join(path, clash[0])} already exists", hint="use an empty directory")
    repo = Repo.init(path, branch=branch)
    for f in FILES:
        shutil.copyfile(os.path.join(DEMO_DIR, f), os.path.join(repo.root, f))
    repo.update_config(lambda c: c.update({CFG_EVAL: dict(EVAL), CFG_CALIB: dict(CALIB)}))
    repo.commit("demo model: a tiny Llama trained on Paradise Lost", author=author)
    return repo
