"""Every file under cluster/ and the jobs' runtime envs: they parse, and the fields that matter hold.

Checked: images and rayVersion match pyproject's pinned Ray; autoscaling ranges agree across the
launchers and KubeRay and with the elastic range the RayJob trains with; no internet ingress to
the dashboard (8265), GCS (6379) or client (10001) ports; every launcher node starts Ray with token
auth from a secret store and fails closed, and its firewall admits only the cluster's own nodes; checkpoint storage is configured; no secret
value is written anywhere; the runtime envs are valid Ray runtime envs carrying pyproject's deps.
Each rule is also run on a broken example, so a rule that checks nothing fails here.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from sde_ray.cli import build_parser
from sde_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILES = sorted(p for p in (REPO / "cluster").rglob("*") if p.is_file())
RUNTIME_ENVS = sorted((REPO / "jobs").glob("runtime_env*.yaml"))
ALL_FILES = CLUSTER_FILES + RUNTIME_ENVS
RAY_PORTS = (6379, 8265, 10001)
OPEN_CIDRS = ("0.0.0.0/0", "::/0")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_ray_version() -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([0-9.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml does not pin ray with ==")


def _walk(node, path=()):
    """(key path, value) for every leaf and mapping in nested YAML data."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path + (key,), value
            yield from _walk(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield path + (i,), value
            yield from _walk(value, path + (i,))


def _by_kind(kind: str) -> list[dict]:
    return [d for p in CLUSTER_FILES for d in _docs(p) if d.get("kind") == kind]


LAUNCHERS = [p for p in CLUSTER_FILES if "provider" in _docs(p)[0]]
KUBE_FILES = [p for p in CLUSTER_FILES if p not in LAUNCHERS]


def test_the_expected_files_exist_and_parse():
    names = {p.relative_to(REPO).as_posix() for p in ALL_FILES}
    assert {"cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml", "cluster/kuberay/raycluster.yaml",
            "cluster/kuberay/rayjob-train.yaml", "cluster/kuberay/rayjob-tune.yaml",
            "jobs/runtime_env.yaml", "jobs/runtime_env_cpu.yaml"} <= names
    for path in ALL_FILES:
        assert _docs(path), f"{path} is empty"
    assert {_docs(p)[0]["provider"]["type"] for p in LAUNCHERS} == {"aws", "gcp"}
    assert len(_by_kind("RayCluster")) == 1 and len(_by_kind("RayJob")) == 2


# ---- images ------------------------------------------------------------------------------------


def image_problems(data, version: str) -> list[str]:
    problems, images = [], []
    for path, value in _walk(data):
        key = path[-1]
        if key in ("image", "head_image", "worker_image") and isinstance(value, str):
            images.append((path, value))
        if key == "rayVersion" and str(value) != version:
            problems.append(f"rayVersion {value} != pinned {version}")
    for path, image in images:
        if not re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py311-(gpu|cpu)", image):
            problems.append(f"{'.'.join(map(str, path))}: {image} is not rayproject/ray:{version}-py311-{{gpu,cpu}}")
        in_gpu_group = any(str(p) in ("worker_image", "gpu_worker") for p in path) or (
            "workerGroupSpecs" in path)
        if in_gpu_group and not image.endswith("-gpu"):
            problems.append(f"{'.'.join(map(str, path))}: GPU workers need the -gpu image, got {image}")
    return problems


@pytest.mark.parametrize("path", [p for p in CLUSTER_FILES if "RayJob" not in p.read_text()],
                         ids=lambda p: p.name)
def test_images_match_the_pinned_ray(path):
    version = pinned_ray_version()
    docs = _docs(path)
    assert any(p[-1] in ("image", "worker_image") for d in docs for p, _ in _walk(d)), f"{path.name} names no image"
    assert [problem for d in docs for problem in image_problems(d, version)] == []


def test_image_rule_catches_a_drifted_tag():
    version = pinned_ray_version()
    assert image_problems({"docker": {"image": "rayproject/ray:2.41.0-py311-gpu"}}, version)
    assert image_problems({"docker": {"worker_image": f"rayproject/ray:{version}-py311-cpu"}}, version)
    assert image_problems({"spec": {"rayVersion": "2.50.0"}}, version)
    assert not image_problems({"docker": {"image": f"rayproject/ray:{version}-py311-gpu"}}, version)


# ---- autoscaling --------------------------------------------------------------------------------


def _launcher_gpu_range(data: dict) -> tuple[int, int]:
    gpu = data["available_node_types"]["gpu_worker"]
    return gpu["min_workers"], gpu["max_workers"]


def _kuberay_gpu_group() -> dict:
    (cluster,) = _by_kind("RayCluster")
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if "nvidia.com/gpu" in str(g["template"])]
    return group


def _gpus_per_pod(group: dict) -> int:
    return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"])


def test_autoscaling_ranges_agree_everywhere():
    group = _kuberay_gpu_group()
    (cluster,) = _by_kind("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    kuberay_range = (group["minReplicas"], group["maxReplicas"])
    assert kuberay_range[0] >= 1 and kuberay_range[1] > kuberay_range[0]
    for path in LAUNCHERS:
        data = _docs(path)[0]
        assert _launcher_gpu_range(data) == kuberay_range, path.name
        assert data["max_workers"] >= kuberay_range[1], f"{path.name}: global max_workers caps the GPU group"
        assert data["head_node_type"] in data["available_node_types"]


def _rayjob(name: str) -> dict:
    (job,) = [j for j in _by_kind("RayJob") if j["metadata"]["name"] == name]
    return job


def _entrypoint_args(job: dict) -> tuple[str, list[str]]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
    assert (REPO / argv[1]).exists(), f"{argv[1]} does not exist"
    return argv[1], argv[2:]


def test_training_rayjob_config_validates_and_fits_the_elastic_group():
    script, args = _entrypoint_args(_rayjob("sde-ray-train"))
    assert script == "jobs/train.py"
    parsed = build_parser().parse_args(["train", *args])
    config = load_config(REPO / parsed.config, parsed.overrides)
    group = _kuberay_gpu_group()
    scaling = config.scaling
    assert scaling.use_gpu and (scaling.min_workers, scaling.max_workers) == (group["minReplicas"], group["maxReplicas"])
    assert _gpus_per_pod(group) == 1  # one training worker (1 GPU) per pod, so workers == pods
    cpu_limit = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert scaling.cpus_per_worker <= cpu_limit
    # Outputs and checkpoints in the bucket (Ray storage defaults to <output_dir>/ray), checked as a location.
    from sde_ray import storage

    assert parsed.output_dir.startswith("s3://") and not config.train.storage_path
    storage.check_location(parsed.output_dir, "--output-dir")
    assert config.train.checkpoint_every_minutes > 0  # a lost spot node costs minutes, not steps


def test_tune_rayjob_points_at_a_valid_sweep():
    from sde_ray.ray_cluster import run_resources
    from sde_ray.tune.sweep import load_sweep

    script, args = _entrypoint_args(_rayjob("sde-ray-tune-curriculum"))
    assert script == "jobs/tune.py"
    parsed = build_parser().parse_args(["tune", *args])
    sweep = load_sweep(REPO / parsed.config, parsed.overrides)
    group = _kuberay_gpu_group()
    needs = run_resources(sweep.config, trial=True)
    assert needs["GPU"] <= _gpus_per_pod(group)
    assert needs["CPU"] <= float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert parsed.output_dir.startswith("/mnt/shared/")


def test_rayjobs_run_on_the_rayclusters_and_carry_the_runtime_env():
    (cluster,) = _by_kind("RayCluster")
    gpu_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    for job in _by_kind("RayJob"):
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert env["pip"] == gpu_env["pip"], "a RayJob's deps drifted from jobs/runtime_env.yaml"
        assert env["env_vars"] == gpu_env["env_vars"]
        # `ray job stop` / deleting the RayJob: SIGTERM, then SIGKILL after this wait (Ray's default 3 s).
        assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
        assert env["working_dir"].startswith(("https://", "s3://", "gs://")), "a manifest cannot ship a local dir"


# ---- network ------------------------------------------------------------------------------------


def _covers_ray_port(rule: dict) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    low, high = int(rule.get("FromPort", 0)), int(rule.get("ToPort", 65535))
    return any(low <= port <= high for port in RAY_PORTS)


def public_ingress(data: dict) -> list[str]:
    """Internet-reachable Ray ports in a launcher config or a Kubernetes document."""
    found = []
    provider = data.get("provider", {})
    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if _covers_ray_port(rule) and any(c in OPEN_CIDRS for c in cidrs):
            found.append(f"security group rule {rule} is open to the internet")
    if provider.get("type") == "aws" and "security_group" not in provider:
        found.append("aws: no security_group (the launcher's default admits SSH from anywhere)")
    for name, node_type in data.get("available_node_types", {}).items():
        for interface in node_type.get("node_config", {}).get("networkInterfaces", []) or []:
            if interface.get("accessConfigs"):
                found.append(f"{name}: external IP (accessConfigs)")
    if provider.get("type") == "gcp" and not all(
        node_type.get("node_config", {}).get("networkInterfaces") for node_type in data["available_node_types"].values()
    ):
        found.append("gcp: a node type without an explicit private networkInterfaces (defaults get an external IP)")
    if provider and not provider.get("use_internal_ips"):
        found.append("launcher without use_internal_ips")
    for command in data.get("head_start_ray_commands", []) or []:
        if re.search(r"--dashboard-host[= ]0\.0\.0\.0", command):
            found.append("dashboard bound to 0.0.0.0 on the head")
    kind = data.get("kind")
    if kind == "RayCluster" and data["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") != "ClusterIP":
        found.append(f"head service type {data['spec']['headGroupSpec']['serviceType']}")
    if kind == "Service" and data.get("spec", {}).get("type") in ("LoadBalancer", "NodePort"):
        found.append(f"Service {data['metadata']['name']} is {data['spec']['type']}")
    if kind == "Ingress":
        found.append(f"Ingress {data['metadata']['name']} exposes the cluster")
    return found


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_no_ray_port_is_open_to_the_internet(path):
    assert [problem for d in _docs(path) for problem in public_ingress(d)] == []


def test_kuberay_cluster_is_fenced_to_its_namespace_and_uses_token_auth():
    (cluster,) = _by_kind("RayCluster")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    policies = _by_kind("NetworkPolicy")
    assert any(
        p["spec"]["podSelector"]["matchLabels"].get("ray.io/cluster") == cluster["metadata"]["name"]
        and "Ingress" in p["spec"]["policyTypes"]
        and all(set(source) == {"podSelector"} for rule in p["spec"]["ingress"] for source in rule["from"])
        for p in policies
    ), "no NetworkPolicy restricts ingress to the Ray pods to this namespace"


def test_network_rule_catches_open_ports():
    aws_open = {"provider": {"type": "aws", "use_internal_ips": True, "security_group": {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}}}
    aws_all = {"provider": {"type": "aws", "use_internal_ips": True, "security_group": {"IpPermissions": [
        {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]}}}
    aws_ssh_only = {"provider": {"type": "aws", "use_internal_ips": True, "security_group": {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}}}
    gcp_public = {"provider": {"type": "gcp", "use_internal_ips": True}, "available_node_types": {
        "head": {"node_config": {"networkInterfaces": [{"accessConfigs": [{"type": "ONE_TO_ONE_NAT"}]}]}}}}
    assert public_ingress(aws_open) and public_ingress(aws_all) and public_ingress(gcp_public)
    assert not public_ingress(aws_ssh_only)
    assert public_ingress({"kind": "Service", "metadata": {"name": "x"}, "spec": {"type": "LoadBalancer"}})
    assert public_ingress({"head_start_ray_commands": ["ray start --head --dashboard-host=0.0.0.0"]})


# ---- authentication and intra-cluster fencing -------------------------------------------------


def unauthenticated_starts(data: dict) -> list[str]:
    """`ray start` commands of a launcher config that would run without Ray token auth: each must
    set RAY_AUTH_MODE=token and take RAY_AUTH_TOKEN from somewhere (never a literal) and refuse to
    start when it is empty (Ray 2.60 enables auth on a head only if ~/.ray/auth_token exists)."""
    found = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in data.get(key, []) or []:
            if "ray start" not in command:
                continue
            before = command.split("ray start", 1)[0]
            if not re.search(r"export RAY_AUTH_MODE=token\b", before):
                found.append(f"{key}: ray start without RAY_AUTH_MODE=token")
            if not re.search(r'export RAY_AUTH_TOKEN="\$\(', before):
                found.append(f"{key}: RAY_AUTH_TOKEN not read from a secret store")
            if not re.search(r'test -n "\$RAY_AUTH_TOKEN" \|\| .*exit 1', before):
                found.append(f"{key}: starts Ray even when the token is missing")
    if data.get("provider") and not any(data.get(k) for k in ("head_start_ray_commands", "worker_start_ray_commands")):
        found.append("launcher without start commands (the defaults start Ray unauthenticated)")
    return found


def wide_rules(data: dict) -> list[str]:
    """Firewall rules of a launcher config that admit hosts other than the cluster's own nodes."""
    found = []
    provider = data.get("provider", {})
    for rule in provider.get("security_group", {}).get("IpPermissions", []) or []:
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        ssh_only = str(rule.get("IpProtocol")) == "tcp" and rule.get("FromPort") == rule.get("ToPort") == 22
        if cidrs and not ssh_only:
            found.append(f"security group rule admits CIDR {cidrs} (the VPC, not the cluster's nodes)")
    if provider.get("type") == "gcp":
        for name, node_type in data.get("available_node_types", {}).items():
            if "sde-ray" not in (node_type.get("node_config", {}).get("tags", {}) or {}).get("items", []):
                found.append(f"{name}: no `sde-ray` network tag for the cluster-only firewall rule")
    return found


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_every_launcher_node_starts_ray_with_token_auth(path):
    assert unauthenticated_starts(_docs(path)[0]) == []


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_firewalls_admit_only_the_clusters_own_nodes(path):
    assert wide_rules(_docs(path)[0]) == []


def test_the_documented_gcp_firewall_rule_is_tag_to_tag():
    text = (REPO / "docs" / "operations.md").read_text()
    rules = re.findall(r"gcloud compute firewall-rules create [^`]*", text)
    assert rules and all("--source-tags=sde-ray" in r and "--source-ranges" not in r for r in rules)


def test_auth_and_fence_rules_catch_the_issue_19_configs():
    # The files as they were: `ray start` with no token, and an all-protocol rule from the VPC CIDR.
    bare = {"provider": {"type": "aws"}, "head_start_ray_commands": ["ray stop", "ray start --head --port=6379"],
            "worker_start_ray_commands": ["ray start --address=$RAY_HEAD_IP:6379"]}
    literal = {"head_start_ray_commands": ["export RAY_AUTH_MODE=token; export RAY_AUTH_TOKEN=abc; ray start --head"]}
    fail_open = {"head_start_ray_commands": [
        'export RAY_AUTH_MODE=token; export RAY_AUTH_TOKEN="$(get-secret)"; ray start --head']}
    assert len(unauthenticated_starts(bare)) == 6
    assert "RAY_AUTH_TOKEN not read from a secret store" in unauthenticated_starts(literal)[0]
    assert "starts Ray even when the token is missing" in unauthenticated_starts(fail_open)[0]
    assert unauthenticated_starts({"provider": {"type": "aws"}})
    vpc_wide = {"provider": {"type": "aws", "security_group": {"IpPermissions": [
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]}}}
    untagged = {"provider": {"type": "gcp"}, "available_node_types": {"head": {"node_config": {}}}}
    assert wide_rules(vpc_wide) and wide_rules(untagged)
    assert not wide_rules({"provider": {"type": "aws", "security_group": {"IpPermissions": []}}})


# ---- storage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_nodes_can_reach_the_checkpoint_bucket(path):
    data = _docs(path)[0]
    text = path.read_text()
    for name, node_type in data["available_node_types"].items():
        node_config = node_type["node_config"]
        if data["provider"]["type"] == "aws":
            assert node_config.get("IamInstanceProfile"), f"{name}: no instance profile for s3:// checkpoints"
        else:
            scopes = [s for account in node_config.get("serviceAccounts", []) for s in account.get("scopes", [])]
            assert any("cloud-platform" in s or "devstorage" in s for s in scopes), f"{name}: no storage scope"
    scheme = {"aws": "s3://", "gcp": "gs://"}[data["provider"]["type"]]
    assert f"--output-dir {scheme}" in text, "the file should say that a run's artifacts live in the bucket"


def test_every_kuberay_pod_mounts_the_shared_volume():
    claims = {d["metadata"]["name"] for d in _by_kind("PersistentVolumeClaim")}
    (pvc,) = _by_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every rank writes checkpoints to one place"
    (cluster,) = _by_kind("RayCluster")
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for template in templates:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounted = [m for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])
                   if volumes.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName") in claims]
        assert [m["mountPath"] for m in mounted] == ["/mnt/shared"]


# ---- secrets ------------------------------------------------------------------------------------

SECRET_PATTERNS = [
    (re.compile(r"\b[0-9a-f]{40}\b"), "a 40-hex token (the shape of a W&B API key)"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)(api[_-]?key|token|password|secret)\s*[:=]\s*[\"']?[A-Za-z0-9+/_\-]{16,}"), "a credential value"),
]


def secret_values(text: str, data: list) -> list[str]:
    found = [f"{why}: {m.group(0)[:12]}..." for pattern, why in SECRET_PATTERNS for m in pattern.finditer(text)]
    for doc in data:
        for path, value in _walk(doc):
            if path[-1] == "WANDB_API_KEY" and value != "${WANDB_API_KEY}":
                found.append(f"WANDB_API_KEY set to a literal at {'.'.join(map(str, path))}")
            if isinstance(value, dict) and value.get("name") == "WANDB_API_KEY":
                source = value.get("valueFrom", {}).get("secretKeyRef")
                if "value" in value or not source:
                    found.append("WANDB_API_KEY env var not taken from a Kubernetes Secret")
    return found


@pytest.mark.parametrize("path", ALL_FILES + [REPO / ".rayignore"], ids=lambda p: p.name)
def test_no_secret_values_in_files(path):
    text = path.read_text()
    data = _docs(path) if path.suffix == ".yaml" else []
    embedded = [yaml.safe_load(v) for d in data for p, v in _walk(d) if p[-1] == "runtimeEnvYAML"]
    assert secret_values(text, data + embedded) == []


def test_secret_rule_catches_literal_keys():
    assert secret_values("WANDB_API_KEY: 0123456789abcdef0123456789abcdef01234567", [])
    assert secret_values("", [{"env_vars": {"WANDB_API_KEY": "local-key-1234"}}])
    assert secret_values("", [{"env": [{"name": "WANDB_API_KEY", "value": "x"}]}])
    assert secret_values("aws_access_key_id = AKIAABCDEFGHIJKLMNOP", [])
    assert not secret_values("", [{"env_vars": {"WANDB_API_KEY": "${WANDB_API_KEY}"}}])


# ---- runtime envs and the upload ----------------------------------------------------------------


@pytest.mark.parametrize("path", RUNTIME_ENVS, ids=lambda p: p.name)
def test_runtime_envs_are_valid_ray_runtime_envs(path):
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load(path.read_text())
    env = RuntimeEnv(**data)
    assert env.env_vars()["WANDB_API_KEY"] == "${WANDB_API_KEY}"
    assert "working_dir" not in data, "the working dir is given on the command line (--working-dir .)"


def test_gpu_runtime_env_installs_pyproject_deps_and_leaves_the_accelerator_alone():
    data = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    deps = [d for d in _pyproject()["project"]["dependencies"] if not d.startswith("ray")]
    assert data["pip"]["packages"] == deps, "jobs/runtime_env.yaml drifted from pyproject.toml"
    assert "DS_ACCELERATOR" not in data["env_vars"], "DS_ACCELERATOR=cpu on a GPU cluster would train on CPU"
    cpu = yaml.safe_load((REPO / "jobs" / "runtime_env_cpu.yaml").read_text())
    # sde_ray sets DS_ACCELERATOR from scaling.use_gpu; a job env setting it too breaks the driver's ray.init.
    assert "DS_ACCELERATOR" not in cpu["env_vars"] and "pip" not in cpu


def test_the_deepspeed_pin_admits_no_release_that_crashes_zero3_lora_checkpointing():
    """DeepSpeed 0.19.0-0.19.3 crash in backward under ZeRO-3 + LoRA + non-reentrant checkpointing
    (fixed in 0.19.4); the pin is pyproject's, which the runtime env and the RayJobs copy (above)."""
    from packaging.requirements import Requirement

    pins = [Requirement(d) for d in _pyproject()["project"]["dependencies"] if d.startswith("deepspeed")]
    assert len(pins) == 1
    assert [v for v in ("0.19.0", "0.19.3", "0.19.4", "0.19.8", "0.20.0") if pins[0].specifier.contains(v)] == [
        "0.19.4", "0.19.8"]


def test_rayignore_keeps_outputs_and_history_out_of_the_upload(tmp_path):
    """Ray's own packager zips a tree laid out like the repo, honouring only .rayignore."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "repo"
    files = [".git/config", "runs/default/ray/checkpoint_000001/model.pt", "wandb/offline-run-1/run.wandb",
             "sde_ray/config.py", "jobs/train.py", "configs/default.yaml", "configs/sweeps/smoke.yaml"]
    for relative in files:
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_text("x")
    (tree / ".rayignore").write_text((REPO / ".rayignore").read_text())
    create_package(str(tree), tmp_path / "upload.zip", include_gitignore=False)
    uploaded = {n for n in zipfile.ZipFile(tmp_path / "upload.zip").namelist() if not n.endswith("/")}
    assert uploaded == {"sde_ray/config.py", "jobs/train.py", "configs/default.yaml", "configs/sweeps/smoke.yaml",
                        ".rayignore"}
