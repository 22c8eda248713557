"""Guards on the repository layout that, when broken, break every process started here."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_platform_package_shadows_the_standard_library():
    assert not (ROOT / "platform" / "__init__.py").exists()
    result = run_from_root("-c", "import platform, uuid, ray; print(platform.python_version())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ".".join(map(str, sys.version_info[:3]))


def test_pytest_collects_from_the_root():
    result = run_from_root("-m", "pytest", "--co", "-q", "tests/test_layout.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_package_imports_no_platform_code():
    code = "import sys, model; bad = sorted(m for m in ('ray', 'mlflow', 'jobs') if m in sys.modules); print(bad)"
    result = run_from_root("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme.split("##")[0], "README must open with the test command"
    assert "make test" in ci


def test_torch_pin_is_exact():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps
