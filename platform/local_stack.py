#!/usr/bin/env python3
"""Local stack for development: a Ray head, an MLflow tracking server and (optionally) a moto S3
endpoint, all on 127.0.0.1, all state under state/local-stack/.

    platform/local-stack up [--s3] [--fake-cluster] [--no-mlflow] [...]
    platform/local-stack status [--json]
    platform/local-stack env            # export lines for clients (eval "$(platform/local-stack env)")
    platform/local-stack down

This is a script, run as a program (platform/ holds no Python package); the tests load it by its
path to share its free_port and moto credentials.

How it works
- Each service is started in its own session (process group) with the venv's executable
  (.venv/bin/ray, .venv/bin/mlflow, .venv/bin/moto_server). Its pid file records the pid and the
  process's creation time, so a recycled pid is never mistaken for a service of ours.
- Every process of the stack carries GENGRAM_LOCAL_STACK=<state dir> in its environment (children
  inherit it: Ray workers, job drivers, fake-cluster worker raylets). `down` stops each process
  group, then sweeps any process still carrying that marker, then verifies none is left.
  It never calls `ray stop`, which would stop every Ray process on the machine, other people's too.
- `up` is idempotent: a service whose pid file names a live process that answers its health check
  is left alone; a stale pid file is removed and the service started afresh.
- Jobs submitted to the head inherit its environment: MLFLOW_TRACKING_URI (the stack's MLflow) and
  GENGRAM_HOME (this checkout), against which the jobs resolve their relative paths. A job sent
  with `ray job submit --working-dir .` runs in a throwaway copy of the tree; GENGRAM_HOME makes
  its `state/...` outputs land in the project's state/, where the next job and the user find them.
- Ray token authentication stays on: the head runs with RAY_AUTH_MODE=token and a token file in the
  state directory (mode 0600), handed to clients with RAY_AUTH_TOKEN_PATH. The token itself is
  never printed or logged by this script.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(os.environ.get("GENGRAM_VENV_BIN", ROOT / ".venv" / "bin"))
MARKER = "GENGRAM_LOCAL_STACK"
DEFAULT_FAKE_CLUSTER = ROOT / "cluster" / "local-fake-multinode.yaml"
# moto accepts any credentials; these fixed dummy values are not secrets.
MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Unix socket paths are limited to 107 bytes; Ray puts <temp>/session_<date>_<pid>/sockets/plasma_store
# there, which needs about 65 bytes beyond the temp dir.
MAX_RAY_TEMP_DIR_LEN = 40
# psutil's creation time is the kernel's start tick plus the boot time, which the kernel reports in whole
# seconds and moves when NTP corrects the clock; a recycled pid belongs to a process started well after ours.
CREATE_TIME_SLACK = 2.0


class StackError(RuntimeError):
    pass


def log(message: str = "") -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# configuration


class Settings(BaseModel):
    """A stack's settings, as stack.json records them (and `status --json` shows them as "config").
    A field's alias is the variable that sets it when no flag does (see Requested)."""

    model_config = ConfigDict(validate_by_name=True)

    host: str = Field("127.0.0.1", validation_alias="GENGRAM_BIND_HOST")
    ray_port: int = Field(6379, validation_alias="GENGRAM_RAY_PORT")
    dashboard_port: int = Field(8265, validation_alias="GENGRAM_DASHBOARD_PORT")
    ray_client_port: int = Field(10001, validation_alias="GENGRAM_RAY_CLIENT_PORT")
    mlflow_port: int = Field(5000, validation_alias="GENGRAM_MLFLOW_PORT")
    s3_port: int = Field(9000, validation_alias="GENGRAM_S3_PORT")
    s3: bool = Field(False, validation_alias="GENGRAM_S3")
    s3_bucket: str = Field("gengram-dev", validation_alias="GENGRAM_S3_BUCKET")
    mlflow: bool = Field(True, validation_alias="GENGRAM_MLFLOW")
    # None: <state>/mlflow/artifacts, or s3://<bucket>/mlflow with --s3
    artifacts_destination: str | None = Field(None, validation_alias="GENGRAM_MLFLOW_ARTIFACTS")
    num_cpus: int = Field(4, validation_alias="GENGRAM_RAY_NUM_CPUS")
    # path of a fake_multinode autoscaling config, or None
    fake_cluster: str | None = Field(None, validation_alias="GENGRAM_FAKE_CLUSTER")
    # GENGRAM_HOME of submitted jobs: relative paths in configs resolve here. The variable is the one the
    # jobs themselves read (jobs/storage.py): set in a shell for local runs, the stack hands the same
    # value to its jobs.
    project_home: str = Field(str(ROOT), validation_alias="GENGRAM_HOME")

    @field_validator("fake_cluster")
    @classmethod
    def _fake_cluster_path(cls, value: str | None) -> str | None:
        if value in {"1", "true", "yes", "on"}:
            value = str(DEFAULT_FAKE_CLUSTER)
        return str(Path(value).resolve()) if value else value

    @field_validator("project_home")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return str(Path(value).resolve())


class Requested(BaseSettings, Settings):
    """The settings one call asks for: its flags, else the GENGRAM_* variables, else the defaults.
    A variable set to the empty string counts as unset."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True)


# what a bad variable is not, by pydantic's error type
NOT_A = {
    "int_parsing": "is not a number",
    "bool_parsing": "is not a boolean (1, true, yes, on / 0, false, no, off)",
}


def requested_settings(args: argparse.Namespace) -> Requested:
    flags = {key: value for key in Settings.model_fields if (value := getattr(args, key, None)) is not None}
    try:
        return Requested(**flags)
    except ValidationError as error:
        # flags are typed by argparse, so a bad value is a variable's, and its alias names it
        complaints = [f"{e['loc'][0]}={e['input']!r} {NOT_A.get(e['type'], e['msg'])}" for e in error.errors()]
        raise StackError("; ".join(complaints)) from None


class Paths:
    def __init__(self, state_dir: Path):
        self.state = state_dir
        self.logs = state_dir / "logs"
        self.pids = state_dir / "pids"
        self.config = state_dir / "stack.json"
        self.env_file = state_dir / "env.sh"
        self.token = state_dir / "ray-auth-token"
        self.mlflow = state_dir / "mlflow"
        self.fake_cluster_config = state_dir / "fake-cluster.yaml"
        default_temp = state_dir / "ray"
        if len(str(default_temp)) <= MAX_RAY_TEMP_DIR_LEN:
            self.ray_temp = default_temp
        else:  # a deep checkout: keep Ray's socket paths short, one directory per state dir
            digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:12]
            self.ray_temp = Path("/tmp") / f"gengram-ray-{digest}"

    def pid_file(self, service: str) -> Path:
        return self.pids / f"{service}.json"

    def log_file(self, service: str) -> Path:
        return self.logs / f"{service}.log"


def load_config(paths: Paths) -> Settings | None:
    """The settings in force; a stack.json from before a setting existed gets its default (and keeps the
    setting out of model_fields_set, which `up` checks)."""
    if paths.config.exists():
        return Settings.model_validate_json(paths.config.read_text())
    return None


def urls(config: Settings) -> dict:
    host = url_host(config.host)
    result = {"ray_dashboard": f"http://{host}:{config.dashboard_port}"}
    if config.mlflow:
        result["mlflow"] = f"http://{host}:{config.mlflow_port}"
    if config.s3:
        result["s3"] = f"http://{host}:{config.s3_port}"
    return result


def url_host(host: str) -> str:
    """The host to put in a URL: a wildcard bind is reached on loopback."""
    if host in {"0.0.0.0", "::", ""}:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def artifacts_destination(config: Settings, paths: Paths) -> str:
    if config.artifacts_destination:
        return config.artifacts_destination
    if config.s3:
        return f"s3://{config.s3_bucket}/mlflow"
    return str(paths.mlflow / "artifacts")


def moto_client_env(endpoint: str) -> dict:
    """What a boto3/s3fs/pyarrow client with no options of its own needs to reach moto at `endpoint`."""
    return {**MOTO_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


def client_env(config: Settings, paths: Paths) -> dict:
    """What a client (ray job submit, mlflow, a notebook) needs to talk to this stack."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(paths.token)}
    links = urls(config)
    if "mlflow" in links:
        env["MLFLOW_TRACKING_URI"] = links["mlflow"]
    if "s3" in links:
        env.update(moto_client_env(links["s3"]))
    return env


def commands(config: Settings) -> dict:
    ray = shlex.quote(str(VENV_BIN / "ray"))
    address = urls(config)["ray_dashboard"]
    submit = f"{ray} job submit --address {address} --working-dir ."
    result = {
        "tokenize": f"{submit} -- python -m jobs.tokenize --config jobs/configs/tokenize-quickstart.yaml",
        "pretrain": f"{submit} -- python -m jobs.pretrain --config jobs/configs/pretrain-quickstart.yaml",
        "ray_status": f"{ray} status --address 127.0.0.1:{config.ray_port}",
        "job_list": f"{ray} job list --address {address}",
    }
    if config.mlflow:
        port = config.mlflow_port
        result["mlflow_ui"] = f"open {urls(config)['mlflow']}  (remote: ssh -N -L {port}:127.0.0.1:{port} <host>)"
    return result


# ---------------------------------------------------------------------------------------------
# processes


def create_time(pid: int) -> float | None:
    """When process `pid` was created (seconds since the epoch), or None if it is gone."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.NoSuchProcess:
        return None


def live_processes(*attrs: str) -> Iterator[psutil.Process]:
    """Every process on the machine, with `attrs` in its .info; a zombie is gone for our purposes."""
    for process in psutil.process_iter(["status", *attrs]):
        if process.info["status"] not in {None, psutil.STATUS_ZOMBIE}:
            yield process


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def processes_carrying(variable: str, value: str) -> list[int]:
    """Live processes (other than this one and its parent) whose environment sets `variable` to `value`."""
    me = {os.getpid(), os.getppid()}
    return [
        process.pid
        for process in live_processes("environ")  # environ is None where not ours to read
        if process.pid not in me and (process.info["environ"] or {}).get(variable) == value
    ]


def stack_processes(paths: Paths, pgids: set[int]) -> list[int]:
    """Every live process of this stack: in one of its process groups, or carrying its marker."""
    me = {os.getpid(), os.getppid()}
    in_groups = [p.pid for p in live_processes() if p.pid not in me and process_group(p.pid) in pgids]
    return sorted(set(in_groups) | set(processes_carrying(MARKER, str(paths.state))))


def describe(pid: int) -> str:
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        cmdline = "?"
    return f"{pid} {cmdline[:160]}"


def read_pid_record(paths: Paths, service: str) -> dict | None:
    path = paths.pid_file(service)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def record_alive(record: dict | None) -> bool:
    """Whether the process a pid file names still runs. A record without a creation time (an older
    launcher wrote start ticks) is stale: `down` still finds such processes by their marker."""
    if not record or record.get("create_time") is None:
        return False
    created = create_time(record["pid"])
    return created is not None and abs(created - record["create_time"]) < CREATE_TIME_SLACK


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((url_host(host).strip("[]"), port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# talk to our own services directly, whatever HTTP(S)_PROXY the environment sets
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, headers: dict | None = None, method: str = "GET", timeout: float = 3.0) -> tuple[int | None, bytes]:
    """Status and body of a request to one of our services; status None when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with LOCAL.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except OSError:
        return None, b""


# ---------------------------------------------------------------------------------------------
# services


def service_env(paths: Paths) -> dict:
    """The environment every service starts from; each adds its own variables."""
    env = dict(os.environ)
    env[MARKER] = str(paths.state)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in job entrypoints = the venv's
    env.pop("RAY_ADDRESS", None)
    return env


def moto_command(config: Settings, paths: Paths, env: dict) -> list[str]:
    return [str(VENV_BIN / "moto_server"), "-H", config.host, "-p", str(config.s3_port)]


def moto_healthy(config: Settings, paths: Paths) -> bool:
    return http(urls(config)["s3"] + "/")[0] == 200


def create_bucket(config: Settings) -> None:
    status, _ = http(f"{urls(config)['s3']}/{config.s3_bucket}", method="PUT", timeout=10)
    if status != 200:
        raise StackError(f"could not create bucket {config.s3_bucket} in moto (HTTP {status})")


def mlflow_command(config: Settings, paths: Paths, env: dict) -> list[str]:
    # MLflow 3's job runner (GenAI scorers, trace roll-ups: unused here) adds seven processes.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    destination = artifacts_destination(config, paths)
    if destination.startswith("s3://") and config.s3:
        env.update(MOTO_CREDENTIALS)
        env["MLFLOW_S3_ENDPOINT_URL"] = urls(config)["s3"]
    elif not destination.startswith(("s3://", "gs://", "wasbs://", "hdfs://")):
        Path(destination).mkdir(parents=True, exist_ok=True)
    return [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{paths.mlflow / 'mlflow.db'}",
        "--artifacts-destination", destination,
        "--host", config.host, "--port", str(config.mlflow_port), "--workers", "1",
    ]  # fmt: skip


def mlflow_healthy(config: Settings, paths: Paths) -> bool:
    return http(urls(config)["mlflow"] + "/health")[0] == 200


def ray_command(config: Settings, paths: Paths, env: dict) -> list[str]:
    paths.ray_temp.mkdir(parents=True, exist_ok=True)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(paths.token)
    env.pop("RAY_AUTH_TOKEN", None)
    # Prometheus endpoints of the dashboard and autoscaler: Ray's fixed defaults (44227, 44217)
    # would collide with any other local Ray cluster; Ray binds them to the node IP's interfaces.
    env.setdefault("DASHBOARD_METRIC_PORT", str(free_port()))
    env.setdefault("AUTOSCALER_METRIC_PORT", str(free_port()))
    # On SIGTERM `ray start --block` first drains the node for up to 30 s (for Serve proxies, of
    # which this stack has none); it never finishes draining here, so `down` took 30 s longer.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    env.update({k: v for k, v in client_env(config, paths).items() if not k.startswith("RAY_")})
    env["GENGRAM_HOME"] = config.project_home
    num_cpus = config.num_cpus
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--port", str(config.ray_port),
        "--dashboard-host", config.host, "--dashboard-port", str(config.dashboard_port),
        "--ray-client-server-port", str(config.ray_client_port),
        "--dashboard-agent-listen-port", "0",  # not the fixed 52365 other local clusters use
        "--temp-dir", str(paths.ray_temp),
    ]  # fmt: skip
    if config.fake_cluster:
        fake_config, num_cpus = write_fake_cluster_config(config, paths)
        command.append(f"--autoscaling-config={fake_config}")
        env["RAY_FAKE_CLUSTER"] = "1"
        env.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", "2")
    return [*command, "--num-cpus", str(num_cpus)]


def ray_healthy(config: Settings, paths: Paths) -> bool:
    if not paths.token.exists():
        return False
    # the job server answers once the dashboard's job module is up; jobs also need the head
    # node registered, which can come a few seconds later
    dashboard = urls(config)["ray_dashboard"]
    headers = {"Authorization": f"Bearer {paths.token.read_text().strip()}"}
    if http(f"{dashboard}/api/jobs/", headers)[0] != 200:
        return False
    _, body = http(f"{dashboard}/api/v0/nodes?limit=1000", headers, timeout=5)
    try:
        listed = json.loads(body)["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError):
        return False
    return any(node.get("is_head_node") and node.get("state") == "ALIVE" for node in listed)


def write_fake_cluster_config(config: Settings, paths: Paths) -> tuple[Path, int]:
    """Copy the fake-multinode autoscaling config with the provider pointed at this head's port.
    Returns the copy and the head's CPU count from its node type."""
    import yaml  # the venv's PyYAML; only needed for --fake-cluster

    data = yaml.safe_load(Path(config.fake_cluster).read_text())
    if data.get("provider", {}).get("type") != "fake_multinode":
        raise StackError(f"{config.fake_cluster} is not a fake_multinode autoscaling config")
    data["provider"]["gcs_address"] = f"127.0.0.1:{config.ray_port}"
    head = data["available_node_types"][data["head_node_type"]]
    paths.fake_cluster_config.write_text(yaml.safe_dump(data, sort_keys=False))
    return paths.fake_cluster_config, int(head.get("resources", {}).get("CPU", 0))


@dataclass(frozen=True)
class Service:
    name: str
    enabled: Callable[[Settings], bool]
    ports: tuple[str, ...]  # the settings that name the ports it binds
    command: Callable[[Settings, Paths, dict], list[str]]  # its command line; adds its variables to env
    healthy: Callable[[Settings, Paths], bool]
    after_start: Callable[[Settings], None] | None = None  # once healthy after a fresh start


SERVICES = (  # start order; stopped in reverse
    Service("s3", lambda config: config.s3, ("s3_port",), moto_command, moto_healthy, create_bucket),
    Service("mlflow", lambda config: config.mlflow, ("mlflow_port",), mlflow_command, mlflow_healthy),
    Service("ray", lambda config: True, ("ray_port", "dashboard_port", "ray_client_port"), ray_command, ray_healthy),
)


def enabled_services(config: Settings) -> list[Service]:
    return [service for service in SERVICES if service.enabled(config)]


def ensure_token(paths: Paths) -> None:
    if paths.token.exists() and paths.token.read_text().strip():
        paths.token.chmod(0o600)
        return
    fd = os.open(paths.token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))


def start_service(service: Service, config: Settings, paths: Paths) -> dict:
    for setting in service.ports:
        port = getattr(config, setting)
        if port_in_use(config.host, port):
            variable = Settings.model_fields[setting].validation_alias
            raise StackError(
                f"{service.name}: port {port} on {config.host} is already taken by another process; "
                f"choose another with --{setting.replace('_', '-')} or {variable}"
            )
    env = service_env(paths)
    command = service.command(config, paths, env)
    log_path = paths.log_file(service.name)
    with open(log_path, "ab") as log_handle:
        log_handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {service.name}\n".encode())
        log_handle.flush()
        process = subprocess.Popen(
            command, cwd=paths.state, env=env, stdin=subprocess.DEVNULL,
            stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    record = {"pid": process.pid, "pgid": process.pid, "create_time": create_time(process.pid), "command": command}
    paths.pid_file(service.name).write_text(json.dumps(record))
    return record


def wait_healthy(service: Service, config: Settings, paths: Paths, record: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.healthy(config, paths):
            return
        if not record_alive(record):
            raise StackError(
                f"{service.name} exited during start-up; last log lines:\n{tail(paths.log_file(service.name))}"
            )
        time.sleep(0.5)
    raise StackError(
        f"{service.name} did not become healthy within {timeout:.0f} s; log: {paths.log_file(service.name)}"
    )


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def group_alive(pgid: int) -> bool:
    return any(process_group(process.pid) == pgid for process in live_processes())


def wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.2)
    return not group_alive(pgid)


def stop_group(leader: int, pgid: int, grace: float) -> None:
    """SIGTERM the leader first (`ray start --block` then shuts its node down in order), then
    the whole group, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(leader, signal.SIGTERM)
    if wait_group_gone(pgid, grace):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    if wait_group_gone(pgid, 5):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    wait_group_gone(pgid, 5)


# ---------------------------------------------------------------------------------------------
# commands


def service_states(config: Settings, paths: Paths) -> dict:
    states = {}
    for service in enabled_services(config):
        record = read_pid_record(paths, service.name)
        alive = record_alive(record)
        states[service.name] = {
            "running": alive,
            "healthy": alive and service.healthy(config, paths),
            "pid": record["pid"] if alive else None,
            "log": str(paths.log_file(service.name)),
        }
    return states


def settings_for_up(requested: Requested, paths: Paths) -> Settings:
    """What `up` runs with: the requested settings, or, when the stack already runs, the stored ones, which
    a request may repeat but not change."""
    stored = load_config(paths)
    if stored is None or not any(s["running"] for s in service_states(stored, paths).values()):
        return Settings(**requested.model_dump())
    missing = sorted(set(Settings.model_fields) - stored.model_fields_set)
    if missing:  # started by an older launcher: its processes lack what these settings add
        raise StackError(
            f"the stack in {paths.state} was started by an older version of this launcher "
            f"(no {', '.join(missing)}); run `down`, then `up`"
        )
    changed = sorted(k for k in requested.model_fields_set if getattr(requested, k) != getattr(stored, k))
    if changed:
        raise StackError(
            f"the stack in {paths.state} is running with other settings ({', '.join(changed)}); "
            "run `down` first, then `up` with the new settings"
        )
    return stored


def cmd_up(args: argparse.Namespace, paths: Paths) -> int:
    config = settings_for_up(requested_settings(args), paths)
    if not is_loopback(config.host):
        log(
            f"WARNING: binding the Ray dashboard/job server, MLflow and S3 to {config.host}, not "
            "loopback: anyone who can reach that address can use MLflow and S3 (Ray needs the token)."
        )
    if config.fake_cluster and not Path(config.fake_cluster).is_file():
        raise StackError(f"fake cluster config not found: {config.fake_cluster}")
    if not Path(config.project_home).is_dir():
        raise StackError(f"project home (GENGRAM_HOME) is not a directory: {config.project_home}")

    for directory in (paths.state, paths.logs, paths.pids, paths.mlflow):
        directory.mkdir(parents=True, exist_ok=True)
    paths.state.chmod(0o700)
    ensure_token(paths)
    paths.config.write_text(config.model_dump_json(indent=2))

    started = []
    try:
        for service in enabled_services(config):
            record = read_pid_record(paths, service.name)
            if record_alive(record):
                wait_healthy(service, config, paths, record, args.timeout)
                log(f"{service.name:7s} already running (pid {record['pid']})")
                continue
            if record is not None:
                paths.pid_file(service.name).unlink(missing_ok=True)  # stale
            record = start_service(service, config, paths)
            started.append(service.name)
            wait_healthy(service, config, paths, record, args.timeout)
            log(f"{service.name:7s} started (pid {record['pid']}, log {paths.log_file(service.name)})")
            if service.after_start:
                service.after_start(config)
    except StackError:
        for name in reversed(started):
            stop_service(name, paths)
        raise
    write_env_file(config, paths)
    print_summary(config, paths)
    return 0


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def stop_service(service: str, paths: Paths, grace: float = 30.0) -> None:
    record = read_pid_record(paths, service)
    if record_alive(record):
        stop_group(record["pid"], record["pgid"], grace)
    paths.pid_file(service).unlink(missing_ok=True)


def cmd_down(args: argparse.Namespace, paths: Paths) -> int:
    pgids = set()
    for service in reversed(SERVICES):
        record = read_pid_record(paths, service.name)
        if record_alive(record):  # a dead leader's pgid may since belong to someone else
            pgids.add(record["pgid"])
            log(f"stopping {service.name} (process group {record['pgid']})")
        stop_service(service.name, paths, grace=args.grace)
    # anything of ours that escaped its process group (it still carries the marker)
    leftovers = stack_processes(paths, pgids)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = stack_processes(paths, pgids)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    leftovers = stack_processes(paths, pgids)
    if leftovers:
        log("ERROR: these processes of the stack are still alive:\n  " + "\n  ".join(map(describe, leftovers)))
        return 1
    log(f"local stack in {paths.state} is down; no process left")
    return 0


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    config = load_config(paths)
    if config is None:
        states, report = {}, {"state_dir": str(paths.state), "configured": False, "services": {}}
    else:
        states = service_states(config, paths)
        report = {
            "state_dir": str(paths.state),
            "configured": True,
            "config": config.model_dump(),
            "services": states,
            "urls": urls(config),
            "client_env": client_env(config, paths),
            "commands": commands(config),
            "ray_temp_dir": str(paths.ray_temp),
        }
    all_up = bool(states) and all(s["healthy"] for s in states.values())
    none_up = not any(s["running"] for s in states.values())
    report["state"] = "up" if all_up else "down" if none_up else "degraded"
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        log(f"local stack ({paths.state}): {report['state']}")
        for name, state in states.items():
            word = "healthy" if state["healthy"] else "running, NOT healthy" if state["running"] else "stopped"
            pid = f" (pid {state['pid']})" if state["pid"] else ""
            log(f"  {name:7s} {word}{pid}")
        if all_up:
            for name, url in report["urls"].items():
                log(f"  {name:14s} {url}")
    return 0 if all_up else 3 if none_up else 1


def cmd_env(args: argparse.Namespace, paths: Paths) -> int:
    config = load_config(paths)
    if config is None:
        raise StackError(f"no stack configured in {paths.state}; run `up` first")
    for key, value in client_env(config, paths).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def write_env_file(config: Settings, paths: Paths) -> None:
    lines = ["# source me: client environment for the local stack (no secret values in here)"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in client_env(config, paths).items()]
    paths.env_file.write_text("\n".join(lines) + "\n")


def print_summary(config: Settings, paths: Paths) -> None:
    links = urls(config)
    cmds = commands(config)
    log()
    log(f"Local stack is up. State: {paths.state}")
    log(f"  Ray dashboard + job server   {links['ray_dashboard']}   (token authentication on)")
    log(f"  Ray GCS port                 {config.ray_port}   (cluster state: {cmds['ray_status']})")
    if "mlflow" in links:
        log(f"  MLflow tracking server + UI  {links['mlflow']}   (artifacts: {artifacts_destination(config, paths)})")
    if "s3" in links:
        log(f"  S3 (moto, in memory)         {links['s3']}   bucket s3://{config.s3_bucket}")
    if config.fake_cluster:
        log(f"  autoscaling (fake multinode) {paths.fake_cluster_config}")
    log()
    log(f'Client environment (also in {paths.env_file}; `source` it or eval "$(platform/local-stack env)"):')
    for key, value in client_env(config, paths).items():
        log(f"  export {key}={shlex.quote(value)}")
    log()
    log("Submit jobs from the repository root. Jobs get MLFLOW_TRACKING_URI and GENGRAM_HOME from the head;")
    log(f"relative paths in their configs resolve against GENGRAM_HOME={config.project_home}")
    log("(state/datasets/..., state/checkpoints/...: where the next job and you find them):")
    log(f"  {cmds['tokenize']}")
    log(f"  {cmds['pretrain']}")
    if "mlflow_ui" in cmds:
        log()
        log(f"MLflow UI: {cmds['mlflow_ui']}")
    log(f"Ray dashboard in a browser: {links['ray_dashboard']} (paste the token from $RAY_AUTH_TOKEN_PATH when asked)")
    log("Stop everything: platform/local-stack down")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="local-stack", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--state-dir", type=Path,
        default=Path(os.environ.get("GENGRAM_STATE_DIR", ROOT / "state")) / "local-stack",
        help="where pids, logs, the token, the MLflow DB and artifacts live (default: state/local-stack; "
        "env GENGRAM_STATE_DIR sets the parent)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start whatever is not running (idempotent)")
    up.add_argument("--host", help="bind address for dashboard, MLflow and S3 (default 127.0.0.1)")
    up.add_argument("--ray-port", type=int, help="Ray GCS port (default 6379)")
    up.add_argument("--dashboard-port", type=int, help="Ray dashboard and job server port (default 8265)")
    up.add_argument("--ray-client-port", type=int, help="Ray client server port (default 10001)")
    up.add_argument("--num-cpus", type=int, help="logical CPUs of the Ray head (default 4)")
    up.add_argument("--mlflow-port", type=int, help="MLflow port (default 5000)")
    up.add_argument("--no-mlflow", dest="mlflow", action="store_const", const=False, help="no MLflow server")
    up.add_argument("--artifacts-destination", help="MLflow artifact store: a directory or s3://bucket/prefix")
    up.add_argument("--s3", dest="s3", action="store_const", const=True, help="also start moto's S3 server")
    up.add_argument("--s3-port", type=int, help="moto S3 port (default 9000)")
    up.add_argument("--s3-bucket", help="bucket created in moto (default gengram-dev)")
    up.add_argument(
        "--fake-cluster", nargs="?", const=str(DEFAULT_FAKE_CLUSTER),
        help="run the head with Ray's fake multinode autoscaler "
        "(default config: cluster/local-fake-multinode.yaml)",
    )  # fmt: skip
    up.add_argument(
        "--project-home",
        help="GENGRAM_HOME handed to jobs: relative paths in job configs resolve against it (default: this checkout)",
    )
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each service")
    down = sub.add_parser("down", help="stop every process of the stack and verify none is left")
    down.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    status = sub.add_parser("status", help="exit 0 if up, 3 if down, 1 if degraded")
    status.add_argument("--json", action="store_true")
    sub.add_parser("env", help="print export lines for clients")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = Paths(args.state_dir.resolve())
    handlers = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env}
    try:
        return handlers[args.command](args, paths)
    except BrokenPipeError:  # e.g. `local-stack status | head`
        return 0
    except StackError as error:
        print(f"local-stack: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
