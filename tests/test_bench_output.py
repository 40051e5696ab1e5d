"""benchmarks/bench.py's output: where it writes by default, what it says ran on each side, and
the figure's shared ratio axis."""
import importlib.util
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_output_folder_is_git_ignored():
    """The main job leaves a clone clean: its default folder is ignored by git."""
    bench = _load_bench()
    out = bench.parse_args([]).out_dir
    assert out == REPO / "benchmarks" / "runs"
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    probe = out.relative_to(REPO) / "cpu-20260101-000000.png"
    proc = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=REPO)
    assert proc.returncode == 0, f"{probe} is not ignored by git"


def test_what_ran_says_which_kernel_each_side_ran():
    bench = _load_bench()
    records = [
        {"op": "lstm", "ours_impl": "mkldnn", "baseline_impl": "mkldnn"},
        {"op": "gru", "ours_impl": "native", "baseline_impl": "native"},
        {"op": "gru_original", "ours_impl": "lstmgru-reference", "baseline_impl": "native"},
        {"op": "gru", "ours_impl": "native", "baseline_impl": "native"},
    ]
    lines = bench.what_ran(records)
    assert lines[0].startswith("lstm: both sides run oneDNN's LSTM, the same kernel")
    assert lines[1].startswith("gru: both sides run ATen's own loop, the same kernel")
    assert lines[2].startswith("gru_original: lstmgru's GRU(reset_after=False) on lstmgru's "
                               "plain-PyTorch reference vs torch.nn's GRU on ATen's own loop")
    assert len(lines) == 3


def test_ratio_axis_is_shared_labelled_and_never_magnifies_a_small_gap():
    bench = _load_bench()
    lo, hi, ticks = bench.ratio_axis([0.97, 1.03])
    assert lo <= 1 / 1.5 and hi >= 1.5  # a 3% gap stays small on the page
    assert 1.0 in ticks and len(ticks) >= 3
    lo, hi, ticks = bench.ratio_axis([0.05, 4.0])
    assert lo < 0.05 and hi > 4.0
    assert {0.1, 1.0, 2.0} <= set(ticks) and 1.25 not in ticks  # a wide span: coarser ticks
    lo, hi, ticks = bench.ratio_axis([0.3, 3.2], headroom=1.4)
    assert min(ticks) <= 0.3 and max(ticks) >= 3.0  # labels reach the tallest bars


def test_replot_writes_the_markdown_and_figure_of_a_saved_result(tmp_path):
    """--replot renders a saved result again (as after a change to the figure), timing nothing."""
    import json
    import sys

    meta = {"device": "test CPU", "torch": "x", "triton": None, "cudnn": None, "commit": "abc",
            "date": "2026-01-01T00:00:00+00:00", "device_type": "cpu", "backend": "auto",
            "loadavg_start": [0.1, 0.1, 0.1], "loadavg_end": [0.1, 0.1, 0.1]}
    base = {"dtype": "float32", "batch": 2, "seq_len": 5, "input_size": 4, "hidden_size": 8,
            "num_layers": 1, "bidirectional": False, "baseline": "torch-cpu",
            "max_abs_diff": 0.0}
    records = [dict(base, op=op, mode=mode, ours_ms=1.0, baseline_ms=s, speedup=s,
                    ours_impl=impl, baseline_impl=impl)
               for op, impl in (("lstm", "mkldnn"), ("gru", "native"))
               for mode, s in (("inference", 0.97), ("training", 1.03))]
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps({"meta": meta, "records": records}))
    proc = subprocess.run([sys.executable, str(BENCH), "--replot", str(saved)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "r.md").read_text()
    assert "lstm: both sides run oneDNN's LSTM, the same kernel" in md and md == proc.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "r.png").stat().st_size > 0
