"""The README, followed word for word: its Python snippets run as written in a fresh process, its
test command is the one CI runs, and every file it links or shows exists."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs_verbatim(code, tmp_path):
    if 'use_backend("triton")' in code:
        pytest.skip("the GPU section's snippet needs CUDA")
    if "import keras" in code and importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}  # as a new user has it
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{code}\n{proc.stderr[-3000:]}"


def test_readme_test_command_is_the_one_ci_runs():
    command = 'python -m pip install -e ".[test]" && python -m pytest'
    assert command in README
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("no .ci/run here (an sdist)")
    assert command in ci.read_text()


def test_readme_links_and_images_exist():
    if not (ROOT / "docs").is_dir():
        pytest.skip("not a source checkout (an sdist carries no docs/, benchmarks/, examples/)")
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if "://" not in t]
    assert local, "no links found"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing
