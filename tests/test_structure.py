"""The shape of the code: no import cycles, dependencies one way, a light `--help`, complete DVC deps.

The import graph is read from the source (every import statement, also inside functions and under
TYPE_CHECKING), so an import that only runs on some code path still counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "stages", "pipeline")


def project_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def import_graph(*, module_level: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """{module: the project modules it imports}; `from a import b` counts as importing `a.b` when that is a module.

    Modules named in `module_level` count only the imports of their module body (the command line
    imports each command's stage code inside the command)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in (tree.body if name in module_level else ast.walk(tree)):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for candidate in candidates:
                # the longest project module the import names (a package's submodule before the package)
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def cli_modules() -> tuple[str, ...]:
    """The command line's modules: each imports its command's stage code inside the command, so only their
    module bodies count for what a command needs."""
    return tuple(name for name in project_modules() if name.split(".")[0] == "pipeline")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def closure(graph: dict[str, set[str]], roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    return seen


def test_no_two_modules_import_each_other():
    assert cycles(import_graph()) == []


def test_the_walker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_one_way():
    graph = import_graph()
    wrong = [(m, t) for m, targets in graph.items() for t in targets
             if (m.startswith("cache") and not t.startswith("cache"))
             or (m.startswith("stages") and t.startswith("pipeline"))]
    assert wrong == []


def test_help_does_not_import_torch():
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from pipeline.cli import main\n"
        "runner = CliRunner()\n"
        "for args in [['--help']] + [[name, '--help'] for name in main.commands]:\n"
        "    result = runner.invoke(main, args)\n"
        "    assert result.exit_code == 0 and 'Usage' in result.output, (args, result.output)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'sklearn', 'matplotlib', 'dask') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# What each DVC stage runs: the command line and its command's module (their module-level imports; each
# command imports its own stage code when it runs) and the stage code the command calls (probes with
# --no-render).
STAGE_ENTRIES = {
    "data": ["pipeline.cli", "pipeline.commands.data", "stages.data.mnist"],
    "pretrain": ["pipeline.cli", "pipeline.commands.pretrain", "stages.pretrain.ddpm"],
    "random_init": ["pipeline.cli", "pipeline.commands.random_init", "stages.pretrain.random_init"],
    "extract": ["pipeline.cli", "pipeline.commands.extract", "stages.extract.plan", "stages.extract.run"],
    "pixels": ["pipeline.cli", "pipeline.commands.pixels", "stages.extract.pixels", "stages.models.kinds"],
    "probe": ["pipeline.cli", "pipeline.commands.sweep", "stages.sweep.engine", "stages.sweep.plan",
              "stages.sweep.run", "stages.sweep.task"],
    "probe_pixels": ["pipeline.cli", "pipeline.commands.sweep", "stages.sweep.engine", "stages.sweep.plan",
                     "stages.sweep.run", "stages.sweep.task"],
    "report": ["pipeline.cli", "pipeline.commands.report", "stages.report"],
    "cka": ["pipeline.cli", "pipeline.commands.cka", "stages.cka.run"],
}


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRIES))
def test_dvc_dependencies_are_per_folder_and_complete(stage):
    definition = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    body = definition.get("do", definition)
    deps = [d for d in body["deps"] if not d.startswith(("$", "data/", "features/", "results", "models/"))]
    code = [d for d in deps if d.split("/")[0] in PACKAGES]
    modules = project_modules()
    needed = closure(import_graph(module_level=cli_modules()), STAGE_ENTRIES[stage])
    uncovered = sorted(m for m in needed
                       if not any(modules[m].relative_to(REPO).as_posix().startswith(d.rstrip("/") + ("" if d.endswith(".py") else "/"))
                                  for d in code))
    assert uncovered == [], f"dvc.yaml stage {stage} lacks the code of {uncovered}"
    # a dependency is a whole folder, or a module that sits beside folders and is shared by stages
    for dep in code:
        path = REPO / dep
        assert path.is_dir() or (path.suffix == ".py" and path.parent != REPO / "stages" / "probe"), dep
