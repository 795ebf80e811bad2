"""Installing fastattn the way the README says, with the pip a new venv ships.

Without pyproject.toml, pip < 25.3 with setuptools >= 80 ran the legacy `setup.py develop`, which re-invoked pip with
build isolation: `pip install --no-build-isolation -e .` then failed with a bare "No module named 'torch'" (CI hid it
by upgrading pip first). These tests build in a fresh venv with its bundled pip, and check setup.py's CUDA plan."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastattn_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines functions only: setup() runs under __main__
    return mod


def _fake_torch(cuda_version, caps=()):
    cuda = types.SimpleNamespace(is_available=lambda: bool(caps), device_count=lambda: len(caps),
                                 get_device_capability=lambda i: caps[i])
    return types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda_version), cuda=cuda)


@pytest.fixture
def plan(monkeypatch):
    monkeypatch.delenv("FASTATTN_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    return _load_setup()._cuda_plan


def test_cuda_built_only_where_usable_or_asked(plan, monkeypatch):
    cuda_torch, toolkit = _fake_torch("13.0"), "/usr/local/cuda"
    # The first-contact case: CUDA torch and nvcc, no GPU, no archs named -> CPU only, saying how to force it.
    built, _, why = plan("auto", cuda_torch, toolkit)
    assert not built and "no GPU is visible" in why and "FASTATTN_CUDA_ARCHS" in why
    assert plan("auto", _fake_torch("13.0", [(9, 0), (9, 0), (8, 0)]), toolkit)[:2] == (True, "8.0;9.0")
    built, _, why = plan("auto", _fake_torch("13.0", [(7, 5)]), toolkit)
    assert not built and "sm_75" in why
    assert not plan("auto", _fake_torch(None), toolkit)[0]
    assert not plan("auto", cuda_torch, None)[0]
    assert not plan("0", _fake_torch("13.0", [(9, 0)]), toolkit)[0]
    assert plan("1", cuda_torch, toolkit)[:2] == (True, "8.0;8.6;8.9;9.0+PTX")
    with pytest.raises(SystemExit, match="no CUDA toolkit"):
        plan("1", cuda_torch, None)
    with pytest.raises(SystemExit, match="CPU-only"):
        plan("1", _fake_torch(None), toolkit)
    # CI names its archs explicitly and has no GPU: the .cu files must still be compiled.
    monkeypatch.setenv("FASTATTN_CUDA_ARCHS", "8.0;9.0")
    assert plan("auto", cuda_torch, toolkit)[:2] == (True, "8.0;9.0")


def test_ci_runs_the_readme_quick_start():
    """.ci/run reads the Quick start lines from README.md and does not upgrade pip first."""
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^pip install -r requirements\.txt && pip install --no-build-isolation -e \. && ", readme, re.M)
    assert re.search(r"^pip install -r requirements-test\.txt && python -m pytest tests$", readme, re.M)
    assert 'readme_cmd \'pip install -r requirements\\.txt && pip install --no-build-isolation -e \\.\'' in ci
    assert not re.search(r"pip install[^\n]*--upgrade pip|-U pip", ci), ".ci/run must use the pip the venv ships"


def test_requirements_leave_triton_to_torch():
    reqs = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [r for r in reqs if re.match(r"triton\b", r)], "torch pins its triton; a second line downloads two"


def _venv_with_shipped_pip(tmp_path):
    """A fresh venv (bundled pip) holding setuptools >= 80 and wheel but not torch; skips when they cannot be had."""
    base = getattr(sys, "_base_executable", sys.executable)
    venv = tmp_path / "venv"
    subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "setuptools>=80", "wheel"], capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        pytest.skip(f"cannot install setuptools>=80 into a fresh venv (offline?): {r.stderr[-300:]}")
    return py


def _project_copy(tmp_path):
    """The files an install reads, outside the repository (an editable install writes egg-info next to setup.py)."""
    src = tmp_path / "src"
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fastattn", src / "fastattn", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return src


@pytest.mark.slow
def test_editable_install_with_the_pip_a_venv_ships(tmp_path):
    py = _venv_with_shipped_pip(tmp_path)
    pip_version = subprocess.run([py, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
    src = _project_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "FASTATTN_", "PYTHON"))}

    # No torch in the venv: one clear message, naming both ways out (before: a bare ModuleNotFoundError).
    r = subprocess.run([py, "-m", "pip", "install", "--no-build-isolation", "-e", str(src)], capture_output=True,
                       text=True, timeout=600, env=env, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    for needle in ("torch is not importable", "--no-build-isolation", "FASTATTN_SKIP_EXT=1"):
        assert needle in out, out[-3000:]

    # The pure-Python editable install goes through PEP 660, never the legacy `setup.py develop` (--no-deps: torch
    # itself is not what this checks, and would take minutes to install).
    r = subprocess.run([py, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "-e", str(src)],
                       capture_output=True, text=True, timeout=600, env={**env, "FASTATTN_SKIP_EXT": "1"}, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"pip {pip_version}:\n{out[-3000:]}"
    assert "setup.py develop" not in out, f"pip {pip_version} took the legacy develop path"
    origin = subprocess.run([py, "-c", "import importlib.util; print(importlib.util.find_spec('fastattn').origin)"],
                            capture_output=True, text=True, cwd=tmp_path, env=env).stdout.strip()
    assert Path(origin).resolve() == (src / "fastattn" / "__init__.py").resolve(), origin
