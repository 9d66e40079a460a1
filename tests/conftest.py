"""Shared fixtures: tiny random-init models and task files built locally, and one local Ray.

Random-init models are enough where a test is about plumbing (shapes, sync, the KL
falling); nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]  # the checkout: examples/, benchmarks/, cluster_configs/

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "opd-ray" / "torch_extensions"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from opd_ray.data.arithmetic import ALPHABET, write_task_files
    from opd_ray.recipe.tiny_models import build_char_tokenizer, save_random_model

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_char_tokenizer(ALPHABET, root / "tokenizer")
    save_random_model(tokenizer, 2, root / "teacher", seed=1)
    save_random_model(tokenizer, 1, root / "student", seed=2)
    write_task_files(root, seed=0, train_size=512, eval_size=32)
    return root


def tiny_spec_dict(tiny_dir: Path, run_dir: Path) -> dict:
    """A spec over the tiny models that runs in seconds; tests override what they are about."""
    return {
        "run": {"name": "test", "output_dir": str(run_dir), "seed": 0},
        "models": {"student": {"path": str(tiny_dir / "student")}, "teacher": {"path": str(tiny_dir / "teacher")}},
        "data": {"train": {"path": str(tiny_dir / "train.jsonl")}, "eval": {"path": str(tiny_dir / "eval.jsonl")}},
        # one sample of a prompt whatever the objective (sampled_token's own default is 4): tests are about plumbing
        "rollout": {"max_new_tokens": 6, "samples_per_prompt": 1, "engine": {"max_model_len": 32, "kv_cache_gib": 0.1}},
        # transformers (what `auto` picks on CPUs; named here so the suite does not depend on the default): a second
        # vLLM engine costs ~10 s of every run's start on 2 cores; the vLLM teacher is exercised where it is the
        # subject (test_distill's first run, test_objective_families, the teacher_scoring benchmark); every run
        # still samples with a vLLM rollout engine
        "teacher": {"backend": "transformers", "top_k": 15, "engine": {"max_model_len": 32, "kv_cache_gib": 0.1}},
        "learner": {"num_ranks": 2, "zero_stage": 2, "lr": 3e-3, "warmup_steps": 0},
        "algorithm": {"objective": "topk"},
        "diagnostics": {"top_k": 4},
        "trainer": {"steps": 3, "prompts_per_step": 16},
        "ray": {"num_cpus": 8},
    }


@pytest.fixture(scope="session")
def local_ray():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def start_teacher_actor(scorer_class: type, model, teacher, seed: int):
    """A teacher replica outside a run's roles (a second backend, a deliberately slow one), with
    the environment the roles give their engines."""
    import ray

    from opd_ray.actors.vllm_engine import ENGINE_ENV

    return ray.remote(scorer_class).options(runtime_env={"env_vars": ENGINE_ENV}).remote(model, teacher, seed)


BENCHMARKS = REPO / "benchmarks"


def run_benchmark(name: str) -> str:
    """Runs `benchmarks/<name>.py --tiny` in this process (inside the tests' Ray, when one is up, instead
    of starting its own) and returns what it printed."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared `common` module
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        module.main(["--tiny"])
    return printed.getvalue()


def table_rows(output: str) -> list[list[str]]:
    """The cells of every markdown table row a benchmark printed, headers and rules left out."""
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.fixture(scope="session", autouse=True)
def tracker_stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trackers' local stores for the whole session, set before any tracker library is imported (trackio
    reads TRACKIO_DIR once, at import): W&B offline, trackio under the session's temporary folder, so no
    test writes to the user's own stores or reaches a server. MLflow's store is each run's (tests/trackers.py)."""
    root = tmp_path_factory.mktemp("tracker-stores")
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["TRACKIO_DIR"] = str(root / "trackio")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root


def pytest_configure(config: pytest.Config) -> None:
    """Every actor start of this test run is counted (opd_ray/actors/runtime.py: count_start), before any Ray
    starts: its actors inherit the variable. docs/development.md keeps the counts of CI runs."""
    if "OPD_RAY_START_LOG" not in os.environ:
        import tempfile

        handle, path = tempfile.mkstemp(prefix="opd-ray-starts-", suffix=".log")
        os.close(handle)
        os.environ["OPD_RAY_START_LOG"] = path


def pytest_terminal_summary(terminalreporter) -> None:
    """How many role sets and actors the run started: most of the suite's time on 2 cores is their start."""
    from collections import Counter

    path = Path(os.environ.get("OPD_RAY_START_LOG", ""))
    if not path.is_file():
        return
    counts = Counter(line.strip() for line in path.read_text().splitlines() if line.strip())
    if counts:
        shown = ", ".join(f"{count} {kind}{'s' if count > 1 else ''}" for kind, count in sorted(counts.items()))
        terminalreporter.write_line(f"actor starts: {shown}")
