"""The GPU check's dry run (benchmarks/gpu_check.sh with GPU_CHECK_DRY_RUN=1): every stage with
tiny shapes on the CPU, the kernels in Triton's interpreter, torch.nn standing in for cuDNN.

What the GPU machine's single call depends on: the run reaches its end, summary.json lists every
stage and every case, OUTDIR holds at most the 8 files the device tool returns, and a stage that
hangs (forced here, deaf to SIGINT and SIGTERM) is cut at its limit while the next stage still
runs. The package is found through the checkout fallback (GPU_CHECK_INSTALL=checkout), the path
a failed install takes on the GPU machine.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
HANG_STAGE, HANG_LIMIT_S = "race", 3


@functools.lru_cache(maxsize=None)
def _driver():
    """benchmarks/gpu_check.py as a module (it imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("gpu_check",
                                                  REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(outdir, **knobs):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPU_CHECK_") and k != "TRITON_INTERPRET"}
    env.update(GPU_CHECK_DRY_RUN="1", GPU_CHECK_PYTHON=sys.executable,
               GPU_CHECK_INSTALL="checkout", **knobs)
    proc = subprocess.run(["bash", str(SCRIPT), str(outdir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = json.loads((outdir / "summary.json").read_text())
    return proc, summary


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("gpu_check") / "out"
    proc, summary = _run(outdir, GPU_CHECK_FORCE_HANG=HANG_STAGE,
                         GPU_CHECK_LIMITS=f"{HANG_STAGE}={HANG_LIMIT_S}")
    return outdir, proc, summary


def test_runs_to_the_end_and_lists_every_stage(dry_run):
    outdir, proc, summary = dry_run
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["name"] for s in summary["stages"]] == [s.name for s in _driver().STAGES]
    assert summary["complete"] and summary["dry_run"], proc.stdout[-3000:]
    problems = {name: (s["status"], s.get("note"), s.get("cases"))
                for name, s in stages.items() if name != HANG_STAGE
                and s["status"] not in ("ok", "absent", "skipped")}
    assert not problems, proc.stdout[-6000:]
    # "absent": lstmgru.calibrate not in this checkout; "skipped": compile without ptxas only
    assert stages["calibrate"]["status"] in ("ok", "absent")
    assert all(s["status"] != "skipped" or s["name"] == "compile" for s in stages.values())
    assert summary["environment"]["torch"] and summary["environment"]["date"]
    assert "running from the checkout" in summary["environment"]["install"]
    # one non-zero exit for the stage that timed out; the compact summary is printed last
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "gpu_check summary (DRY RUN" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("first block")


def test_every_case_is_listed_with_its_result(dry_run):
    _, _, summary = dry_run
    driver = _driver()
    by_stage = {}
    for case in summary["cases"]:
        by_stage.setdefault(case["stage"], {})[case["name"]] = case["status"]
    for stage in driver.STAGES:
        if stage.cases:
            assert set(stage.cases(True)) <= set(by_stage.get(stage.name, {})), stage.name
    # every correctness case (2 families x 3 cells x 3 shapes, and split against tiled) ran
    correctness = by_stage["correctness"]
    assert len(correctness) == 27 and set(correctness.values()) == {"pass"}, correctness
    assert set(by_stage["smoke"].values()) == {"pass"}
    assert set(by_stage["barrier"].values()) == {"pass"} and len(by_stage["barrier"]) == 4
    assert set(by_stage["headline"].values()) == {"pass"} and len(by_stage["headline"]) == 8
    # the grid: a config the split family refuses is "refused", the rest measured
    grid = by_stage["grid"]
    refused = [name for name, status in grid.items() if status == "refused"]
    assert refused == ["triton-split lstm inference float32 B1 H1536 T2"], grid
    assert all(status == "pass" for name, status in grid.items() if name not in refused)
    # pytest's own cases (JUnit XML): the split protocol test passed, the GPU tests skipped
    tests = by_stage["pytest"]
    assert "pass" in tests.values() and "skipped" in tests.values(), tests
    assert not {"fail", "error"} & set(tests.values())


def test_a_hung_stage_is_cut_and_the_next_stage_runs(dry_run):
    _, proc, summary = dry_run
    names = [s["name"] for s in summary["stages"]]
    stages = {s["name"]: s for s in summary["stages"]}
    hung = stages[HANG_STAGE]
    assert hung["status"] == "timeout"
    driver = _driver()
    assert hung["seconds"] < HANG_LIMIT_S + driver.KILL_GRACE_S + 3, hung
    assert "SIGKILL" in proc.stdout  # it ignored SIGINT and SIGTERM
    after = stages[names[names.index(HANG_STAGE) + 1]]
    assert after["status"] == "ok" and after["cases"] == {"pass": 8}, after
    hung_cases = [c for c in summary["cases"] if c["stage"] == HANG_STAGE]
    assert hung_cases and all(c["status"] == "not run" for c in hung_cases)


def test_outdir_holds_at_most_eight_files(dry_run):
    outdir, _, summary = dry_run
    files = sorted(str(p.relative_to(outdir)) for p in outdir.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    assert files == ["details.tar.gz", "gpu_check.log", "summary.json"]
    assert summary["outdir_files"] == files
    with tarfile.open(outdir / "details.tar.gz") as tar:
        packed = {Path(n).name for n in tar.getnames()}
    assert {"correctness.out", "correctness.json", "pytest.xml", "headline.json"} <= packed
    log = (outdir / "gpu_check.log").read_text()
    assert "=== package:" in log and "PASS     triton-split lstm B16-H768-fp16" in log


def test_one_interpreter_per_stage_and_stage_selection(tmp_path):
    """GPU_CHECK_FORK=0 (a fresh interpreter per stage) and GPU_CHECK_STAGES (a second call
    that runs only some stages): the others are recorded as skipped."""
    proc, summary = _run(tmp_path / "out", GPU_CHECK_FORK="0", GPU_CHECK_STAGES="env")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["processes"] == "exec"
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses.pop("env") == "ok" and set(statuses.values()) == {"skipped"}
    assert summary["environment"]["commit"]
