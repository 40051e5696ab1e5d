"""The built wheel: what it holds, and that it installs and runs in a fresh virtual environment,
with triton and without it.

The wheel is built offline from a copy of the sources (``pip wheel --no-build-isolation
--no-index``, with the setuptools of the test environment: the ``test`` extra requires it), so the
checkout's ``build/`` and ``*.egg-info`` are neither used nor touched. The fresh environment gets
only the wheel (``--no-deps``); torch, numpy and their own dependencies come from the test
environment through a directory of symbolic links to the entries of the site-packages that hold
them, minus every ``lstmgru`` entry (an editable install's finder included) and, for the run
without triton, minus triton itself: triton is then not installed there, as for a user who did not
ask for the ``triton`` extra.
"""
import importlib.metadata
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import lstmgru

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# What a build needs from the checkout; anything else (tests, benchmarks, examples) must not
# reach the wheel anyway.
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in", "setup.py",
           "setup.cfg", "lstmgru", "kernels"]
# Where each source directory lands in the wheel (pyproject.toml's package-dir).
PACKAGE_DIRS = {"lstmgru": "lstmgru", "kernels": "lstmgru/_kernels"}
TIMEOUT = 300


def _project_version():
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    assert match, "pyproject.toml has no static version"
    return match.group(1)


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def test_version_comes_from_the_package_metadata():
    assert lstmgru.__version__ == importlib.metadata.version("lstmgru") == _project_version()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif path.exists():
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--no-cache-dir", "--wheel-dir", str(out), str(src)])
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel):
    version = _project_version()
    assert wheel.name == f"lstmgru-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"lstmgru-{version}.dist-info/METADATA").decode()
    dist_info = f"lstmgru-{version}.dist-info/"
    stray = sorted(n for n in names if not n.startswith(("lstmgru/", dist_info)))
    assert not stray, f"files outside lstmgru/ and the dist-info: {stray}"

    # Exactly the Python files of lstmgru/ and kernels/, at their installed places.
    expected = {f"{PACKAGE_DIRS[top]}/{p.relative_to(ROOT / top).as_posix()}"
                for top in PACKAGE_DIRS for p in (ROOT / top).rglob("*.py")
                if "__pycache__" not in p.parts}
    shipped = {n for n in names if n.startswith("lstmgru/") and n.endswith(".py")}
    assert shipped == expected, (f"missing from the wheel: {sorted(expected - shipped)}; "
                                 f"not in the sources: {sorted(shipped - expected)}")
    others = sorted(n for n in names if n.startswith("lstmgru/") and not n.endswith(".py"))
    assert others == ["lstmgru/calibration.json", "lstmgru/py.typed"], others
    assert {"lstmgru/__init__.py", "lstmgru/_kernels/__init__.py"} <= names

    assert f"{dist_info}licenses/LICENSE" in names
    assert re.search(r"^License-Expression: MIT$", metadata, re.MULTILINE), metadata[:2000]
    # pip show prints License-Expression only from metadata 2.4 on (older pip shows "License:"
    # blank: setuptools >= 77 writes the SPDX expression, never the legacy field)
    assert re.search(r"^Metadata-Version: 2\.([4-9]|\d\d)$", metadata, re.MULTILINE)
    description = re.search(r'^description = "(.*)"$', (ROOT / "pyproject.toml").read_text(),
                            re.MULTILINE).group(1).replace('\\"', '"')
    assert re.search(rf"^Summary: {re.escape(description)}$", metadata, re.MULTILINE)
    assert re.search(rf"^Version: {re.escape(version)}$", metadata, re.MULTILINE)
    # triton is an extra, never a hard requirement.
    for line in re.findall(r"^Requires-Dist: (.*)$", metadata, re.MULTILINE):
        if line.lower().startswith("triton"):
            assert 'extra == "triton"' in line, line


def _site_dir(module):
    """The sys.path entry a top-level module was imported from."""
    return Path(module.__file__).resolve().parents[1]


def _linked_deps(dest, skip):
    """A directory of links to the entries of the directories holding torch and numpy, without
    lstmgru (its editable finder included) and without the names starting with ``skip``."""
    import numpy

    dest.mkdir()
    for site in {_site_dir(torch), _site_dir(numpy)}:
        for entry in sorted(site.iterdir()):
            name = entry.name.lower()
            if name.startswith(("lstmgru", "__editable__", "_lstmgru") + skip):
                continue
            if entry.suffix == ".pth" or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return dest


# Runs in the fresh environment; prints one JSON line. Compares lstmgru with torch.nn on the same
# weights (output, final state, input, state and every parameter gradient). argv: mode, seed.
_PROBE = textwrap.dedent('''
    import importlib.abc, importlib.machinery, importlib.util, json, sys
    from importlib import metadata

    mode, seed = sys.argv[1], int(sys.argv[2])
    import torch

    if mode == "broken-triton":
        # triton is installed but fails to import (a build for another platform, a missing
        # library): found by find_spec, raising ImportError when executed.
        class _Broken(importlib.abc.Loader):
            def create_module(self, spec):
                return None

            def exec_module(self, module):
                raise ImportError("simulated: triton is installed but cannot be imported")

        class _BreakTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    return importlib.machinery.ModuleSpec(name, _Broken())
                return None

        sys.meta_path.insert(0, _BreakTriton())

    import lstmgru

    info = {"lstmgru": lstmgru.__file__,
            "kernels": importlib.util.find_spec("lstmgru._kernels").origin,
            "torch": torch.__file__, "version": lstmgru.__version__,
            "metadata_version": metadata.version("lstmgru"),
            "triton_spec": importlib.util.find_spec("triton") is not None}
    try:
        import triton  # noqa: F401
        info["triton_import"] = True
    except ImportError:
        info["triton_import"] = False

    def weighted(tensors, seed):
        gen = torch.Generator().manual_seed(seed)
        return sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in tensors)

    def run(module, x, hx):
        x = x.detach().clone().requires_grad_()
        hx = tuple(h.detach().clone().requires_grad_() for h in hx)
        out, final = module(x, hx if len(hx) > 1 else hx[0])
        finals = final if isinstance(final, tuple) else (final,)
        weighted([out, *finals], seed).backward()
        res = {"output": out, "x.grad": x.grad}
        res.update({f"final[{i}]": f for i, f in enumerate(finals)})
        res.update({f"hx[{i}].grad": h.grad for i, h in enumerate(hx)})
        res.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
        return res

    def diff(kind, dtype, backend, T=5, B=3, I=4, H=6, L=2):
        torch.manual_seed(seed)
        ref = getattr(torch.nn, kind)(I, H, num_layers=L, bidirectional=True).to(dtype)
        ours = getattr(lstmgru, kind)(I, H, num_layers=L, bidirectional=True).to(dtype)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(T, B, I, dtype=dtype)
        hx = tuple(torch.randn(2 * L, B, H, dtype=dtype) for _ in range(2 if kind == "LSTM" else 1))
        with lstmgru.use_backend(backend):
            a = run(ours, x, hx)
        b = run(ref, x, hx)
        assert a.keys() == b.keys()
        missing = [k for k in a if a[k] is None or b[k] is None]
        assert not missing, missing
        return max((a[k].double() - b[k].double()).abs().max().item() for k in a)

    for kind in ("LSTM", "GRU"):
        info[f"{kind}/auto/fp64"] = diff(kind, torch.float64, "auto")
        if mode == "with-triton":  # the shipped kernels, in Triton's interpreter on CPU tensors
            info[f"{kind}/triton/fp32"] = diff(kind, torch.float32, "triton", T=3, B=2, L=1)
    if mode != "with-triton":
        # Asking for the kernels: what happens (the contract is a RuntimeError saying why).
        try:
            with lstmgru.use_backend("triton"):
                lstmgru.GRU(2, 3)(torch.randn(2, 1, 2))
            info["triton_error"] = None
        except Exception as err:
            info["triton_error"] = [type(err).__name__, str(err)]
    print(json.dumps(info))
''')


@pytest.fixture(scope="module")
def fresh_python(wheel, tmp_path_factory):
    """The python of a new virtual environment with only the wheel installed, non-editable."""
    env_dir = tmp_path_factory.mktemp("fresh")
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    install = ["install", "--no-deps", "--no-index", "--no-cache-dir",
               "--disable-pip-version-check", str(wheel)]
    import pip

    if tuple(int(p) for p in pip.__version__.split(".")[:2]) >= (22, 3):
        # This environment's pip installs into the new one (--python): no ensurepip, much faster.
        _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
        _run([sys.executable, "-m", "pip", "--python", str(python), *install])
    else:
        _run([sys.executable, "-m", "venv", str(env_dir)])
        _run([str(python), "-m", "pip", *install])
    return python


def _probe(tmp_path, python, mode):
    skip = ("triton",) if mode == "without-triton" else ()
    deps = _linked_deps(tmp_path / "deps", skip)
    (tmp_path / "probe.py").write_text(_PROBE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "LSTMGRU_BACKEND",
                        "TRITON_INTERPRET", "PYTHONSAFEPATH")}
    # The interpreter lets the "triton" backend run (or try to) on CPU tensors.
    env.update(PYTHONPATH=str(deps), PYTHONNOUSERSITE="1", TRITON_INTERPRET="1")
    seed = random.randrange(2**31)
    # cwd is a scratch directory, so the checkout cannot be imported by accident.
    proc = _run([str(python), str(tmp_path / "probe.py"), mode, str(seed)], cwd=tmp_path, env=env)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["seed"] = seed
    # lstmgru and its kernels come from the wheel installed in the fresh environment.
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                env=env, cwd=tmp_path).stdout.strip()
    for key in ("lstmgru", "kernels"):
        path = Path(info[key]).resolve()
        assert path.is_relative_to(Path(site).resolve()), f"{key} imported from {path}, not {site}"
    assert Path(info["torch"]).resolve().is_relative_to(_site_dir(torch))
    assert info["version"] == info["metadata_version"] == _project_version()
    return info


def _has_triton():
    import importlib.util
    return importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not _has_triton(), reason="triton is not installed in the test environment")
def test_wheel_runs_in_a_fresh_environment_with_triton(fresh_python, tmp_path):
    info = _probe(tmp_path, fresh_python, "with-triton")
    assert info["triton_import"]
    for kind in ("LSTM", "GRU"):
        assert info[f"{kind}/auto/fp64"] <= 1e-10, info
        assert info[f"{kind}/triton/fp32"] <= 1e-4, info


def test_wheel_runs_in_a_fresh_environment_without_triton(fresh_python, tmp_path):
    info = _probe(tmp_path, fresh_python, "without-triton")
    assert not info["triton_spec"] and not info["triton_import"], "triton is still importable"
    for kind in ("LSTM", "GRU"):
        assert info[f"{kind}/auto/fp64"] <= 1e-10, info
    # Asking for the kernels says why they cannot run instead of failing on an import.
    kind, message = info["triton_error"]
    assert kind == "RuntimeError" and "triton" in message, info


@pytest.mark.skipif(not _has_triton(), reason="triton is not installed in the test environment")
def test_wheel_runs_in_a_fresh_environment_with_a_broken_triton(fresh_python, tmp_path):
    """triton found but failing to import: ``import lstmgru`` and the reference path still work;
    the explicit "triton" backend raises its RuntimeError with the reason."""
    info = _probe(tmp_path, fresh_python, "broken-triton")
    assert info["triton_spec"] and not info["triton_import"], "the simulation did not hold"
    for kind in ("LSTM", "GRU"):
        assert info[f"{kind}/auto/fp64"] <= 1e-10, info
    kind, message = info["triton_error"] or (None, "")
    assert kind == "RuntimeError" and "triton" in message, info
