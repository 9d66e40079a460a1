"""Two Ray nodes on one machine, with token authentication: the quickstart submitted with `ray job submit` puts
each role where the spec says, and a submission without the cluster's token is refused.

A head node (advertising `learner_node`) and a second node joined with `ray start --address`
(advertising `engine_node`) form a real two-node cluster; the spec pins the learners to the
first and the rollout engine and teacher to the second through `resources.custom`. The
test reads where every actor ran from the run's placement.json and checks it against the
nodes' resources as the cluster reports them. It stops only the processes of this cluster
(found by its own temp dir), never other Ray instances on the machine."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

RAY = str(Path(sys.executable).parent / "ray")


pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Ports a second node on the same machine would otherwise share with the first (fixed defaults)."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def stop_cluster(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, to every process of this cluster: those whose command line names its temp
    dir (GCS, raylets, dashboard, agents) and all their descendants (workers, the job's driver)."""
    me = psutil.Process()
    spared = {me.pid, *(parent.pid for parent in me.parents())}
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid not in spared and any(temp_dir in part for part in process.info["cmdline"] or []):
            roots.append(process)
    victims = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    for process in victims.values():
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=3)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def two_node_cluster() -> Iterator[dict]:
    temp_dir = tempfile.mkdtemp(prefix="opdr", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port = free_port(), free_port()
    # Token authentication on, as cluster_configs/slurm-opd-ray.sbatch runs it: one fresh token for this
    # cluster, in the environment of both nodes and of the job CLI.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=2", "--object-store-memory=500000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        subprocess.run(
            [RAY, "start", "--head", f"--port={gcs_port}", '--resources={"learner_node": 4}',
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--ray-client-server-port={free_port()}", *common, *node_ports()],
            check=True, env=env, cwd=REPO, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            [RAY, "start", f"--address=127.0.0.1:{gcs_port}", '--resources={"engine_node": 4}',
             *common, *node_ports()],
            check=True, env=env, cwd=REPO, capture_output=True,
        )  # fmt: skip
        yield {"dashboard": f"http://127.0.0.1:{dashboard_port}", "env": env}
    finally:
        stop_cluster(temp_dir)


def wait_for_nodes(address: str, env: dict, count: int, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        listed = subprocess.run(
            [RAY, "list", "nodes", "--address", address, "--format", "json", "--detail"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        nodes = json.loads(listed.stdout) if listed.returncode == 0 and listed.stdout.strip() else []
        alive = [n for n in nodes if n["state"] == "ALIVE"]
        if len(alive) >= count or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def test_quickstart_by_ray_job_submit_places_roles_on_their_nodes(
    two_node_cluster: dict, tiny_dir: Path, tmp_path: Path
) -> None:
    address, env = two_node_cluster["dashboard"], two_node_cluster["env"]
    nodes = wait_for_nodes(address, env, 2)
    assert len(nodes) == 2
    wrong_token = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    refused = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--", "echo", "anyone"],
        env=wrong_token, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "anyone" not in refused.stdout  # the Jobs API wants this cluster's token
    node_of = {n["node_id"]: "learner_node" if "learner_node" in n["resources_total"] else "engine_node" for n in nodes}

    run_dir = tmp_path / "run"
    overrides = [
        "models.build_tiny=null",
        f"models.student.path={tiny_dir / 'student'}",
        f"models.teacher.path={tiny_dir / 'teacher'}",
        f"data.train.path={tiny_dir / 'train.jsonl'}",
        f"data.eval.path={tiny_dir / 'eval.jsonl'}",
        f"run.output_dir={run_dir}",
        "trainer.steps=3",
        "trainer.prompts_per_step=16",
        "trainer.eval_every=0",
        "rollout.resources.custom={engine_node: 1}",
        "teacher.resources.custom={engine_node: 1}",
        "learner.resources.custom={learner_node: 1}",
        "learner.resources.strategy=STRICT_PACK",
    ]
    working_dir = tmp_path / "submitted-from"
    working_dir.mkdir()
    relative = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(working_dir), "--",
         sys.executable, "-m", "opd_ray.cli", "train", str(REPO / "examples" / "quickstart.yaml"), *overrides,
         "run.output_dir=runs/relative"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    said = relative.stdout + relative.stderr
    assert relative.returncode != 0 and "Ray's temporary copy" in said and "Traceback" not in said, said[-3000:]
    assert not (working_dir / "runs").exists()

    job_id = f"opd-ray-two-nodes-{os.getpid()}"
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--",
         sys.executable, "-m", "opd_ray.cli", "train", str(REPO / "examples" / "quickstart.yaml"), *overrides],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, job_id], env=env, capture_output=True, text=True
    )  # fmt: skip
    logs = submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert submitted.returncode == 0, logs
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout + logs

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["student_accuracy_after"] is not None
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    placed = json.loads((run_dir / "placement.json").read_text())
    assert {role: len(actors) for role, actors in placed.items()} == {"rollout": 1, "teacher": 1, "learner": 2}
    wanted = {"rollout": "engine_node", "teacher": "engine_node", "learner": "learner_node"}
    for role, actors in placed.items():
        assert [node_of[actor["node_id"]] for actor in actors] == [wanted[role]] * len(actors), role
