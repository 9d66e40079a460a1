"""A plugin (`plugins: [tests.unit.spec.plugin_objective]`): importing it registers an objective, in whichever
process imports it — the driver as it loads the spec, each actor as it starts."""

from opd_ray.losses.objectives import register_objective
from opd_ray.spec.objectives import ObjectiveRecord
from tests.unit.losses.test_new_objective import squared_log_ratio

register_objective(ObjectiveRecord(name="plugin_k2", summary="the toy k2 objective, from a plugin"), squared_log_ratio)
