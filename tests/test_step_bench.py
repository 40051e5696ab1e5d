"""benchmarks/step_bench.py end to end on a tiny CPU run: the files it writes and their shape."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_step_bench_tiny(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_bench.py"), "--tiny",
                          "--out-dir", str(tmp_path), "--name", "tiny"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads((tmp_path / "tiny.json").read_text())
    meta, records = data["meta"], data["records"]
    for key in ("device", "torch", "triton", "commit", "date", "threads", "loadavg_start",
                "loadavg_end"):
        assert key in meta
    assert meta["threads"] == 1
    cases = {(r["cell"], r["steps"], r["batch"]) for r in records}
    assert ("LSTMCell", None, 1) in cases and ("GRU", 1, 8) in cases and ("LSTM", 4, 8) in cases
    for record in records:
        assert record["us"]["nn"] > 0 and set(record["ratio"]) == set(record["us"]) - {"nn"}
        assert record["implementation"]["plain"] == "native"  # auto on the CPU
        if record["steps"] in (None, 1):
            # Resets at the one step run on torch's kernel; the variants on the reference.
            assert record["implementation"]["reset"] == "native"
            assert record["implementation"]["layer_norm"] == "reference"
        else:
            assert record["implementation"]["reset_t0"] == "native"
            assert record["implementation"]["reset_any"] == "reference"
    table = (tmp_path / "tiny.md").read_text()
    assert "| LSTMCell cell B=1 |" in table and "load average" in table
