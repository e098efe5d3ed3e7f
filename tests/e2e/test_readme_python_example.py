"""The README's Python example, run as written from a directory that is not the repository:
`LLM()` without a model finds the embedded default model through the package, not a relative path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_python_example_runs_from_any_directory(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "LLM(device=" in code  # no model path: the default model
    code += "\nassert outs[0].outputs[0].finish_reason in ('stop', 'length') and outs[0].outputs[0].text\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
