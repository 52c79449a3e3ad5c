"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_example(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert set(ns["state"]) == {"w"}
    assert (tmp_path / "my-model" / "model.safetensors").exists()


def test_quick_start_commands_exist():
    text = README.read_text()
    assert "python3 dev.py demo" in text and "python3 dev.py test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 dev.py test" in ci
