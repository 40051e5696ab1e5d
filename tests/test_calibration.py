"""auto on CUDA: cuDNN until a measurement says a kernel is faster (the calibration table), the
fallback when a kernel fails to run, the user cache, and ``python -m lstmgru.calibrate``.

No GPU here: the CUDA choices are asked of ``backends.select`` directly with CUDA cases, with
the GPU's name and the table patched in."""
import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lstmgru
from lstmgru import backends, calibration

GPU = calibration.Gpu("Test GPU 80GB", "9.0")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def table(monkeypatch, tmp_path):
    """Write a user table (a list of entries) that auto then reads, on the test GPU."""
    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(calibration, "current_gpu", functools.lru_cache()(lambda: GPU))
    pytest.importorskip("lstmgru._kernels.split")
    from lstmgru._kernels import split

    # The split family asks the device for its SM count; there is no device here.
    monkeypatch.setattr(split, "_num_sms", lambda device: 132)

    def write(entries):
        table = calibration.empty_table("test")
        table["entries"] = entries
        (tmp_path / "calibration.json").write_text(json.dumps(table))
        calibration.reload()
        backends._select.cache_clear()

    write([])
    yield write
    calibration.reload()
    backends._select.cache_clear()


def _entry(forward=0.8, training=0.9, kernel="triton-tiled", device=GPU.name,
           capability=GPU.capability, cell="LSTM", dtype="float16", hidden=(513, 768),
           batch=(5, 16)):
    return {"device": device, "capability": capability, "cell": cell, "dtype": dtype,
            "hidden": list(hidden), "batch": list(batch),
            "kernels": {kernel: {"forward_ratio": forward, "training_ratio": training}}}


def _cuda(cell="LSTM", dtype=torch.float16, hidden=768, batch=16, **kw):
    return backends.Case(cell, "cuda", dtype, hidden, batch, **kw)


def _chosen(case):
    return backends.select(case).name


def test_the_shipped_table_is_empty_and_says_so():
    text = (ROOT / "lstmgru" / calibration.SHIPPED_NAME).read_text()
    shipped = json.loads(text)
    assert shipped["schema"] == calibration.SCHEMA and shipped["entries"] == []
    assert "Nothing has been measured" in shipped["about"]
    assert shipped["buckets"]["hidden"] == [list(b) for b in calibration.HIDDEN_BUCKETS]
    assert shipped["buckets"]["batch"] == [list(b) for b in calibration.BATCH_BUCKETS]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_without_a_measurement_cuda_runs_cudnn_where_it_can(table, dtype):
    for cell in ("LSTM", "GRU", "LSTMCell", "GRUCell"):
        assert _chosen(_cuda(cell, dtype)) == "native", cell
        assert _chosen(_cuda(cell, dtype, proj_size=0, batch=1)) == "native", cell
    # What only our kernels compute runs on them...
    assert _chosen(_cuda("GRU", dtype, reset_after=False)) == "triton"
    assert _chosen(_cuda("GRUCell", dtype, reset_after=False)) == "triton"
    for variant in ("layer_norm", "zoneout", "recurrent_dropout", "weight_drop", "reset"):
        assert _chosen(_cuda("LSTM", dtype, variants=(variant,))) == "triton", variant
    assert _chosen(_cuda("LSTM", dtype, batch=0, transform="torch.compile")) == "triton"
    # ... and the reference only what neither can.
    assert _chosen(_cuda("LSTM", dtype, proj_size=4, variants=("zoneout",))) == "reference"


def test_float64_on_cuda(table):
    assert _chosen(_cuda("LSTM", torch.float64)) == "native"
    assert _chosen(_cuda("GRU", torch.float64, reset_after=False)) == "reference"


@pytest.mark.parametrize("kernel", ["triton-tiled", "triton-split"])
def test_a_measured_faster_kernel_comes_first_in_its_bucket_only(table, kernel):
    table([_entry(kernel=kernel)])
    assert _chosen(_cuda()) == kernel
    assert _chosen(_cuda(hidden=513, batch=5)) == kernel  # the bucket's other end
    assert _chosen(_cuda(hidden=769)) == "native"            # the next hidden bucket
    assert _chosen(_cuda(batch=17)) == "native"              # the next batch bucket
    assert _chosen(_cuda(dtype=torch.bfloat16)) == "native"  # another dtype
    assert _chosen(_cuda("GRU")) == "native"                 # another cell
    assert _chosen(_cuda("LSTMCell")) == "native"
    assert _chosen(_cuda(proj_size=4)) == "native"           # not what was measured
    # Cases cuDNN cannot run are not the measured ones: unchanged.
    assert _chosen(_cuda(variants=("zoneout",))) == "triton"
    # The chosen kernel keeps a way out (the fallback wraps its recurrence).
    chosen = backends.select(_cuda())
    assert chosen.recurrence is not backends._REGISTRY["LSTM"][kernel].recurrence


def test_the_faster_of_two_kernels(table):
    entry = _entry()
    entry["kernels"]["triton-split"] = {"forward_ratio": 0.5, "training_ratio": 0.7}
    table([entry])
    assert _chosen(_cuda()) == "triton-split"


@pytest.mark.parametrize("forward,training", [(1.2, 1.3), (0.8, 1.05), (1.05, 0.8),
                                              (0.97, 0.96)])
def test_a_kernel_measured_slower_or_barely_faster_is_not_preferred(table, forward, training):
    table([_entry(forward, training)])
    assert _chosen(_cuda()) == "native"


@pytest.mark.parametrize("result", [{"refused": "x"}, {"failed": "RuntimeError: y"},
                                    {"disagrees": "z"}, {"forward_ratio": 0.5}])
def test_a_kernel_without_both_ratios_is_not_preferred(table, result):
    entry = _entry()
    entry["kernels"] = {"triton-tiled": result}
    table([entry])
    assert _chosen(_cuda()) == "native"


def test_an_entry_applies_to_its_gpu_only(table):
    table([_entry(device="Another GPU", capability="9.0")])
    assert _chosen(_cuda()) == "native"
    # An entry without a name stands for every GPU of its capability...
    table([_entry(device=None, capability="9.0")])
    assert _chosen(_cuda()) == "triton-tiled"
    table([_entry(device=None, capability="8.0")])
    assert _chosen(_cuda()) == "native"
    # ... unless an entry names this GPU.
    table([_entry(device=None, capability="9.0"), _entry(1.5, 1.5)])
    assert _chosen(_cuda()) == "native"


def test_variants_and_the_original_gru_ignore_the_table(table):
    table([_entry(cell="GRU", kernel="triton-split")])
    assert _chosen(_cuda("GRU")) == "triton-split"
    assert _chosen(_cuda("GRU", reset_after=False)) == "triton"
    assert _chosen(_cuda("GRU", variants=("layer_norm",))) == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks what happens without CUDA")
def test_no_calibration_without_cuda():
    assert calibration.current_gpu() is None
    assert backends.auto_order(_cuda()) == backends.AUTO_ORDER["cuda"]


def test_the_user_cache_is_merged_over_the_shipped_table(monkeypatch, tmp_path):
    shipped = [_entry(1.5, 1.5), _entry(0.5, 0.5, hidden=(1, 128))]
    user = [_entry(0.6, 0.6), _entry(0.7, 0.7, dtype="bfloat16")]
    merged = calibration.merge(shipped, user)
    assert len(merged) == 3
    assert calibration.entry_for(GPU, "LSTM", torch.float16, 768, 16, merged) is user[0]
    assert calibration.entry_for(GPU, "LSTM", torch.float16, 64, 16, merged) is shipped[1]
    assert calibration.entry_for(GPU, "LSTM", torch.bfloat16, 768, 16, merged) is user[1]

    # entries() reads the shipped table and the user cache at $LSTMGRU_CACHE_DIR.
    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path))
    assert calibration.user_cache_path() == tmp_path / "calibration.json"
    table = calibration.empty_table("test")
    table["entries"] = user
    (tmp_path / "calibration.json").write_text(json.dumps(table))
    calibration.reload()
    try:
        assert list(calibration.entries()) == user  # the shipped table is empty
        # A broken cache is ignored with a warning: auto keeps working.
        (tmp_path / "calibration.json").write_text("{not json")
        calibration.reload()
        with pytest.warns(RuntimeWarning, match="ignoring the calibration cache"):
            assert calibration.entries() == ()
    finally:
        calibration.reload()


def test_the_default_cache_path(monkeypatch, tmp_path):
    monkeypatch.delenv(calibration.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibration.user_cache_path() == tmp_path / "lstmgru" / "calibration.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert calibration.user_cache_path() == Path.home() / ".cache" / "lstmgru" / "calibration.json"


def test_import_reads_no_table():
    code = ("import sys, lstmgru; import lstmgru.backends as b; "
            "print('lstmgru.calibration' in sys.modules, 'lstmgru.calibrate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False", "False"]


# ---------------------------------------------------------------- fallback
class _LaunchRefused:
    """A kernel recurrence that fails to launch, counting its calls."""

    def __init__(self, error):
        self.error = error
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.error


@pytest.fixture
def failing_kernel(monkeypatch):
    """auto on the CPU tries "triton" first, and "triton" fails to launch."""
    def install(error):
        kernel = _LaunchRefused(error)
        monkeypatch.setitem(backends._REGISTRY["LSTM"], "triton", backends.Implementation(
            "triton", lambda case: None, recurrence=kernel))
        monkeypatch.setattr(backends, "AUTO_ORDER", {"cpu": ("triton", "native", "reference")})
        monkeypatch.setattr(backends, "_failed", {})
        backends._select.cache_clear()
        return kernel

    yield install
    backends._select.cache_clear()


def _torch_twin(**kw):
    torch.manual_seed(3)
    ref = torch.nn.LSTM(3, 5, **kw)
    ours = lstmgru.LSTM(3, 5, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_a_failed_launch_falls_back_once_with_one_warning(failing_kernel):
    kernel = failing_kernel(RuntimeError("cooperative launch refused: too many blocks"))
    ref, ours = _torch_twin(num_layers=2)
    x = torch.randn(6, 4, 3)
    expected = ref(x)[0]
    with pytest.warns(RuntimeWarning, match="'triton' kernels failed.*cooperative launch "
                                            "refused.*finishes on 'reference'.*run on 'native'"):
        first = ours(x)[0]
    torch.testing.assert_close(first, expected)  # finished on the reference
    assert kernel.calls == 1  # the second layer went straight to the fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = ours(x)[0]
    assert torch.equal(second, expected)  # later calls: torch's kernel, bit for bit
    assert kernel.calls == 1
    assert backends.select(backends.Case("LSTM", "cpu", torch.float32, 5, 4)).name == "native"


def test_an_explicit_kernel_still_raises(failing_kernel):
    failing_kernel(RuntimeError("split lstm forward: a program waited more than 1048576 polls"))
    _, ours = _torch_twin()
    with lstmgru.use_backend("triton"):
        with pytest.raises(RuntimeError, match="waited more than"):
            ours(torch.randn(6, 4, 3))
    assert backends._failed == {}


@pytest.mark.parametrize("error", [ValueError("gates_x must be (T, B, 4H)"),
                                   torch.OutOfMemoryError("CUDA out of memory")])
def test_errors_no_implementation_would_get_past_are_raised(failing_kernel, error):
    failing_kernel(error)
    _, ours = _torch_twin()
    with pytest.raises(type(error)):
        ours(torch.randn(6, 4, 3))
    assert backends._failed == {}


def test_a_triton_error_counts_as_a_failed_launch():
    error_type = type("OutOfResources", (Exception,), {"__module__": "triton.runtime.errors"})
    assert backends._is_launch_failure(error_type("shared memory"))
    assert backends._is_launch_failure(RuntimeError("Triton Error [CUDA]: launch failed"))
    assert not backends._is_launch_failure(ValueError("bad shape"))


# ---------------------------------------------------------------- the command
@pytest.mark.slow
def test_calibrate_dry_run_end_to_end(tmp_path):
    out = tmp_path / "cache" / "calibration.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it sets it
    proc = subprocess.run([sys.executable, "-m", "lstmgru.calibrate", "--dry-run", "--cells",
                           "LSTM", "--repeats", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wrote {out} (1 entries)" in proc.stdout
    table = json.loads(out.read_text())
    assert table["schema"] == calibration.SCHEMA
    [entry] = table["entries"]
    assert entry["cell"] == "LSTM" and entry["dtype"] == "float32"
    assert entry["hidden"] == [1, 128] and entry["batch"] == [1, 4]
    assert entry["device"].startswith("cpu (dry run") and entry["capability"] is None
    assert set(entry["versions"]) >= {"torch", "triton", "cudnn"} and entry["date"]
    assert entry["native_ms"]["forward"] > 0 and entry["native_ms"]["training"] > 0
    for kernel in calibration.KERNELS:  # both families ran in the interpreter
        result = entry["kernels"][kernel]
        assert result["forward_ratio"] > 0 and result["training_ratio"] > 0, result
    # What it wrote is the table auto reads.
    assert calibration.read_file(out) == table["entries"]


def test_calibrate_stops_at_its_time_budget_with_a_valid_table(tmp_path):
    out = tmp_path / "calibration.json"
    proc = subprocess.run([sys.executable, "-m", "lstmgru.calibrate", "--dry-run",
                           "--max-seconds", "0", "--output", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopping after 0.0 s (0 of 2 buckets)" in proc.stderr
    assert calibration.read_file(out) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU: it would calibrate")
def test_calibrate_without_a_gpu_says_so():
    proc = subprocess.run([sys.executable, "-m", "lstmgru.calibrate"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
