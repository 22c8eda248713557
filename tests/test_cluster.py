"""cluster/: the cluster-launcher YAMLs, the KubeRay manifests, and the local autoscaling cluster.

Launcher YAMLs are checked against the schema shipped in the installed Ray wheel and by Ray's own
config validation (defaults merged as `ray up` does, no cloud call). The KubeRay manifests get a
structural check: no CRD schema ships with Ray. The fake-multinode test starts a real autoscaling
cluster on this machine and watches it grow and shrink.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT, free_port, launcher

CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = ["aws-gpu.yaml", "gcp-gpu.yaml", "local-fake-multinode.yaml"]
CLOUD_YAMLS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
PLATFORM_IMAGE = "registry.example.com/gengram/gengram-platform:0.1.0"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def pinned_ray_version() -> str:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(dep.split("==")[1] for dep in deps if dep.startswith("ray["))


# ----------------------------------------------------------------------------- cluster-launcher YAMLs


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_validates_against_the_installed_ray_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    jsonschema.validate(config, ray_schema())
    if config["provider"]["type"] == "fake_multinode":
        # the autoscaler reads this file as it is (the wheel has no defaults file to merge)
        validate_config(config)
    else:
        # what `ray up` does before it talks to the cloud: merge the provider's defaults, validate
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
        # our commands and node types win over the provider defaults
        assert prepared["head_start_ray_commands"] == config["head_start_ray_commands"]
        assert set(prepared["available_node_types"]) == set(config["available_node_types"])


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_cluster_scales_gpu_nodes_from_zero(name):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs drivers and the autoscaler only
    gpu_types = {key: value for key, value in types.items() if value["resources"].get("GPU")}
    assert gpu_types, "no GPU worker type"
    for key, node_type in gpu_types.items():
        assert node_type.get("min_workers", 0) == 0, key
        assert node_type["max_workers"] >= 1, key
        assert node_type["resources"]["GPU"] == 8, key
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert config["max_workers"] >= max(t.get("max_workers", 0) for t in types.values())


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_cluster_exposes_nothing_publicly(name):
    config = load(name)
    text = yaml.safe_dump(config)  # values only, not comments
    assert "0.0.0.0" not in text
    # dashboard and job server on the head's loopback, reached through `ray dashboard` (SSH)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    # no public IPs; SSH through the cloud's proxy (SSM / IAP), addressed by instance id/name
    assert config["provider"]["use_internal_ips"] is True
    assert config["auth"]["ssh_proxy_command"] and config["auth"]["ssh_proxy_use_node_id"] is True
    for key, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        if config["provider"]["type"] == "aws":
            # a group of our own on every node type: Ray then creates none (its default group
            # opens port 22 to 0.0.0.0/0)
            assert node["SecurityGroupIds"] and node["SubnetIds"], key
            assert node["IamInstanceProfile"]["Arn"], key  # credentials from the instance role
        else:
            # explicit interfaces without accessConfigs: no external IP (Ray would add one)
            assert node["networkInterfaces"], key
            assert all("accessConfigs" not in nic for nic in node["networkInterfaces"]), key
            assert node["serviceAccounts"], key
    assert "security_group" not in config["provider"]
    # token authentication on every node, the token file copied there by the launcher
    assert "--env=RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "RAY_AUTH_MODE=disabled" not in text


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_cluster_runs_the_platform_image(name):
    config = load(name)
    assert config["docker"]["image"] == PLATFORM_IMAGE
    assert config["setup_commands"] == []  # everything is in the image


def test_fake_multinode_config_is_complete_and_consistent():
    from ray.autoscaler._private.providers import _get_node_provider_cls
    from ray.autoscaler._private.util import hash_runtime_conf

    config = load("local-fake-multinode.yaml")
    every_field = {
        "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider", "auth",
        "docker", "head_node_type", "available_node_types", "file_mounts", "cluster_synced_files",
        "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "initialization_commands",
        "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
        "worker_start_ray_commands",
    }  # fmt: skip
    assert every_field <= set(config), every_field - set(config)
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    assert provider["disable_node_updaters"] and provider["use_node_id_as_ip"]
    assert _get_node_provider_cls(provider).__name__ == "FakeMultiNodeProvider"
    # the autoscaler's first step on (re)load, which fails on a missing field
    hash_runtime_conf(
        config["file_mounts"], config["cluster_synced_files"],
        [config["worker_setup_commands"], config["worker_start_ray_commands"]],
    )  # fmt: skip
    head = config["available_node_types"][config["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"]["CPU"] == 1
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    for key, node_type in workers.items():
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1, key
        # every worker type offers something the head cannot, so work can force a scale-up
        assert node_type["resources"]["CPU"] > head["resources"]["CPU"] or set(node_type["resources"]) - {
            "CPU", "object_store_memory"}, key  # fmt: skip
    assert config["idle_timeout_minutes"] <= 0.5


# ----------------------------------------------------------------------------- KubeRay


def kuberay_docs() -> list[dict]:
    docs = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == pinned_ray_version(), where
    assert spec["authOptions"] == {"mode": "token"}, where
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0, where
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
    assert head["rayStartParams"]["num-cpus"] == "0", where
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    gpu_groups = []
    for name, group in groups.items():
        assert group["minReplicas"] == 0 and group["replicas"] == 0, f"{where} {name}"
        assert group["maxReplicas"] >= 1, f"{where} {name}"
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(name)
            assert limits["nvidia.com/gpu"] == "8", f"{where} {name}"
            tolerations = group["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), f"{where} {name}"
    assert gpu_groups, f"{where}: no GPU worker group"
    templates = [head["template"]] + [group["template"] for group in groups.values()]
    for template in templates:
        assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gengram", where
        for container in template["spec"]["containers"]:
            assert container["image"] == PLATFORM_IMAGE, where
            assert "RAY_AUTH_MODE" not in {e["name"] for e in container.get("env", [])}  # set by KubeRay


def test_kuberay_manifests_are_well_formed():
    docs = kuberay_docs()
    kinds = [doc["kind"] for doc in docs]
    assert sorted(kinds) == ["NetworkPolicy", "RayCluster", "RayJob"]
    for doc in docs:
        assert doc["apiVersion"] in {"ray.io/v1", "networking.k8s.io/v1"}
        assert doc["metadata"]["name"]
    ray_cluster = next(doc for doc in docs if doc["kind"] == "RayCluster")
    check_ray_cluster_spec(ray_cluster["spec"], "RayCluster")

    ray_job = next(doc for doc in docs if doc["kind"] == "RayJob")
    spec = ray_job["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.pretrain --config ")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submitterPodTemplate"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gengram"
    assert spec["submitterPodTemplate"]["spec"]["containers"][0]["image"] == PLATFORM_IMAGE
    yaml.safe_load(spec["runtimeEnvYAML"])
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")

    policy = next(doc for doc in docs if doc["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "gengram"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_kuberay_exposes_nothing_outside_the_cluster():
    text = "\n".join(path.read_text() for path in (CLUSTER / "kuberay").glob("*.yaml"))
    for exposure in ("LoadBalancer", "NodePort", "kind: Ingress", "hostNetwork: true"):
        assert exposure not in text


# ----------------------------------------------------------------------------- local autoscaling


SCALE_JOB = """
import json, time, ray
ray.init()
@ray.remote(num_cpus=2)
def work(i):
    time.sleep(6)
    return ray.get_runtime_context().get_node_id()
print("RAN_ON " + json.dumps(sorted(set(ray.get([work.remote(i) for i in range(2)])))))
"""


def get_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def alive_nodes(dashboard: str, token: str) -> list[dict]:
    data = get_json(f"{dashboard}/api/v0/nodes?limit=100", token)
    return [node for node in data["data"]["result"]["result"] if node["state"] == "ALIVE"]


@pytest.mark.ray
@pytest.mark.slow
def test_local_fake_multinode_cluster_scales_up_and_down(tmp_path):
    from test_platform import RAY, clean_env, processes_with_marker, remove_ray_temp_dir

    state_dir = tmp_path / "local-stack"
    ports = ["--ray-port", str(free_port()), "--dashboard-port", str(free_port()),
             "--ray-client-port", str(free_port())]  # fmt: skip
    up = launcher(state_dir, "up", "--fake-cluster", "--no-mlflow", *ports)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        report = json.loads(launcher(state_dir, "status", "--json").stdout)
        dashboard, env = report["urls"]["ray_dashboard"], report["client_env"]
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()

        nodes = alive_nodes(dashboard, token)
        assert len(nodes) == 1 and nodes[0]["resources_total"]["CPU"] == 1  # the head alone

        # two tasks of 2 CPUs each: more than the head's single CPU, so the autoscaler must add nodes
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "scale.py").write_text(SCALE_JOB)
        submit = subprocess.run(
            [str(RAY), "job", "submit", "--address", dashboard, "--working-dir", str(job_dir), "--no-wait",
             "--submission-id", "scale-test", "--", "python", "scale.py"],
            capture_output=True, text=True, timeout=120, env=clean_env(**env),
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout + submit.stderr

        most_workers, deadline, status = 0, time.monotonic() + 150, None
        while time.monotonic() < deadline:
            workers = [n for n in alive_nodes(dashboard, token) if not n["is_head_node"]]
            most_workers = max(most_workers, len(workers))
            status = get_json(f"{dashboard}/api/jobs/scale-test", token)["status"]
            if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
                break
            time.sleep(1)
        logs = get_json(f"{dashboard}/api/jobs/scale-test/logs", token)["logs"]
        assert status == "SUCCEEDED", logs
        assert most_workers >= 1, "no worker node appeared"
        ran_on = json.loads(logs.split("RAN_ON ", 1)[1].splitlines()[0])
        head_id = next(n["node_id"] for n in alive_nodes(dashboard, token) if n["is_head_node"])
        assert head_id not in ran_on  # the 2-CPU tasks could only run on the new nodes

        # idle_timeout_minutes is 0.2: the workers go away again
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(alive_nodes(dashboard, token)) == 1:
                break
            time.sleep(2)
        assert len(alive_nodes(dashboard, token)) == 1, "worker nodes were not removed when idle"
    finally:
        down = launcher(state_dir, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert processes_with_marker(state_dir) == []
        remove_ray_temp_dir(state_dir)
