"""The folders are layers: each imports only from the layers below it, and the math needs no Ray."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

PACKAGE = REPO / "opd_ray"
# lowest first; a module may import from its own layer and any earlier one
LAYERS = [
    "errors",
    "console",
    "files",
    "spec",
    "data",
    "losses",
    "health",
    "tracking",
    "actors",
    "driver",
    "recipe",
    "report",
    "plots",
    "cli",
]


def layer_of(module: str) -> str:
    return module.split(".")[1]


def imported_opd_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opd_ray."):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("opd_ray.")}
    return names


def test_every_import_points_down_the_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if module == "opd_ray.__init__":
            continue
        own = LAYERS.index(layer_of(module))
        for target in imported_opd_modules(path):
            if LAYERS.index(layer_of(target)) > own:
                upward.append(f"{module} imports {target}")
    assert not upward, upward


def test_the_math_imports_without_ray_vllm_or_deepspeed() -> None:
    probe = (
        "import sys\n"
        "import opd_ray.spec, opd_ray.losses.step, opd_ray.losses.advantages, opd_ray.data.order\n"
        "import opd_ray.health.doctor\n"
        "print(sorted(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.strip() == "[]"


def import_graph() -> dict[str, set[str]]:
    """{module: the opd_ray modules it imports} (type-checking imports too: a cycle there is a cycle in the design)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[module] = imported_opd_modules(path)
    return graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not cycles, cycles
