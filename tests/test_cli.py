"""The one command line every job shares (jobs.common.cli), run as a user runs it: `python -m jobs.<name>`.

Fast: every case here fails before any Ray work, which is the point of checking configs first.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from conftest import ROOT, free_port

from jobs.common import cli
from jobs.common.errors import Interrupted
from jobs.pretrain import PretrainConfig

ENTRYPOINTS = [
    "jobs.tokenize", "jobs.pretrain", "jobs.tune", "jobs.evaluate", "jobs.experiment", "jobs.quickstart",
]


def run_job(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def entry_docstring(module: str) -> str:
    name = module if module == "jobs.quickstart" else f"{module}.__main__"
    return importlib.import_module(name).__doc__


@pytest.mark.parametrize("module", ENTRYPOINTS)
def test_help_describes_the_job(module):
    result = run_job(module, "--help")
    assert result.returncode == 0, result.stderr
    first_line = entry_docstring(module).strip().splitlines()[0]
    assert first_line in result.stdout
    assert "--verbose" in result.stdout


@pytest.mark.parametrize(("module", "args", "named"), [
    ("jobs.pretrain", ["train.lrr=1e-3"], "train.lrr: unknown key"),
    ("jobs.pretrain", ["train.lr=-1"], "train.lr"),
    ("jobs.pretrain", ["--config", "no/such/file.yaml"], "no/such/file.yaml"),
    ("jobs.tokenize", ["--config", "jobs/configs/tokenize-quickstart.yaml", "manifest=x.yaml"], "assemblies"),
    ("jobs.tune", ["--config", "jobs/configs/tune-quickstart.yaml", "space.window_size=[3]"], "space.window_size=3"),
    ("jobs.quickstart", ["train.micro_batch_size=3"], "train.global_batch_size"),
    ("jobs.evaluate", ["--config", "jobs/configs/evaluate-quickstart.yaml", "embedding.pooling=median"],
     "embedding.pooling"),
    ("jobs.evaluate", ["--config", "jobs/configs/evaluate-quickstart.yaml", "models=[{name: a, kind: random_init}]"],
     "`like` names the model"),
    ("jobs.experiment", ["--config", "jobs/configs/experiment-laptop.yaml", "--dry-run", "windows.values=[3, 21]"],
     "window_size=3"),
])
def test_bad_config_is_one_line_and_exit_2(module, args, named):
    result = run_job(module, *args)
    assert result.returncode == cli.EXIT_BAD_INPUT, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ["jobs.pretrain", "jobs.tune", "jobs.evaluate"])
def test_unreachable_tracking_is_one_line_and_exit_2(module):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    key = "pretrain.overrides.tracking" if module == "jobs.tune" else "tracking"
    config = {"jobs.tune": ["--config", "jobs/configs/tune-quickstart.yaml"],
              "jobs.evaluate": ["--config", "jobs/configs/evaluate-quickstart.yaml"]}.get(module, [])
    result = run_job(module, *config, f"{key}.uri={dead}", f"{key}.preflight_timeout_s=1")
    assert result.returncode == cli.EXIT_BAD_INPUT, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and dead in lines[0] and "not reachable" in lines[0], result.stderr


def job_raising(error: BaseException) -> cli.Job:
    def run(config: PretrainConfig):
        raise error

    return cli.Job("jobs.example", "An example job.", PretrainConfig, run, str)


@pytest.mark.parametrize(("error", "code", "said"), [
    (RuntimeError("the workers died\nsecond line"), cli.EXIT_FAILED,
     "error: the run failed: RuntimeError: the workers died"),
    (Interrupted("search 'x' was interrupted"), cli.EXIT_INTERRUPTED, "interrupted: search 'x' was interrupted"),
])
def test_failures_map_to_exit_codes(capsys, error, code, said):
    assert cli.main(job_raising(error), []) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [said + (" (--verbose shows the traceback)" if code == 1 else "")]


def test_verbose_shows_the_traceback(capsys):
    assert cli.main(job_raising(RuntimeError("boom")), ["--verbose"]) == cli.EXIT_FAILED
    assert "Traceback" in capsys.readouterr().err


def test_a_run_that_did_not_succeed_exits_1(capsys):
    job = cli.Job("jobs.example", "An example job.", PretrainConfig, lambda config: "no best trial", str,
                  succeeded=lambda result: False)
    assert cli.main(job, []) == cli.EXIT_FAILED
    assert capsys.readouterr().out.strip() == "no best trial"


@pytest.mark.parametrize("name", ["evaluate-quickstart.yaml", "evaluate-paper-tasks.yaml"])
def test_shipped_evaluation_configs_validate(name):
    from jobs.common.config import load_config
    from jobs.evaluate import EvaluateConfig

    config = load_config(EvaluateConfig, str(ROOT / "jobs" / "configs" / name))
    assert config.models and config.tasks
