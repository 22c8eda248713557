"""End to end, as users do it: the commands of README.md and platform/README.md, run as written.

- `TestLocalStack`: `platform/local-stack up` in a copy of this working tree (its own state/, free
  ports), then the two `ray job submit --working-dir .` commands exactly as `up` prints them (the
  pretraining one shortened with key=value overrides). Checked: both jobs succeed; the dataset,
  the checkpoints and the final model are in the checkout's state/ (the jobs resolve relative paths
  against GENGRAM_HOME, which the stack hands them), not in the throwaway copy of the tree Ray runs
  each job in, so the second job finds the first one's dataset; the MLflow server's REST API has the
  run, its metric histories, its artifacts and the registered model; the MLflow UI shows the run
  and draws its metric charts in a real headless Chromium (screenshot kept as a test artifact);
  `down` leaves no process.
- `test_make_quickstart_in_a_fresh_clone`: `make quickstart`, the README's first command, in a
  fresh clone of the committed HEAD, reusing this venv instead of installing one.

Screenshots go to the test's tmp dir and to state/test-artifacts/ in this checkout (git-ignored).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet
import pytest
import yaml
from conftest import ROOT, clean_env, free_port, launcher, local_stack, processes_with_marker, remove_ray_temp_dir

VENV = Path(sys.executable).parent.parent
ARTIFACTS = ROOT / "state" / "test-artifacts"
# The quickstart pretraining config shortened to 10 steps with an evaluation and a checkpoint at 5
# and 10: enough for metric histories with two points, a resumable checkpoint and the final model.
SHORT_PRETRAIN = ("train.max_steps=10", "checkpoint.every=5", "train.eval_every=5")
EXPERIMENT, RUN_NAME, REGISTERED_MODEL = "gengram-quickstart", "quickstart", "gengram-debug"

# talk to our own services directly, whatever HTTP(S)_PROXY the environment sets
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, headers: dict | None = None, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with LOCAL.open(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server for {url} exited with code {process.returncode}"
        with contextlib.suppress(OSError), LOCAL.open(url, timeout=2):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def keep_artifact(source: Path) -> Path:
    """Copy a test artifact to state/test-artifacts/ (git-ignored), where it outlives pytest's tmp."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(source, ARTIFACTS / source.name))


def summary_field(output: str, label: str) -> str:
    """A value from the end-of-job summary the pretraining job prints (`  <label>:  <value>`)."""
    summary = output[output.rfind("Pretraining finished.") :]  # not some earlier log line alike
    match = re.search(rf"^\s+{re.escape(label)}:\s+(\S.*?)\s*$", summary, re.M)
    assert match, f"the job's output names no {label!r}:\n{output[-3000:]}"
    return match.group(1)


# ----------------------------------------------------------------------------- the local stack


def copy_working_tree(destination: Path) -> None:
    """A checkout of this working tree: tracked and untracked-but-not-ignored files as they are now
    (uncommitted changes are what is under test), no state/, .git or .venv; the venv is linked."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of it
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (destination / ".venv").symlink_to(VENV)


@dataclass(frozen=True)
class Submitted:
    output: str
    returncode: int
    seconds: float
    submission_id: str | None


class Stack:
    def __init__(self, checkout: Path, state_dir: Path, up: subprocess.CompletedProcess):
        self.checkout, self.state_dir, self.up = checkout, state_dir, up
        self.report = json.loads(self.launcher("status", "--json").stdout)
        self.urls = self.report["urls"]
        self.client_env = self.report["client_env"]
        self.commands = self.report["commands"]
        token = Path(self.client_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        self.ray_headers = {"Authorization": f"Bearer {token}"}

    def launcher(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return launcher(self.state_dir, *args, timeout=timeout, root=self.checkout)

    def submit(self, command: str, *overrides: str, timeout: float = 900) -> Submitted:
        """Run a submit command as `up` printed it, from the checkout's root, in a shell that has
        exported the client environment and nothing else pointing at a cluster or store."""
        start = time.monotonic()
        result = subprocess.run(
            [*shlex.split(command), *overrides], cwd=self.checkout, env=clean_env(**self.client_env),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        output = result.stdout + result.stderr
        match = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output)
        return Submitted(output, result.returncode, time.monotonic() - start, match and match.group(1))

    def job_status(self, submission_id: str) -> str:
        return get_json(f"{self.urls['ray_dashboard']}/api/jobs/{submission_id}", self.ray_headers)["status"]

    def mlflow(self, endpoint: str, body: dict | None = None, **query: str) -> dict:
        url = f"{self.urls['mlflow']}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return get_json(url, body=body)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    checkout = tmp_path_factory.mktemp("e2e") / "checkout"
    copy_working_tree(checkout)
    # the launcher's default state dir in that checkout; only the ports differ from a user's `up`, so
    # that this stack collides neither with a user's nor with another test run's
    state_dir = checkout / "state" / "local-stack"
    flags = ("--ray-port", "--dashboard-port", "--ray-client-port", "--mlflow-port")
    ports = [item for flag in flags for item in (flag, str(free_port()))]
    up = launcher(state_dir, "up", *ports, root=checkout)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Stack(checkout, state_dir, up)
    finally:
        down = launcher(state_dir, "down", root=checkout)
        leftovers = processes_with_marker(state_dir)
        remove_ray_temp_dir(state_dir, root=checkout)
        assert down.returncode == 0, down.stdout + down.stderr
        assert leftovers == []


@pytest.fixture(scope="module")
def tokenized(stack) -> Submitted:
    return stack.submit(stack.commands["tokenize"])


@pytest.fixture(scope="module")
def pretrained(stack, tokenized) -> Submitted:
    if tokenized.returncode != 0:
        pytest.fail(f"the tokenise job failed, nothing to pretrain on:\n{tokenized.output[-3000:]}")
    return stack.submit(stack.commands["pretrain"], *SHORT_PRETRAIN)


@pytest.fixture(scope="module")
def run(stack, pretrained) -> dict:
    """The pretraining run as MLflow's REST API has it."""
    assert pretrained.returncode == 0, pretrained.output[-5000:]
    run_id = summary_field(pretrained.output, "MLflow run")
    return stack.mlflow("runs/get", run_id=run_id)["run"]


@pytest.mark.ray
@pytest.mark.services
@pytest.mark.slow
class TestLocalStack:
    def test_up_hands_jobs_the_project_home(self, stack):
        assert stack.report["config"]["project_home"] == str(stack.checkout)
        assert f"GENGRAM_HOME={stack.checkout}" in stack.up.stdout
        # the head's own environment, which every job's driver and worker inherits
        head = stack.report["services"]["ray"]["pid"]
        environ = psutil.Process(head).environ()
        assert environ["GENGRAM_HOME"] == str(stack.checkout)
        assert environ["MLFLOW_TRACKING_URI"] == stack.urls["mlflow"]

    def test_tokenize_job_writes_the_dataset_into_the_projects_state(self, stack, tokenized):
        print(f"tokenise job: {tokenized.seconds:.0f} s")
        assert tokenized.returncode == 0, tokenized.output[-5000:]
        assert f"Job '{tokenized.submission_id}' succeeded" in tokenized.output
        assert stack.job_status(tokenized.submission_id) == "SUCCEEDED"
        assert "shares by tokens:" in tokenized.output  # the job's summary table
        dataset = stack.checkout / "state" / "datasets" / "quickstart"
        manifest = json.loads((dataset / "manifest.json").read_text())
        assert manifest["shards"]
        assert list((dataset / "train").glob("*.parquet")) and list((dataset / "val").glob("*.parquet"))

    def test_pretrain_job_trains_on_it_and_keeps_checkpoints_in_the_projects_state(self, stack, pretrained):
        print(f"pretraining job (10 steps): {pretrained.seconds:.0f} s")
        assert pretrained.returncode == 0, pretrained.output[-5000:]
        assert f"Job '{pretrained.submission_id}' succeeded" in pretrained.output
        assert stack.job_status(pretrained.submission_id) == "SUCCEEDED"
        out = pretrained.output
        assert summary_field(out, "tracking URI") == stack.urls["mlflow"]  # from the head's environment
        assert summary_field(out, "step") == "10"
        checkpoints = stack.checkout / "state" / "checkpoints" / RUN_NAME
        checkpoint, final_model = Path(summary_field(out, "checkpoint")), Path(summary_field(out, "final model"))
        assert checkpoint.parent == checkpoints and checkpoint.is_dir()
        assert final_model == checkpoints / "final_model" and any(final_model.iterdir())

    def test_mlflow_rest_api_has_the_run_its_metrics_and_the_registered_model(self, stack, pretrained, run):
        info, data = run["info"], run["data"]
        experiment = stack.mlflow("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
        assert info["experiment_id"] == experiment["experiment_id"]
        assert info["run_name"] == RUN_NAME and info["status"] == "FINISHED"
        found = stack.mlflow("runs/search", body={"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert [r["info"]["run_id"] for r in found] == [info["run_id"]]

        latest = {m["key"]: m for m in data["metrics"]}
        assert {"loss", "lm_loss", "val_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"} <= set(latest)
        for key in ("loss", "val_loss"):  # logged at steps 5 and 10 (log_every 5, eval_every=5)
            history = stack.mlflow("metrics/get-history", run_id=info["run_id"], metric_key=key)["metrics"]
            assert sorted(m["step"] for m in history) == [5, 10], history
            assert all(math.isfinite(m["value"]) and m["value"] > 0 for m in history)
        tags = {t["key"]: t["value"] for t in data["tags"]}
        assert tags["checkpoint.path"] == summary_field(pretrained.output, "checkpoint")
        params = {p["key"]: p["value"] for p in data["params"]}
        assert params["train.max_steps"] == "10" and params["data.dataset"] == "state/datasets/quickstart"

        listed = {f["path"] for f in stack.mlflow("artifacts/list", run_id=info["run_id"])["files"]}
        assert {"config.yaml", "deepspeed_config.json", "final_model", "plots"} <= listed
        plots = {f["path"] for f in stack.mlflow("artifacts/list", run_id=info["run_id"], path="plots")["files"]}
        assert "plots/loss_curves.png" in plots

        registered = stack.mlflow("registered-models/get", name=REGISTERED_MODEL)["registered_model"]
        assert [v["run_id"] for v in registered["latest_versions"]] == [info["run_id"]]
        versions = stack.mlflow("model-versions/search", filter=f"name='{REGISTERED_MODEL}'")["model_versions"]
        assert [(v["run_id"], v["status"]) for v in versions] == [(info["run_id"], "READY")]
        # artifacts went through the server (the job had only MLFLOW_TRACKING_URI) into the stack's store
        store = stack.state_dir / "mlflow" / "artifacts" / info["experiment_id"]
        assert (store / info["run_id"] / "artifacts" / "final_model" / "model_config.json").is_file()
        model_id = versions[0]["source"].removeprefix("models:/")
        assert (store / "models" / model_id / "artifacts" / "MLmodel").is_file()

    def test_mlflow_ui_shows_the_run_and_draws_its_metrics(self, stack, run, tmp_path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        experiment_id, run_id = run["info"]["experiment_id"], run["info"]["run_id"]
        start = time.monotonic()
        with chromium(tmp_path) as browser:
            wait = WebDriverWait(browser, 90, poll_frequency=0.5)

            # the experiment's "Training runs" page lists the run, linked, with its registered model
            browser.get(f"{stack.urls['mlflow']}/#/experiments/{experiment_id}/runs")
            link = wait.until(lambda b: visible(b.find_elements(By.CSS_SELECTOR, f"a[href*='/runs/{run_id}']")))
            assert link.text == RUN_NAME
            wait.until(lambda b: REGISTERED_MODEL in body_text(b))
            close_assistant(browser)
            browser.save_screenshot(str(tmp_path / "mlflow-runs.png"))

            # the run's metric charts, filtered to the losses: wait until Plotly has drawn a line in each
            browser.get(f"{stack.urls['mlflow']}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics")
            search_box = (By.CSS_SELECTOR, "input[placeholder*='Search metric']")
            search = wait.until(lambda b: visible(b.find_elements(*search_box)))
            search.send_keys("loss")
            wait.until(lambda b: all(f"{RUN_NAME} ({key})" in body_text(b) for key in ("loss", "val_loss", "lm_loss")))
            wait.until(lambda b: len(drawn_lines(b)) >= 3)
            close_assistant(browser)
            time.sleep(1)  # the charts re-lay out once the panel closes
            text = body_text(browser)
            screenshot = tmp_path / "mlflow-ui.png"
            browser.save_screenshot(str(screenshot))
        print(f"MLflow UI in Chromium: {time.monotonic() - start:.0f} s")
        for expected in (EXPERIMENT, RUN_NAME, "Model metrics", "loss", "val_loss", "Step"):
            assert expected in text, expected
        assert screenshot.stat().st_size > 20_000  # a page, not a blank
        for name in ("mlflow-runs.png", "mlflow-ui.png"):
            print(f"screenshot: {keep_artifact(tmp_path / name)}")

    def test_down_stops_every_process(self, stack):
        assert len(processes_with_marker(stack.state_dir)) >= 5  # mlflow, ray start, gcs, raylet, ...
        down = stack.launcher("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert processes_with_marker(stack.state_dir) == []
        status = stack.launcher("status", "--json")
        assert status.returncode == 3 and json.loads(status.stdout)["state"] == "down"


# ----------------------------------------------------------------------------- the browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@contextlib.contextmanager
def chromium(tmp_path: Path):
    """Debian's Chromium, headless, driven by Debian's chromedriver of the same version (installed by
    `make test`, see the Makefile's `browser` target)."""
    if not (CHROMIUM and CHROMEDRIVER):
        message = "chromium and chromedriver are not installed (`make browser` installs them with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox",  # root, in a container: Chromium's sandbox needs namespaces it lacks
        "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
        "--disable-background-networking", "--disable-component-update",  # no traffic beyond 127.0.0.1
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}", "--window-size=1600,1000",
    ):  # fmt: skip
        options.add_argument(flag)
    # an explicit driver path: Selenium Manager would otherwise try to download one
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def visible(elements: list):
    return next((element for element in elements if element.is_displayed()), None)


def body_text(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body").text


def drawn_lines(browser) -> list:
    """Plotly's drawn line traces (an SVG path with a non-empty outline) on the page."""
    from selenium.webdriver.common.by import By

    return [path for path in browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot path.js-line")
            if (path.get_attribute("d") or "").startswith("M")]  # fmt: skip


def close_assistant(browser) -> None:
    """MLflow 3 opens its Assistant panel beside every page; close it so that the screenshot shows
    the page itself. Cosmetic: absent in other versions, and nothing depends on it."""
    from selenium.webdriver.common.by import By

    for button in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            with contextlib.suppress(Exception):
                button.click()
            return


# ----------------------------------------------------------------------------- make quickstart


def link_venv(clone: Path) -> None:
    """Give the clone this checkout's venv without installing anything: a .venv of its own whose
    entries link to this venv's, plus its own setup stamp, newer than the clone's pyproject.toml,
    so that make takes setup as done. (A symlinked .venv would put the stamp in the shared venv.)"""
    venv = clone / ".venv"
    venv.mkdir()
    for entry in VENV.iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()


def pid_namespace_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.ray
@pytest.mark.slow
def test_make_quickstart_in_a_fresh_clone(tmp_path):
    """The README's first command, exactly, in a fresh clone of the committed HEAD (so also: nothing
    the quickstart needs is uncommitted or git-ignored), on the embedded default: no stack, no
    RAY_ADDRESS, MLFLOW_TRACKING_URI or GENGRAM_HOME."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=300)
    link_venv(clone)
    # setup must be up to date, or make would pip-install into the shared venv
    assert subprocess.run(["make", "-q", ".venv/.installed"], cwd=clone, timeout=60).returncode == 0

    # every process of the run inherits this, so that none can outlive the test unnoticed
    tag = uuid.uuid4().hex
    env, marker = clean_env(GENGRAM_E2E_QUICKSTART=tag), ("GENGRAM_E2E_QUICKSTART", tag)
    command = ["make", "quickstart"]
    if pid_namespace_works():
        # The jobs join any Ray cluster running on the machine (jobs/common/ray_session.py: address="auto" finds
        # one by the process table), e.g. another developer's or this pytest session's. A PID
        # namespace gives `make quickstart` the process table of a fresh machine; when make ends,
        # the kernel ends every process in it, and --kill-child ends make when the timeout kills unshare.
        command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *command]
    start = time.monotonic()
    try:
        # 125 steps on 2 CPU cores: 4 minutes measured here, 8 while other test sessions loaded the
        # machine; a stuck run (e.g. waiting for CPUs a too small local cluster lacks) is stopped at 15
        result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=900,
                                start_new_session=True)  # fmt: skip
    except subprocess.TimeoutExpired as error:
        # on POSIX, run() attaches what it had read so far, as bytes, whatever text=True says
        partial = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                          for part in (error.stdout, error.stderr) if part)  # fmt: skip
        pytest.fail(f"make quickstart did not finish within {error.timeout:.0f} s:\n{partial[-5000:]}")
    finally:
        leftovers = kill_marked(marker)
    seconds = time.monotonic() - start
    print(f"make quickstart: {seconds:.0f} s")
    output = result.stdout + result.stderr
    (tmp_path / "quickstart.log").write_text(output)
    assert result.returncode == 0, output[-5000:]
    assert leftovers == [], "processes of the quickstart outlived it"

    run_id = summary_field(output, "MLflow run")
    tracking_uri = summary_field(output, "tracking URI")
    assert tracking_uri == f"sqlite:///{clone}/state/mlflow/mlflow.db"
    ui_command = summary_field(output, "MLflow UI")
    assert ui_command == f".venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1"
    checkpoint, final_model = Path(summary_field(output, "checkpoint")), Path(summary_field(output, "final model"))
    assert checkpoint.parent == clone / "state" / "checkpoints" / RUN_NAME and checkpoint.is_dir()
    assert final_model.is_dir() and (final_model / "model_config.json").is_file()
    steps = yaml.safe_load((ROOT / "jobs" / "configs" / "pretrain-quickstart.yaml").read_text())["train"]["max_steps"]
    assert summary_field(output, "step") == str(steps)
    # The quickstart genomes are built to be learnable: the model ends clearly below the val rows'
    # unigram entropy, where a model that learnt nothing but base composition would end.
    val_loss, floor = float(summary_field(output, "val_loss")), float(summary_field(output, "base freqs").split()[0])
    assert floor - val_loss >= 0.05, f"val_loss {val_loss} against the unigram entropy {floor}"
    assert (clone / "state" / "datasets" / "quickstart" / "manifest.json").is_file()

    # The MLflow UI command as printed shows the run. Two options added: a free port (5000 may be a
    # user's stack), and one worker: uvicorn's default four each import MLflow, and on a busy 2-core
    # machine its supervisor kills and restarts workers that answer its pings late, for minutes.
    port = free_port()
    log_path = tmp_path / "mlflow-ui.log"
    log = open(log_path, "wb")  # noqa: SIM115
    server = subprocess.Popen([*shlex.split(ui_command), "--port", str(port), "--workers", "1"], cwd=clone,
                              stdout=log, stderr=log, env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                              start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(f"{base}/health", server, timeout=300)
        except (AssertionError, TimeoutError) as error:
            pytest.fail(f"{error}; its log:\n{log_path.read_text(errors='replace')[-3000:]}")
        found = get_json(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
        versions = get_json(
            f"{base}/api/2.0/mlflow/model-versions/search?"
            + urllib.parse.urlencode({"filter": f"name='{REGISTERED_MODEL}'"})
        )["model_versions"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert found["info"]["status"] == "FINISHED"
    assert {"loss", "val_loss"} <= {m["key"] for m in found["data"]["metrics"]}
    assert run_id in [v["run_id"] for v in versions]
    version = next(v["version"] for v in versions if v["run_id"] == run_id)

    # The quickstart's model, evaluated as the README says next, through each form of model URI: the
    # registered version, the run, and the exported directory embed every sequence alike.
    evaluation = tmp_path / "evaluate.yaml"
    evaluation.write_text(json.dumps({  # JSON is YAML
        "name": "uri-forms", "output": str(tmp_path / "evaluation"),
        "models": [{"name": "by-version", "uri": f"models:/{REGISTERED_MODEL}/{version}"},
                   {"name": "by-run", "uri": f"runs:/{run_id}/model"},
                   {"name": "by-directory", "uri": str(final_model)}],
        "tasks": [{"name": "ctcf", "source": {"type": "jaspar", "motif": "MA0139", "sites": 4, "length": 200,
                                              "per_class": 30, "seed": 0, "background": {
                                                  "fasta": "jobs/assemblies/data/generated-primate-a.fa.gz"}}}],
        "embedding": {"layers": "last"}, "probes": {"kinds": ["logistic"], "bootstrap": 50}}))
    command = [".venv/bin/python", "-m", "jobs.evaluate", "--config", str(evaluation)]
    if pid_namespace_works():  # its own Ray, as the quickstart had, not this session's
        command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *command]
    evaluated = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=600,
                               start_new_session=True)
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-5000:]
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    identities = {model["name"]: model["identity"] for model in results["models"]}
    assert identities["by-version"] == f"registered-{REGISTERED_MODEL}-v{version}"
    assert identities["by-run"].startswith(f"run-{run_id}") and identities["by-directory"].startswith("export-")
    embeddings = {name: (tmp_path / "evaluation").glob(f"embeddings/{identity}/ctcf-*/test/layer-*.parquet")
                  for name, identity in identities.items()}
    tables = [pyarrow.parquet.read_table(next(paths)) for paths in embeddings.values()]
    assert all(table.equals(tables[0]) for table in tables[1:]) and tables[0].num_rows > 0


def kill_marked(marker: tuple[str, str], grace: float = 15) -> list[int]:
    """Processes carrying `marker` (this test's only) still alive `grace` seconds after the command
    ended (Ray's shutdown, or the kernel tearing down the PID namespace, takes a moment): SIGKILLed,
    and returned so that the test can fail on them."""
    deadline = time.monotonic() + grace
    while local_stack.processes_carrying(*marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = local_stack.processes_carrying(*marker)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left
