"""Shared fixtures: real services on 127.0.0.1 (moto's S3 server, an MLflow tracking server)
and a real local Ray cluster. Nothing here is mocked: tests talk to these over the network
exactly as the jobs do in production.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

# gcsfs by default first asks a bucket's type over gRPC, which an emulator does not speak (each call
# would wait out a 60 s timeout). Read when gcsfs is imported; Ray workers started here inherit it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

ROOT = Path(__file__).resolve().parents[1]
RCRS_FASTA = ROOT / "jobs" / "assemblies" / "data" / "rCRS.fasta"
VENV_BIN = Path(sys.executable).parent
LAUNCHER = ROOT / "platform" / "local_stack.py"


def _load_launcher():
    """platform/ is no package (see its README), so the launcher is loaded by its path: the tests use its
    free_port, its moto client environment and its process table rather than copies of them."""
    spec = importlib.util.spec_from_file_location("local_stack", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


local_stack = _load_launcher()
free_port = local_stack.free_port


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def registered_checkpoints(snapshot: str) -> list:
    """Checkpoints Ray Train has registered for a run (its checkpoint manager's snapshot):
    only those survive a failure; a checkpoint still being uploaded does not."""
    return json.loads(snapshot).get("checkpoint_results", []) if snapshot else []


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    env: dict[str, str]

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}, "key": "testing", "secret": "testing"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)

    def make_bucket(self, name: str) -> str:
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """moto's S3 server in its own process on 127.0.0.1, the way s3fs's own tests run it.

    The AWS_* variables are set for this test process (and so for a Ray cluster it starts),
    so any boto3/s3fs/pyarrow client with no explicit options reaches this server.
    """
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = local_stack.moto_client_env(endpoint)
    try:
        wait_for_http(endpoint, process)
        with mock.patch.dict(os.environ, env):
            yield S3Server(endpoint, env)
    finally:
        stop(process)
        log.close()


@dataclass(frozen=True)
class GcsServer:
    endpoint_url: str

    def filesystem(self):
        import gcsfs

        return gcsfs.GCSFileSystem(endpoint_url=self.endpoint_url, token="anon", skip_instance_cache=True)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[GcsServer]:
    """gcp-storage-emulator's GCS JSON API in its own process on 127.0.0.1, in memory."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "gcs.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [str(VENV_BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        stdout=log,
        stderr=log,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/storage/v1/b?project=test", process)
        yield GcsServer(f"http://127.0.0.1:{port}")
    finally:
        stop(process)
        log.close()


@dataclass(frozen=True)
class MlflowServer:
    tracking_uri: str
    root: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server over HTTP: SQLite backend, artifacts proxied by the server."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=log,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", process, timeout=120)
        yield MlflowServer(uri, root)
    finally:
        stop(process)
        log.close()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session. Logical CPUs exceed the 2 real cores so that a
    2-worker Train run and Ray Data tasks can be scheduled together, as on a real node.
    It starts after the S3 server so that its workers inherit the AWS_* variables."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------- the local-stack launcher
# (shared by test_platform.py, test_cluster.py and test_e2e.py)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points a client at some cluster or store."""
    prefixes = ("RAY_", "GENGRAM_", "AWS_", "MLFLOW_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def launcher(state_dir: Path, *args: str, timeout: float = 300, env: dict | None = None, root: Path = ROOT):
    """Run `platform/local_stack.py` of the checkout `root` (default: this one) from that checkout."""
    return subprocess.run(
        [sys.executable, str(root / LAUNCHER.relative_to(ROOT)), "--state-dir", str(state_dir), *args],
        capture_output=True, text=True, timeout=timeout, env=env or clean_env(), cwd=root,
    )  # fmt: skip


def processes_with_marker(state_dir: Path) -> list[int]:
    """Live processes of the stack in `state_dir`: all of them carry its marker in their environment."""
    return local_stack.processes_carrying(local_stack.MARKER, str(state_dir))


def remove_ray_temp_dir(state_dir: Path, root: Path = ROOT) -> None:
    """The launcher keeps Ray's logs after `down`; a test's go when the test is done. Under pytest's
    deep tmp path the launcher put them in /tmp/gengram-ray-<hash> (Unix socket path limit)."""
    config = json.loads(launcher(state_dir, "status", "--json", root=root).stdout)
    temp_dir = Path(config.get("ray_temp_dir", state_dir / "ray"))
    if temp_dir.name.startswith("gengram-ray-") or state_dir in temp_dir.parents:
        shutil.rmtree(temp_dir, ignore_errors=True)
