"""platform/: the cluster image, the job-submission ignore rules and the local-stack launcher.

The fast tests read files (Dockerfile, .dockerignore, .rayignore) and run Ray's own packaging code.
The `services` tests start the real local stack (Ray head with token auth, MLflow, moto S3) on free
ports in a temporary state directory, submit real jobs to it, and stop it again.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import subprocess
import sys
import tomllib
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, free_port, launcher, local_stack, processes_with_marker, remove_ray_temp_dir

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- pins and Dockerfile


def pyproject_pins() -> dict[str, str]:
    """Exact `name==version` pins of pyproject's dependencies, keyed by name (extras kept apart)."""
    pins = {}
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[([^\]]+)\])?==([^;\s]+)", dep)
        if match:
            name, extras, version = match.groups()
            pins[name.lower()] = version
            if extras:
                pins[f"{name.lower()}[extras]"] = extras
    return pins


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comment lines dropped, `\\` continuations joined, the parser
    directive line (# syntax=...) treated as the comment it also is."""
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return instructions


KNOWN_INSTRUCTIONS = {
    "FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "LABEL", "ENTRYPOINT", "CMD",
    "EXPOSE", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD",
}  # fmt: skip


def test_dockerfile_parses_and_its_pins_equal_pyproject():
    instructions = dockerfile_instructions(ROOT / "platform" / "Dockerfile")
    keywords = [keyword for keyword, _ in instructions]
    assert set(keywords) <= KNOWN_INSTRUCTIONS, set(keywords) - KNOWN_INSTRUCTIONS
    assert keywords.count("FROM") == 1

    args = {}
    for keyword, text in instructions:
        if keyword == "ARG" and "=" in text:
            name, _, value = text.partition("=")
            args[name] = value.strip('"')
    pins = pyproject_pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["DEEPSPEED_VERSION"] == pins["deepspeed"]
    assert args["RAY_VERSION"] == pins["ray"]
    assert sorted(args["RAY_EXTRAS"].split(",")) == sorted(pins["ray[extras]"].split(","))
    assert args["MLFLOW_VERSION"] == pins["mlflow"]
    assert args["OPTUNA_VERSION"] == pins["optuna"]
    requires_python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires_python == ">=3.11" and args["PYTHON_VERSION"] == "3.11"

    # a CUDA devel base named by NVIDIA's tag scheme; the ARG comes before FROM so FROM can use it
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-devel-ubuntu\d\d\.\d\d", args["CUDA_IMAGE"])
    assert instructions[keywords.index("FROM")][1] == "${CUDA_IMAGE}"
    assert keywords.index("ARG") < keywords.index("FROM")

    # install order as in the Makefile: torch exactly, then DeepSpeed without build isolation, then
    # the project itself after its sources are copied in
    runs = " ".join(text for keyword, text in instructions if keyword == "RUN")
    torch_at = runs.index("pip install torch==${TORCH_VERSION}")
    deepspeed_at = runs.index("pip install --no-build-isolation deepspeed==${DEEPSPEED_VERSION}")
    ray_at = runs.index('"ray[${RAY_EXTRAS}]==${RAY_VERSION}"')
    project_at = runs.index("pip install .")
    assert torch_at < deepspeed_at < ray_at < project_at
    copies = [text for keyword, text in instructions if keyword == "COPY"]
    assert copies == ["pyproject.toml README.md ./", "model ./model", "jobs ./jobs"]
    assert keywords.index("COPY") > keywords.index("RUN")  # dependencies are cached below the sources
    users = [text for keyword, text in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}


def test_dockerfile_parses_with_buildkits_own_parser():
    """The `dockerfile` package wraps BuildKit's Go parser, the one `docker build` uses."""
    parser = pytest.importorskip("dockerfile", reason="BuildKit's parser: pip install dockerfile")
    path = ROOT / "platform" / "Dockerfile"
    official = [(command.cmd.upper(), command.value) for command in parser.parse_file(str(path))]
    ours = dockerfile_instructions(path)
    assert [keyword for keyword, _ in official] == [keyword for keyword, _ in ours]
    assert official[0] == ("ARG", (ours[0][1],))


def test_dockerignore_lets_in_only_the_sources_the_image_copies():
    from ray._private.thirdparty.pathspec import PathSpec

    lines = (ROOT / ".dockerignore").read_text().splitlines()
    spec = PathSpec.from_lines("gitwildmatch", [line for line in lines if line.strip()])

    def ignored(path: str) -> bool:  # Docker's rule too: the last matching pattern wins
        return spec.match_file(path)

    for kept in ["pyproject.toml", "README.md", "model/vocab.py", "jobs/config.py",
                 "jobs/assemblies/data/rCRS.fasta", "jobs/configs/pretrain-quickstart.yaml"]:  # fmt: skip
        assert not ignored(kept), kept
    for dropped in ["state/checkpoints/x.pt", ".venv/bin/python", ".git/config", ".env",
                    "tests/conftest.py", "jobs/.env", "model/secret.txt", "jobs/credentials",
                    "jobs/key.pem", "jobs/__pycache__/a.pyc", "data/genome.fa.gz",
                    "platform/local_stack.py"]:  # fmt: skip
        assert ignored(dropped), dropped


# ----------------------------------------------------------------------------- .rayignore


def upload_set(working_dir: Path, tmp_path: Path) -> dict[str, int]:
    """The files `ray job submit --working-dir <dir>` uploads, with sizes, computed by the same
    Ray function that builds the package (default excludes and .gitignore handling included)."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / f"package-{uuid.uuid4().hex}.zip"
    create_package(str(working_dir), target, include_gitignore=True, excludes=get_runtime_env_default_excludes())
    with zipfile.ZipFile(target) as archive:
        return {info.filename: info.file_size for info in archive.infolist() if not info.is_dir()}


FAKE_SECRET = "FAKE-SECRET-" + "0" * 8  # no real credential anywhere in these tests

# path -> uploaded?
SYNTHETIC_TREE = {
    "jobs/__init__.py": True,
    "jobs/tokenize.py": True,  # a job named like a credential pattern must still go up
    "model/vocab.py": True,
    "jobs/configs/tokenize-quickstart.yaml": True,
    "jobs/assemblies/data/rCRS.fasta": True,
    "jobs/assemblies/data/generated/toy-genome.fa.gz": True,
    "jobs/assemblies/data/.env": False,
    "jobs/assemblies/data/id_rsa": False,
    "genome.fa.gz": False,
    "data/hg38.fa": False,
    "jobs/assemblies/GCF_000001405.zip": False,
    "shards/train/part-0.parquet": False,
    "state/datasets/train/part-0.parquet": False,
    "state/checkpoints/epoch_1/model.pt": False,
    "state/local-stack/ray-auth-token": False,
    "mlruns/0/meta.yaml": False,
    "mlflow.db": False,
    "checkpoints/step_10/mp_rank_00_model_states.pt": False,
    ".venv/lib/site.py": False,
    "venv/bin/activate": False,
    "__pycache__/x.cpython-311.pyc": False,
    ".git/config": False,
    ".env": False,
    ".env.production": False,
    "credentials": False,
    ".aws/credentials": False,
    ".aws/config": False,
    ".ssh/id_ed25519": False,
    "deploy/tls.key": False,
    "deploy/cert.pem": False,
    "my_secret_settings.yaml": False,
    "service-account-prod.json": False,
    ".ray/auth_token": False,
    ".netrc": False,
    "infra/terraform.tfstate": False,
}


def make_tree(root: Path, files: dict[str, bool], big: dict[str, int] | None = None) -> None:
    for relative in files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_SECRET if not files[relative] else f"# {relative}\n")
    for relative, size in (big or {}).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(os.urandom(size))
    (root / ".rayignore").write_bytes((ROOT / ".rayignore").read_bytes())


def test_rayignore_keeps_code_and_shipped_genomes_but_not_data_state_or_credentials(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, SYNTHETIC_TREE)
    uploaded = set(upload_set(tree, tmp_path))
    for relative, expected in SYNTHETIC_TREE.items():
        assert (relative in uploaded) == expected, f"{relative}: expected {'in' if expected else 'out'}"
    assert ".rayignore" in uploaded  # harmless, and tells the cluster side what was left out


def test_rayignore_prunes_heavy_directories_without_walking_them():
    """Ray tests a directory by its path without a trailing slash: the rule must match that, or
    Ray would read (and hash) every file of state/ before leaving each one out."""
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", (ROOT / ".rayignore").read_text().splitlines())
    for directory in [
        "state",
        ".venv",
        ".git",
        "mlruns",
        "checkpoints",
        "jobs/.aws",
        ".ssh",
        "x/__pycache__",
    ]:
        assert spec.match_file(directory), directory
    for directory in ["jobs", "model", "jobs/assemblies", "jobs/assemblies/data", "jobs/configs"]:
        assert not spec.match_file(directory), directory


def test_repository_upload_is_small_and_clean(tmp_path):
    """What `ray job submit --working-dir .` sends from this checkout right now."""
    uploaded = upload_set(ROOT, tmp_path)
    assert "jobs/__init__.py" in uploaded and "model/vocab.py" in uploaded
    assert "jobs/assemblies/data/rCRS.fasta" in uploaded
    for name, size in uploaded.items():
        top = name.split("/")[0]
        assert top not in {"state", ".venv", ".git", "tmp"}, name
        assert not re.search(r"(^|/)(\.env|credentials|auth_token|id_rsa)|\.pem$|\.key$|secret", name), name
        assert size < 10 * MIB, f"{name} is {size / MIB:.1f} MiB: Ray warns from 10 MiB; keep data out of the tree"
    assert sum(uploaded.values()) < 50 * MIB


# ----------------------------------------------------------------------------- launcher, no services


def test_launcher_is_a_script_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    wrapper = ROOT / "platform" / "local-stack"
    assert wrapper.stat().st_mode & stat.S_IXUSR
    result = subprocess.run([str(wrapper), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("up", "down", "status", "env"):
        assert command in result.stdout


def test_launcher_on_an_empty_state_dir(tmp_path):
    status = launcher(tmp_path / "stack", "status", "--json")
    assert status.returncode == 3, status.stdout + status.stderr
    assert json.loads(status.stdout)["state"] == "down"
    assert launcher(tmp_path / "stack", "env").returncode == 2
    down = launcher(tmp_path / "stack", "down")
    assert down.returncode == 0 and "no process left" in down.stdout


def test_launcher_refuses_a_port_that_is_taken(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = launcher(tmp_path / "stack", "up", "--no-mlflow", "--ray-port", str(port), timeout=60)
    assert result.returncode == 2
    assert f"port {port}" in result.stderr
    assert launcher(tmp_path / "stack", "down").returncode == 0


def settings_from(argv: list[str], environ: dict[str, str], monkeypatch):
    """The settings `up` would ask for with these flags and exactly these GENGRAM_* variables."""
    for name in [n for n in os.environ if n.startswith("GENGRAM_")]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = local_stack.build_parser().parse_args(["up", *argv])
    return local_stack.requested_settings(args)


def test_launcher_settings_flags_over_environment_over_defaults(monkeypatch):
    defaults = settings_from([], {}, monkeypatch)
    assert (defaults.ray_port, defaults.mlflow, defaults.s3, defaults.fake_cluster) == (6379, True, False, None)
    assert defaults.model_fields_set == set()  # nothing asked for: a running stack's settings stand
    from_env = settings_from([], {"GENGRAM_RAY_PORT": "7000", "GENGRAM_S3": "yes", "GENGRAM_MLFLOW": "0",
                                  "GENGRAM_FAKE_CLUSTER": "1", "GENGRAM_S3_BUCKET": ""}, monkeypatch)  # fmt: skip
    assert (from_env.ray_port, from_env.s3, from_env.mlflow) == (7000, True, False)
    assert from_env.fake_cluster == str(ROOT / "cluster" / "local-fake-multinode.yaml")
    assert from_env.s3_bucket == "gengram-dev"  # an empty variable counts as unset
    assert from_env.model_fields_set == {"ray_port", "s3", "mlflow", "fake_cluster"}
    flagged = settings_from(["--ray-port", "7100", "--no-mlflow"], {"GENGRAM_RAY_PORT": "7000"}, monkeypatch)
    assert (flagged.ray_port, flagged.mlflow) == (7100, False)


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [("GENGRAM_RAY_PORT", "sixty", "is not a number"), ("GENGRAM_S3", "maybe", "is not a boolean")],
)
def test_launcher_names_a_bad_variable_in_one_line(tmp_path, variable, value, complaint):
    result = launcher(tmp_path / "stack", "up", "--no-mlflow", env=clean_env(**{variable: value}), timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"local-stack: {variable}={value!r} {complaint}")
    assert not (tmp_path / "stack" / "stack.json").exists()  # refused before anything was written


def test_launcher_service_table_names_every_port_setting():
    ports = [setting for service in local_stack.SERVICES for setting in service.ports]
    assert sorted(ports) == sorted(name for name in local_stack.Settings.model_fields if name.endswith("_port"))
    assert [service.name for service in local_stack.SERVICES] == ["s3", "mlflow", "ray"]


# ----------------------------------------------------------------------------- the running stack


def listening_sockets() -> dict[int, set[str]]:
    import psutil

    found: dict[int, set[str]] = {}
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr:
            found.setdefault(connection.laddr.port, set()).add(connection.laddr.ip)
    return found


class Stack:
    def __init__(self, state_dir: Path, up: subprocess.CompletedProcess):
        self.state_dir = state_dir
        self.up = up
        self.report = json.loads(launcher(state_dir, "status", "--json").stdout)
        self.urls = self.report["urls"]
        self.client_env = self.report["client_env"]
        self.token = Path(self.client_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()

    def submit(self, working_dir: Path, entrypoint: list[str], env: dict, timeout: float = 240):
        command = [str(RAY), "job", "submit", "--address", self.urls["ray_dashboard"],
                   "--working-dir", str(working_dir), "--", *entrypoint]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=working_dir)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("platform") / "local-stack"
    flags = ("--ray-port", "--dashboard-port", "--ray-client-port", "--mlflow-port", "--s3-port")
    ports = {flag: str(free_port()) for flag in flags}
    args = [item for pair in ports.items() for item in pair]
    up = launcher(state_dir, "up", "--s3", "--num-cpus", "2", *args)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Stack(state_dir, up)
    finally:
        down = launcher(state_dir, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert processes_with_marker(state_dir) == []
        remove_ray_temp_dir(state_dir)


@pytest.mark.ray
@pytest.mark.services
@pytest.mark.slow
class TestLocalStack:
    def test_up_prints_urls_environment_and_submit_commands(self, stack):
        out = stack.up.stdout
        for url in stack.urls.values():
            assert url.startswith("http://127.0.0.1:") and url in out
        assert "export RAY_AUTH_MODE=token" in out
        assert f"export RAY_AUTH_TOKEN_PATH={stack.client_env['RAY_AUTH_TOKEN_PATH']}" in out
        assert f"export MLFLOW_TRACKING_URI={stack.urls['mlflow']}" in out
        submit = f"job submit --address {stack.urls['ray_dashboard']} --working-dir . -- python -m jobs."
        assert f"{submit}tokenize --config jobs/configs/tokenize-quickstart.yaml" in out
        assert f"{submit}pretrain --config jobs/configs/pretrain-quickstart.yaml" in out
        env_sh = (stack.state_dir / "env.sh").read_text()
        assert "RAY_AUTH_MODE=token" in env_sh and stack.urls["mlflow"] in env_sh
        # the state directory is where the project keeps it: SQLite DB there, token private
        assert (stack.state_dir / "mlflow" / "mlflow.db").exists()
        token_path = Path(stack.client_env["RAY_AUTH_TOKEN_PATH"])
        assert token_path.parent == stack.state_dir and stat.S_IMODE(token_path.stat().st_mode) == 0o600

    def test_http_services_listen_on_loopback_only(self, stack):
        sockets = listening_sockets()
        for name, url in stack.urls.items():
            port = int(url.rsplit(":", 1)[1])
            assert sockets.get(port) == {"127.0.0.1"}, f"{name} listens on {sockets.get(port)}"

    def test_up_again_changes_nothing(self, stack):
        before = {name: s["pid"] for name, s in stack.report["services"].items()}
        again = launcher(stack.state_dir, "up")
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("already running") == 3
        after = json.loads(launcher(stack.state_dir, "status", "--json").stdout)
        assert after["state"] == "up"
        assert {name: s["pid"] for name, s in after["services"].items()} == before
        other = launcher(stack.state_dir, "up", "--mlflow-port", str(free_port()))
        assert other.returncode == 2 and "down` first" in other.stderr

    def test_job_submission_needs_the_token(self, stack, tmp_path):
        (tmp_path / "hello.py").write_text("print('hello from the cluster')\n")
        entry = ["python", "hello.py"]

        without = stack.submit(tmp_path, entry, clean_env(HOME=str(tmp_path)))
        assert without.returncode != 0
        assert "Unauthorized" in without.stdout + without.stderr

        wrong = stack.submit(tmp_path, entry, clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32)))
        assert wrong.returncode != 0
        assert re.search(r"Forbidden|Unauthorized|Invalid", wrong.stdout + wrong.stderr)

        good = stack.submit(tmp_path, entry, clean_env(**stack.client_env))
        assert good.returncode == 0, good.stdout + good.stderr
        assert "hello from the cluster" in good.stdout

    def test_working_dir_upload_leaves_out_credentials_and_data(self, stack, tmp_path):
        tree = tmp_path / "tree"
        files = {
            "list_files.py": True,
            "jobs/assemblies/data/toy.fasta": True,
            ".env": False,
            "credentials": False,
            ".aws/credentials": False,
            "service-account.json": False,
            "state/checkpoints/model.pt": False,
        }
        make_tree(tree, files, big={"genome.fa.gz": 20 * MIB})
        (tree / "list_files.py").write_text(
            "import json, os\n"
            "seen = sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk('.') for f in fs)\n"
            "print('SEEN ' + json.dumps(seen))\n"
            "print('MLFLOW ' + os.environ.get('MLFLOW_TRACKING_URI', ''))\n"
        )
        result = stack.submit(tree, ["python", "list_files.py"], clean_env(**stack.client_env))
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        seen = set(json.loads(re.search(r"^SEEN (.*)$", result.stdout, re.M).group(1)))
        assert {"list_files.py", "jobs/assemblies/data/toy.fasta"} <= seen
        assert not seen & {".env", "credentials", ".aws/credentials", "service-account.json",
                           "state/checkpoints/model.pt", "genome.fa.gz"}, seen  # fmt: skip
        assert FAKE_SECRET not in output
        # jobs get the tracking URI from the head's environment
        assert f"MLFLOW {stack.urls['mlflow']}" in result.stdout

    def test_mlflow_proxies_artifacts_into_the_bucket(self, stack, tmp_path):
        script = (
            "import mlflow, pathlib\n"
            "mlflow.set_experiment('platform-smoke')\n"
            "with mlflow.start_run() as run:\n"
            "    mlflow.log_metric('loss', 1.0)\n"
            "    path = pathlib.Path('note.txt'); path.write_text('hello')\n"
            "    mlflow.log_artifact(str(path))\n"
            "    print('RUN', run.info.run_id)\n"
        )
        # the client has the tracking URI only: no AWS credentials, no endpoint
        env = clean_env(MLFLOW_TRACKING_URI=stack.urls["mlflow"], MLFLOW_HTTP_REQUEST_MAX_RETRIES="2")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                timeout=120, env=env, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr
        run_id = re.search(r"RUN (\w+)", result.stdout).group(1)
        bucket = stack.report["config"]["s3_bucket"]
        with urllib.request.urlopen(f"{stack.urls['s3']}/{bucket}?list-type=2", timeout=10) as response:
            listing = response.read().decode()
        assert re.search(rf"<Key>mlflow/\d+/{run_id}/artifacts/note.txt</Key>", listing), listing

    def test_nothing_logs_the_token(self, stack):
        places = [stack.up.stdout, stack.up.stderr, (stack.state_dir / "env.sh").read_text()]
        places += [path.read_text(errors="replace") for path in (stack.state_dir / "logs").glob("*.log")]
        ray_temp = Path(stack.report["ray_temp_dir"])
        places += [path.read_text(errors="replace") for path in ray_temp.glob("session_latest/logs/*")
                   if path.is_file() and path.stat().st_size < 20 * MIB]  # fmt: skip
        assert all(stack.token not in text for text in places)

    def test_down_stops_every_process(self, stack):
        pids = processes_with_marker(stack.state_dir)
        assert len(pids) >= 5  # moto, mlflow, ray start, gcs_server, raylet, workers...
        down = launcher(stack.state_dir, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert processes_with_marker(stack.state_dir) == []
        sockets = listening_sockets()
        for url in stack.urls.values():
            assert int(url.rsplit(":", 1)[1]) not in sockets
        status = launcher(stack.state_dir, "status", "--json")
        assert status.returncode == 3 and json.loads(status.stdout)["state"] == "down"
