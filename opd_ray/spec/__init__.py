"""The experiment spec: its sections, one module per part (experiment.py holds the whole; base.py what they share),
and how a YAML file becomes one (loading.py)."""

from opd_ray.spec.algorithm import AlgorithmSpec, DiagnosticsSpec, EntropyGateSpec
from opd_ray.spec.base import check_distinct_layers, parse_layer_list, template_fields
from opd_ray.spec.cluster import PlacementSpec, RaySpec, WeightSyncSpec
from opd_ray.spec.conditions import CONDITION_RECORDS, ConditionRecord
from opd_ray.spec.data import DatasetSpec, DataSpec, PromptSelectionSpec, RouteSpec
from opd_ray.spec.experiment import ExperimentSpec, RunSpec
from opd_ray.spec.loading import load_spec, spec_to_yaml
from opd_ray.spec.models import ImportedModelsSpec, ModelSpec, ModelsSpec, TinyModelsSpec
from opd_ray.spec.recipe import ColdStartSpec, ProbeSpec, SftStageSpec, TeacherGenerationSpec
from opd_ray.spec.roles import (
    EngineSpec,
    LearnerSpec,
    LoraSpec,
    NamedTeacherSpec,
    ResourcesSpec,
    RoleName,
    RolloutSpec,
    Strategy,
    TeacherSpec,
)
from opd_ray.spec.tracking import TRACKER_RECORDS, LoggingSpec, TrackerRecord, add_tracker
from opd_ray.spec.trainer import (
    HealthSpec,
    TimeoutsSpec,
    TrainerSpec,
)

__all__ = [
    "CONDITION_RECORDS",
    "TRACKER_RECORDS",
    "AlgorithmSpec",
    "ColdStartSpec",
    "ConditionRecord",
    "DataSpec",
    "DatasetSpec",
    "DiagnosticsSpec",
    "EngineSpec",
    "EntropyGateSpec",
    "ExperimentSpec",
    "HealthSpec",
    "ImportedModelsSpec",
    "LearnerSpec",
    "LoggingSpec",
    "LoraSpec",
    "ModelSpec",
    "ModelsSpec",
    "NamedTeacherSpec",
    "PlacementSpec",
    "ProbeSpec",
    "PromptSelectionSpec",
    "RaySpec",
    "ResourcesSpec",
    "RoleName",
    "RolloutSpec",
    "RouteSpec",
    "RunSpec",
    "SftStageSpec",
    "Strategy",
    "TeacherGenerationSpec",
    "TeacherSpec",
    "TimeoutsSpec",
    "TinyModelsSpec",
    "TrackerRecord",
    "TrainerSpec",
    "WeightSyncSpec",
    "add_tracker",
    "check_distinct_layers",
    "load_spec",
    "parse_layer_list",
    "spec_to_yaml",
    "template_fields",
]
