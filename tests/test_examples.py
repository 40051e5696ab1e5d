"""Smoke tests: every example runs with --tiny, exits 0 and writes its figures.

Each runs in its own interpreter (as a user would run it), writing into a temporary folder so
the repository stays clean. --tiny keeps each to a few seconds.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

CASES = [
    # script, extra args, optional modules it needs, figures it must write
    ("seed_sum.py", [], ["matplotlib"], ["seed_sum_predictions.png", "seed_sum_loss.png"]),
    ("forecast.py", [], ["matplotlib", "statsmodels"], ["forecast_sunspots.png"]),
    ("forecast.py", ["--dataset", "co2", "--cell", "gru"], ["matplotlib", "statsmodels"],
     ["forecast_co2.png"]),
    ("char_lm.py", [], ["matplotlib"], ["char_lm_loss.png"]),
    ("char_lm.py", ["--original-gru"], ["matplotlib"], ["char_lm_loss.png"]),
    ("rl_resets.py", [], ["matplotlib"], ["rl_resets.png"]),
]


@pytest.mark.parametrize(
    "script,extra,needs,figures",
    CASES,
    ids=[f"{c[0]}{'[' + ' '.join(c[1]) + ']' if c[1] else ''}" for c in CASES],
)
def test_example_runs_tiny(script, extra, needs, figures, tmp_path):
    for module in needs:
        pytest.importorskip(module)
    env = dict(os.environ)
    # The examples import lstmgru; make the checkout importable even without an install.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny", "--out-dir", str(tmp_path), *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for name in figures:
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 1000, f"{script} did not write {name}"
