"""Which teacher scores a row, and the prompt that teacher reads.

With several teachers (`teachers:`) each training row goes to exactly one: the teacher its
file names, else the one `data.route` maps the row's field value to, else `data.route.default`.
A teacher may read its own prompt built from the row (`prompt_template` with `{prompt}`,
`{answer}` or any column): a specialist's format, or for on-policy self-distillation the
student shown the reference answer. Everything is decided here, on the driver, before any
actor starts, so a row with no teacher is named with its file and row number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opd_ray.errors import UserError
from opd_ray.spec import DatasetSpec, DataSpec, ExperimentSpec, RouteSpec, template_fields


@dataclass(frozen=True)
class Routing:
    """The run's teachers (name -> prompt template, None = the student's prompt), its route, and the tokenizers
    of teachers with another vocabulary (they read every prompt in their own tokens)."""

    templates: dict[str, str | None]
    route: RouteSpec | None = None
    tokenizers: dict[str, object] = field(default_factory=dict)
    chat_templates: dict[str, bool] = field(default_factory=dict)  # a teacher's own prompt: chat template or not

    def teacher_data(self, teacher: str, data: DataSpec) -> DataSpec:
        """The data settings a teacher's own prompt is rendered with (its use_chat_template, if it sets one)."""
        own = self.chat_templates.get(teacher)
        if own is None or own == data.use_chat_template:
            return data
        return data.model_copy(update={"use_chat_template": own, "system_prompt": data.system_prompt if own else None})

    @property
    def names(self) -> list[str]:
        return list(self.templates)

    def teacher_of(self, row: dict, dataset: DatasetSpec, where: str) -> str:
        """The teacher of one row (`where` = "file row N", for the error)."""
        if dataset.teacher is not None:
            return dataset.teacher
        if self.route is None:
            if len(self.templates) == 1:
                return self.names[0]
            raise UserError(f"{where}: no teacher for this row (set data.route or the file's teacher)")
        route = self.route
        if route.field not in row:
            raise UserError(f"{where}: data.route.field {route.field!r} is not a column of {dataset.path}")
        value = row[route.field]
        if isinstance(value, float):  # 1.0 would route as "1.0", never as the "1" the spec names
            raise UserError(
                f"{where}: data.route.field {route.field!r} = {value!r} is a float; route by a column of text or "
                "integers (data.route.teachers keys are matched as text)"
            )
        teacher = route.teachers.get(str(value), route.default)
        if teacher is None:
            listed = ", ".join(sorted(route.teachers))
            raise UserError(
                f"{where}: data.route.field {route.field!r} = {value!r} names no teacher "
                f"(data.route.teachers has {listed}; no data.route.default)"
            )
        return teacher

    def check_columns(self, columns: list[str], dataset: DatasetSpec) -> None:
        """Every teacher template's fields must be columns of a file its rows may come from."""
        for name, template in self.templates.items():
            if template is None or (dataset.teacher is not None and dataset.teacher != name):
                continue
            missing = sorted(template_fields(template, f"teachers.{name}.prompt_template") - set(columns))
            if missing:
                raise UserError(
                    f"teachers.{name}.prompt_template: {{{missing[0]}}} is not a column of {dataset.path} "
                    f"(columns: {', '.join(columns)})"
                )

    def teacher_text(self, teacher: str, row: dict, where: str) -> str | None:
        """The teacher's own prompt text for the row; None when it reads the student's prompt."""
        template = self.templates[teacher]
        if template is None:
            return None
        fields = template_fields(template, f"teachers.{teacher}.prompt_template")
        empty = [name for name in sorted(fields) if row.get(name) is None or str(row[name]) == ""]
        if empty:
            raise UserError(f"{where}: {{{empty[0]}}} of teachers.{teacher}.prompt_template is empty in this row")
        return template.format(**{name: row[name] for name in fields})


def routing_for(spec: ExperimentSpec, cross_tokenizers: dict | None = None) -> Routing:
    """`cross_tokenizers`: name -> tokenizer of the teachers whose vocabulary differs from the student's."""
    templates = {name: teacher.prompt_template for name, teacher in spec.teachers.items()}
    chat = {name: teacher.reads_chat_template(spec.data.use_chat_template) for name, teacher in spec.teachers.items()}
    return Routing(templates, spec.data.route, dict(cross_tokenizers or {}), chat)
