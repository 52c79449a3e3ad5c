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


def test_compressing_example_runs(tmp_path):
    """Each line of the README's compression example, run by a shell in order (as a user types it)."""
    import os
    import subprocess
    import sys

    block = README.read_text().split("## Compressing", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```sh\n(.*?)```", block, re.S))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cwd = tmp_path
    for line in code.strip().splitlines():
        cmd = line.split("#", 1)[0].strip()
        if not cmd:
            continue
        res = subprocess.run(["bash", "-c", cmd + " && pwd"], cwd=cwd, env=env, capture_output=True, text=True)
        stopped_by_guard = "--waves" in cmd and res.returncode == 1 and "rejected" in res.stdout
        assert res.returncode == 0 or stopped_by_guard, (cmd, res.stdout, res.stderr)
        if res.returncode == 0:
            cwd = res.stdout.strip().splitlines()[-1]  # follows `cd`
        assert "Traceback" not in res.stderr
    log = subprocess.run(["mvc", "log", "--oneline"], cwd=cwd, env=env, capture_output=True, text=True).stdout
    assert "[prune]" in log and "[shed]" in log and "Revert" in log
    main = subprocess.run(["mvc", "log", "--oneline", "main"], cwd=cwd, env=env, capture_output=True, text=True).stdout
    assert all(f"[{op}]" in main for op in ("shed", "prune", "heal", "quantize"))
    assert (Path(cwd) / "scores.csv").read_text().startswith("kind,layer,index,score")
    report = (Path(cwd) / "report.html").read_text()
    assert "data-section=\"importance\"" in report and "data-section=\"waves\"" in report
    assert "data-section=\"layers\"" in (Path(cwd) / "change.html").read_text()
