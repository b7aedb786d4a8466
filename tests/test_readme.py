"""The README's API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "DiT_B_2" in b)
    exec(compile(example, "README.md", "exec"), {})
    assert "2..8 (blocks.2..blocks.8)" in capsys.readouterr().out


def test_readme_quickstart_matches_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = next(line for line in text.splitlines() if line.endswith("pytest -q"))
    assert test_cmd in ci
