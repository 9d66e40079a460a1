"""Launch configs and real-model specs, checked by real validators: Ray's cluster-config schema,
Kubernetes' own schemas for the pod templates (kubernetes-validate), bash's parser, and
`opd-ray validate`. None of them is launched here (no cluster, no GPU)."""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

ROOT = REPO


CONFIGS = ROOT / "cluster_configs"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def pod_templates(ray_cluster_spec: dict) -> list[dict]:
    groups = [ray_cluster_spec["headGroupSpec"], *ray_cluster_spec["workerGroupSpecs"]]
    return [group["template"] for group in groups]


def validate_pod_template(template: dict) -> None:
    import kubernetes_validate

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "opd-ray"}, **template}
    kubernetes_validate.validate(pod, "1.33", strict=True)


REAL_MODEL_SPECS = sorted((ROOT / "examples").glob("qwen3_*.yaml"))


DOCKERFILE_INSTRUCTIONS = {
    "FROM", "ENV", "WORKDIR", "COPY", "RUN", "ENTRYPOINT", "CMD", "ARG", "LABEL", "EXPOSE", "USER",
}  # fmt: skip


def test_ray_cluster_launcher_config_passes_rays_schema() -> None:
    """What `ray up` does before launching: fill Ray's defaults, then check against its schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("ray-cluster-aws-gpu.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("p5.")
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_workerz"] = 2
    with pytest.raises(jsonschema.ValidationError, match="min_workerz"):  # the schema rejects what it should
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests_have_valid_pods_and_the_crd_layout(name: str) -> None:
    """Pod templates against Kubernetes' schemas; the ray.io/v1 fields KubeRay requires, by hand
    (its CRD schema is not available offline)."""
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    if manifest["kind"] == "RayJob":
        assert manifest["spec"]["entrypoint"].startswith("opd-ray train examples/")
        spec_file = ROOT / manifest["spec"]["entrypoint"].split()[2]
        assert spec_file.is_file()
        cluster = manifest["spec"]["rayClusterSpec"]
        assert cluster == load("kuberay-raycluster.yaml")["spec"]  # one layout, kept in step
    else:
        assert manifest["kind"] == "RayCluster"
        cluster = manifest["spec"]
    assert cluster["rayVersion"] == "2.60.0"
    for group in cluster["workerGroupSpecs"]:
        assert {"groupName", "replicas", "rayStartParams", "template"} <= set(group)
    for template in pod_templates(cluster):
        validate_pod_template(template)
    gpus = sum(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["replicas"]
        for g in cluster["workerGroupSpecs"]
    )
    assert gpus == 16  # what the two-node spec asks for


def test_pod_validation_rejects_a_misspelt_field() -> None:
    from kubernetes_validate.utils import ValidationError

    template = copy.deepcopy(pod_templates(load("kuberay-raycluster.yaml")["spec"])[0])
    template["spec"]["containers"][0]["imagez"] = template["spec"]["containers"][0].pop("image")
    with pytest.raises(ValidationError):
        validate_pod_template(template)


def test_slurm_script_parses_and_submits_the_spec_it_is_given() -> None:
    script = CONFIGS / "slurm-opd-ray.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert 'opd-ray train "$SPEC"' in text and "ray job submit" in text


@pytest.mark.parametrize("spec", REAL_MODEL_SPECS, ids=lambda p: p.name)
def test_real_model_specs_pass_opd_ray_validate(spec: Path) -> None:
    done = subprocess.run(
        # --no-files: the models and data live on the cluster (/models, /data), not here
        [sys.executable, "-m", "opd_ray.cli", "validate", "--no-files", str(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    roles = [resolved["rollout"], *resolved["teachers"].values(), resolved["learner"]]
    gpus = sum(
        role["resources"]["num_gpus"] * role.get("num_workers", role.get("num_replicas", role.get("num_ranks")))
        for role in roles
    )
    assert gpus == (16 if "2nodes" in spec.name else 8)


@pytest.mark.parametrize("spec", REAL_MODEL_SPECS, ids=lambda p: p.name)
def test_real_model_specs_fit_their_nodes_and_no_fewer(spec: Path) -> None:
    """The placement plan against p5.48xlarge-like nodes (192 CPUs, 8 GPUs): it fits the nodes the
    spec is written for, and one node fewer is refused with the missing GPUs named."""
    from opd_ray.driver.placement import missing_resources, plan_pools
    from opd_ray.spec import load_spec

    pools = plan_pools(load_spec(spec))
    node = {"CPU": 192.0, "GPU": 8.0}
    count = 2 if "2nodes" in spec.name else 1
    total = {name: amount * count for name, amount in node.items()}
    assert missing_resources(pools, total, [node] * count) == []
    if count == 2:
        problems = missing_resources(pools, node, [node])
        assert problems[0].startswith("GPU: the spec needs 16")


def test_there_are_one_and_two_node_real_model_specs() -> None:
    assert [p.name for p in REAL_MODEL_SPECS] == ["qwen3_1p7b_from_8b_1node.yaml", "qwen3_1p7b_from_8b_2nodes.yaml"]


def test_dockerfile_parses_and_its_base_matches_the_gpu_extra() -> None:
    """Docker's own parser (buildkit's, via the `dockerfile` package); no Docker engine here to build it."""
    import dockerfile
    import tomllib

    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    assert {c.cmd.upper() for c in commands} <= DOCKERFILE_INSTRUCTIONS
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (gpu_vllm,) = pyproject["project"]["optional-dependencies"]["gpu"]
    assert gpu_vllm.startswith("vllm==")
    assert [c.value[0] for c in commands if c.cmd.upper() == "FROM"] == ["${BASE_IMAGE}"]
    default_base = [c.value[0] for c in commands if c.cmd.upper() == "ARG" and c.value[0].startswith("BASE_IMAGE=")]
    assert default_base == [f"BASE_IMAGE=vllm/vllm-openai:v{gpu_vllm.removeprefix('vllm==')}"]  # the tested vllm
    for copy_command in (c for c in commands if c.cmd.upper() == "COPY"):
        for source in copy_command.value[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    run = " ".join(c.value[0] for c in commands if c.cmd.upper() == "RUN")
    assert '-c constraints-image.txt -e ".[gpu,trackers]"' in run  # dependencies at the tested versions
    for module in re.findall(r"import ([\w., ]+);", run)[0].split(","):  # the image's smoke test imports real modules
        name = module.strip()
        assert importlib.util.find_spec(name) is not None, name
    users = [c.value[0] for c in commands if c.cmd.upper() == "USER"]
    assert users and users[-1] not in ("root", "0")  # the image does not run as root
    for config in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "ray-cluster-aws-gpu.yaml"):
        assert "image: opd-ray:latest" in (CONFIGS / config).read_text()  # what `docker build -t opd-ray .` makes


def test_the_images_constraints_are_the_versions_the_suite_runs() -> None:
    from importlib.metadata import version

    lines = (CONFIGS / "constraints-image.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    assert len(pins) >= 10
    for name, pinned in pins:
        assert version(name) == pinned, f"{name}: the suite runs {version(name)}, the image pins {pinned}"


def test_cluster_configs_keep_ray_token_authentication_on() -> None:
    """Anyone who reaches an unauthenticated head's ports can run code as the job's user."""
    slurm = (CONFIGS / "slurm-opd-ray.sbatch").read_text()
    assert "RAY_AUTH_MODE=disabled" not in slurm and "export RAY_AUTH_MODE=token" in slurm
    assert "RAY_AUTH_TOKEN=" in slurm and "--dashboard-host=127.0.0.1" in slurm
    cluster = load("kuberay-raycluster.yaml")["spec"]
    for template in pod_templates(cluster):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "opd-ray-auth"
    submitter = load("kuberay-rayjob.yaml")["spec"]["submitterPodTemplate"]
    validate_pod_template(submitter)
    env = {e["name"] for e in submitter["spec"]["containers"][0]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env


def test_launch_paths_deliver_sigterm_to_the_driver_with_time_to_checkpoint() -> None:
    """A scheduler's stop reaches the driver as SIGTERM first, and Ray waits long enough before its SIGKILL
    (its default is 3 s) for a step and a checkpoint; run directories are absolute (not Ray's job copy)."""
    slurm = (CONFIGS / "slurm-opd-ray.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@600" in slurm and "trap stop_job TERM" in slurm and "ray job stop" in slurm
    assert slurm.index("export RAY_JOB_STOP_WAIT_TIME_S") < slurm.index("ray start --head")
    assert slurm.index("export RAY_worker_niceness=") < slurm.index("ray start --head")
    assert '"run.output_dir=$RUN_DIR"' in slurm and "RUN_DIR=${OPD_RAY_RUN_DIR:-$SLURM_SUBMIT_DIR/" in slurm
    assert "sleep 15" not in slurm and "NODES_WAIT_S" in slurm  # start-up waits for its nodes, bounded
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        config = load(name)["spec"]
        cluster = config.get("rayClusterSpec", config)
        for template in pod_templates(cluster):
            assert template["spec"]["terminationGracePeriodSeconds"] >= 600, name
        head_env = {e["name"]: e for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert 300 <= int(head_env["RAY_JOB_STOP_WAIT_TIME_S"]["value"]) < 600, name
    entrypoint = load("kuberay-rayjob.yaml")["spec"]["entrypoint"]
    assert "run.output_dir=/" in entrypoint


def test_the_aws_cluster_runs_with_a_token_and_the_image_source_is_read_only() -> None:
    config = load("ray-cluster-aws-gpu.yaml")
    assert "~/.opd-ray-token" in config["file_mounts"].values()
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_TOKEN=$(cat ~/.opd-ray-token)" in start and "RAY_AUTH_MODE=disabled" not in start
    assert "RAY_JOB_STOP_WAIT_TIME_S=540" in next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RAY_worker_niceness=0" in dockerfile  # the image's nodes run their workers at the driver's priority
    assert "chown -R root:root /opt/opd-ray && chmod -R a-w /opt/opd-ray" in dockerfile
    assert dockerfile.index("chmod -R a-w") < dockerfile.index("USER opd")
    pins = (CONFIGS / "constraints-image.txt").read_text()
    assert "peft==" in pins
