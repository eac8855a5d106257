"""The house's rules (docs/ARCHITECTURE.md), checked on the source: imports go one way and form no cycle, no
module or function grows past its size, and the DAG file loads only what declaring the DAG needs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "distilled_plugins"
SOURCES = [*ENGINE.rglob("*.py"), *(REPO / "operators").rglob("*.py"), *(REPO / "dags").glob("*.py")]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# a function may pass MAX_FUNCTION_LINES when the line above its def (or its decorators) says why
LONG_FUNCTION_NOTE = "# long:"
# what each room of the engine may import of the engine (besides itself): foundations never import a stage
ROOMS = {
    "core": set(),
    "teacher": {"core"},
    "devtools": None,  # anything: it runs the project
}
HEAVY = ("numpy", "pyarrow", "aiohttp", "transformers", "math_verify", "mindspore", "mindformers", "datasets")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module of this project ``path`` imports, at its top or inside a function."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    names = {module_name(p) for p in SOURCES}
    return {name for name in found if name in names}


def test_the_engine_has_no_import_cycle():
    graph = {module_name(p): imported_modules(p) for p in ENGINE.rglob("*.py")}
    # a module's package is imported first; a package importing its own modules is no cycle
    graph = {
        module: {m for m in deps if m != module and not module.startswith(m + ".") and not m.startswith(module + ".")}
        for module, deps in graph.items()
    }
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycle = [*trail[trail.index(dep) :], dep] if dep in trail else [module, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_go_one_way():
    """dags -> operators -> stages -> foundations: the engine never imports Airflow or the operators, a foundation
    never a stage, and no stage the developer tools."""
    for path in ENGINE.rglob("*.py"):
        name = module_name(path)
        room = name.split(".")[1] if "." in name else ""
        source = path.read_text()
        assert "import airflow" not in source and "from airflow" not in source, f"{name} imports Airflow"
        for dep in imported_modules(path):
            assert not dep.startswith(("operators", "dags")), f"{name} imports {dep}"
            dep_room = dep.split(".")[1] if dep.count(".") else ""
            if dep_room == room or ROOMS.get(room, ()) is None:
                continue
            if room in ROOMS:
                assert dep_room in ROOMS[room], f"{name} ({room}/) imports {dep}: a foundation imports a stage"
            assert dep_room != "devtools", f"{name} imports the developer tools ({dep})"


def test_no_module_or_function_is_too_long():
    too_long = []
    for path in SOURCES:
        lines = path.read_text().splitlines()
        where = path.relative_to(REPO)
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"{where}: {len(lines)} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if length > MAX_FUNCTION_LINES and LONG_FUNCTION_NOTE not in lines[first - 2]:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)


def test_the_dag_file_loads_only_what_declaring_the_dag_needs():
    """Airflow parses DAG files often: distill_r1 imports the operators and the stages' settings, never numpy, an
    HTTP client, a tokenizer or a stage's implementation (operators import those when a task runs)."""
    probe = (
        "import json, runpy, sys; runpy.run_path('dags/distill_r1.py'); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('distilled_plugins', *sys.argv[1:])))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *HEAVY], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert not heavy, f"the DAG file loads {heavy[:10]}"
    engine = {m for m in loaded if m.startswith("distilled_plugins.")}
    light = ("core", "teacher.settings", "teacher.batch_api", "teacher.endpoints")
    stages = {m for m in engine if not m.startswith(tuple(f"distilled_plugins.{r}" for r in light))}
    # of a stage, only its package and its settings
    assert all(m.count(".") == 1 or m.endswith(".config") for m in stages), sorted(stages)


@pytest.mark.parametrize(
    "old",
    [
        "operators.triggers.MsrunJobTrigger",
        "operators.triggers.TeacherBatchTrigger",
        "operators.seed_watcher.SeedChangeTrigger",
    ],
)
def test_triggers_stored_under_their_old_classpaths_still_load(old):
    """A deployment upgraded while a task is deferred has these in its trigger table: the triggerer must load them
    (it imports the classpath, as Airflow's import_string does)."""
    from airflow.sdk.module_loading import import_string

    trigger = import_string(old)
    assert trigger.__name__ == old.rsplit(".", 1)[1]
    assert trigger.__module__.startswith("operators.triggers.")
