"""Reading a tracked run back through each tracker's own library, for the tests: MLflow's client, the
records of W&B's offline run files (its protobuf messages), trackio's local store."""

from __future__ import annotations

import json
import struct
from pathlib import Path

WANDB_HEADER = 7  # ":W&B", a 2-byte magic, a version byte
BLOCK = 32 * 1024  # the log format W&B writes (LevelDB's): records in 32 KiB blocks, 7-byte record headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every Record in one offline `run-<id>.wandb` file, parsed with W&B's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2

    data, records, offset, pieces = path.read_bytes(), [], WANDB_HEADER, b""
    while offset + 7 <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < 7:  # a block's tail too short for a header is padding
            offset += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if length == 0 and kind == 0:
            break
        pieces += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def offline_records(run_dir: Path) -> list:
    """The records of every offline W&B run under run_dir/wandb, attempt by attempt."""
    return [r for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")) for r in wandb_records(path)]


def wandb_history(run_dir: Path) -> tuple[set[str], list[dict]]:
    """(the W&B run ids, every history row with its `_step`) of the offline runs under run_dir/wandb."""
    ids, rows = set(), []
    for record in offline_records(run_dir):
        if record.HasField("run"):
            ids.add(record.run.run_id)
        if record.HasField("history"):
            items = record.history.item
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return ids, rows


def wandb_config(run_dir: Path) -> dict:
    """The run config the offline runs recorded: {key: value} of its top-level keys."""
    runs = [record.run for record in offline_records(run_dir) if record.HasField("run")]
    return {item.key: json.loads(item.value_json) for run in runs for item in run.config.update}


def mlflow_history(tracking_uri: str, project: str) -> tuple[list, dict[str, list]]:
    """(the runs of the experiment, {metric key: [(step, value)]} of its one run) through MlflowClient."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(project)
    runs = client.search_runs([experiment.experiment_id])
    history = {}
    if len(runs) == 1:
        for key in runs[0].data.metrics:
            points = client.get_metric_history(runs[0].info.run_id, key)
            history[key] = sorted((p.step, p.value) for p in points)
    return runs, history


def trackio_history(project: str, run: str) -> tuple[list[str], list[dict]]:
    """(the project's run names, the run's logged rows) from trackio's local store."""
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.get_runs(project), SQLiteStorage.get_logs(project, run)
