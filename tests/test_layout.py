"""Guards on the repository layout that, when broken, break every process started here."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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


LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # lint-imports reads pyproject.toml in its cwd and imports the packages from there.
    return subprocess.run([str(LINT_IMPORTS)], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def copy_of_the_rooms(destination: Path) -> Path:
    for name in ("jobs", "model"):
        shutil.copytree(ROOT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", destination)
    return destination


@pytest.mark.parametrize(("module", "line", "broken"), [
    # a job reaching into another job's internals
    ("jobs/tune/space.py", "from jobs.pretrain.worker import train_worker", "jobs.pretrain's modules are its own"),
    # two jobs beside each other
    ("jobs/tokenize/plan.py", "import jobs.pretrain", "jobs: entrypoints above jobs"),
    # the shared plumbing knowing a job
    ("jobs/common/storage.py", "from jobs.tokenize import fasta", "jobs: entrypoints above jobs"),
    # a cycle inside one job
    ("jobs/tune/config.py", "from jobs.tune import report", "no import cycle"),
    # the model room importing platform code
    ("model/gengram.py", "import mlflow", "model/ is PyTorch only"),
])
def test_import_contracts_catch_a_wrong_import(tmp_path, module, line, broken):
    tree = copy_of_the_rooms(tmp_path)
    source = tree / module
    source.write_text(source.read_text() + f"\n{line}  # planted by the test\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    assert f"{broken}" in result.stdout.replace("\n", " ") and "BROKEN" in result.stdout, result.stdout
