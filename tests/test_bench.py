"""End-to-end check of benchmarks/bench.py on a tiny CPU grid: output files and JSON shape."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench.py"

META_KEYS = ["device", "torch", "triton", "cudnn", "commit", "date"]
RECORD_KEYS = [
    "op", "mode", "dtype", "batch", "seq_len", "input_size", "hidden_size", "num_layers",
    "bidirectional", "ours_ms", "baseline_ms", "baseline", "speedup",
]


def test_bench_end_to_end_cpu(tmp_path):
    cmd = [
        # one thread: the CPU may be shared, and spinning OpenMP threads slow tiny cases 10x
        sys.executable, str(BENCH), "--device", "cpu", "--threads", "1", "--backend", "auto",
        "--op", "lstm", "gru", "--mode", "inference", "training", "--dtype", "float32",
        "--batch", "3", "--seq-len", "5", "--sizes", "4:8", "--num-layers", "1",
        "--bidirectional", "0", "--warmup", "1", "--min-rounds", "3", "--max-rounds", "5",
        "--budget", "0.05", "--out-dir", str(tmp_path), "--name", "tiny",
    ]
    # bench.py imports the installed lstmgru, or the checkout when none is installed
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"bench.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}"

    data = json.loads((tmp_path / "tiny.json").read_text())
    assert list(data) == ["meta", "records"]
    meta = data["meta"]
    assert list(meta)[: len(META_KEYS)] == META_KEYS
    assert isinstance(meta["device"], str) and meta["device"]
    assert meta["torch"] == __import__("torch").__version__
    assert meta["triton"] is None or isinstance(meta["triton"], str)
    assert meta["cudnn"] is None or isinstance(meta["cudnn"], int)
    assert meta["commit"] == "unknown" or meta["commit"].replace("-dirty", "").isalnum()
    assert meta["date"].endswith("+00:00")
    assert meta["complete"] is True and meta["errors"] == []

    records = data["records"]
    got = {(r["op"], r["mode"]) for r in records}
    assert got == {(op, mode) for op in ("lstm", "gru") for mode in ("inference", "training")}
    assert len(records) == 4
    for r in records:
        assert list(r)[: len(RECORD_KEYS)] == RECORD_KEYS, list(r)
        assert (r["dtype"], r["batch"], r["seq_len"], r["input_size"], r["hidden_size"],
                r["num_layers"], r["bidirectional"]) == ("float32", 3, 5, 4, 8, 1, False)
        assert r["baseline"] == "torch-cpu"
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0
        assert math.isclose(r["speedup"], r["baseline_ms"] / r["ours_ms"], rel_tol=1e-9)
        assert 3 <= r["rounds"] <= 5
        # same weights and inputs: fp32 outputs agree closely
        assert r["max_abs_diff"] < 1e-4, r

    md = (tmp_path / "tiny.md").read_text()
    assert md.count("| lstm |") >= 2 and "geomean" in md
    assert "geomean" in proc.stdout  # the Markdown summary is printed to stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "tiny.png").stat().st_size > 0
    else:
        assert "matplotlib" in proc.stderr


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_presets_expand():
    """The presets expand to the grids the README promises (no timing)."""
    bench = _load_bench()
    cpu = bench.torch.device("cpu")

    def configs(*argv):
        return bench.build_configs(bench.parse_args(list(argv)), cpu)

    grid = configs("--preset", "cpu")
    assert len(grid) == 3 * 3 * 4 * 3 * 2 + 6  # T x B x (I,H) x op x mode, + seed case x op x mode
    assert {c["op"] for c in grid} == {"lstm", "gru", "gru_original"}
    assert {(c["input_size"], c["hidden_size"]) for c in grid} == {
        (1, 50), (32, 64), (128, 128), (256, 256)}
    assert sum(c["batch"] == 32 and c["seq_len"] == 10 and c["hidden_size"] == 50
               for c in grid) == 6
    # on CPU the gpu preset drops the half types and keeps its shapes
    gpu = configs("--preset", "gpu")
    assert len(gpu) == 4 * 4 * 2 * 2 and {c["dtype"] for c in gpu} == {"float32"}
    assert {c["seq_len"] for c in gpu} == {512} and all(c["input_size"] == c["hidden_size"]
                                                        for c in gpu)
    # grid flags replace axes; a shape override drops the preset's extra cases
    small = configs("--op", "gru", "--batch", "2", "4", "--hidden-size", "16")
    assert {(c["op"], c["batch"], c["input_size"], c["hidden_size"]) for c in small} == {
        ("gru", b, 16, 16) for b in (2, 4)}
    assert len(configs("--preset", "default")) > 0


def test_variants_bench_tiny_runs_and_pack_pad_agrees():
    """benchmarks/variants_bench.py --tiny: every contender runs, and the pack/pad baseline
    computes what reset= does (it is printed as the max abs diff)."""
    script = REPO / "benchmarks" / "variants_bench.py"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--no-save", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| LSTM | 8 | 4 | 16 |" in proc.stdout and "| GRU | 8 | 4 | 16 |" in proc.stdout
    diff = float(proc.stdout.split("max abs diff ")[1].split(".\n")[0].rstrip("."))
    assert diff < 1e-5
