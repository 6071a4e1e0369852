"""The shape of the code: import-linter's contracts (no import cycles, dependencies one way), a light
`--help`, DVC deps that are exactly the code each stage's command runs.

The import graph is read from the source (every import statement, also inside functions and under
TYPE_CHECKING), so an import that only runs on some code path still counts.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
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
        for node in tree.body if name in module_level else ast.walk(tree):
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


def closure(graph: dict[str, set[str]], roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    return seen


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts (pyproject.toml [tool.importlinter]) on the packages under `root`."""
    tool = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(tool), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_architecture_contracts_hold():
    """Layers pipeline -> stages -> cache, cache alone, no import cycles: kept by import-linter."""
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_contracts_see_a_cycle_and_a_wrong_way_import(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with (tmp_path / "cache" / "errors.py").open("a") as module:  # the store reaching up into a stage
        module.write("\n\ndef _wrong_way():\n    from stages.probe import registry  # noqa: F401\n")
    with (tmp_path / "stages" / "devices.py").open("a") as module:  # devices <-> outputs: a cycle
        module.write("\n\ndef _cycle():\n    from stages import outputs  # noqa: F401\n")
    with (tmp_path / "stages" / "outputs.py").open("a") as module:
        module.write("\n\ndef _cycle():\n    from stages import devices  # noqa: F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1
    for contract in ("Layers", "The store stands alone", "No import cycles"):
        assert re.search(rf"{contract}[^\n]*BROKEN", done.stdout), (contract, done.stdout)


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


# -- DVC: each stage depends on the code its command runs, and on nothing else ---------------------------
# each file, and how its deps reach the repository (models/dvc.yaml's stage runs in the root: wdir ..)
DVC_FILES = {"dvc.yaml": "", "transfer/dvc.yaml": "../", "models/dvc.yaml": ""}


@functools.cache
def command_graph() -> dict[str, set[str]]:
    """The import graph a command runs on: every import of every module counts (also those inside
    functions, the way a command imports its stage code), except inside `pipeline.options`, whose
    lazy imports serve only the options that use them."""
    return import_graph(module_level=("pipeline.options",))


def stage_roots(cmd: str) -> list[str]:
    """The modules a DVC stage's command line starts from: the `pipeline` group and the command's module
    (and `python -m pipeline`, which `--nproc` starts again under torchrun)."""
    names = re.findall(r"(?:^|\s)pipeline ([a-z][a-z-]*)", cmd)
    assert len(names) == 1, f"expected one `pipeline <command>` in {cmd!r}"
    roots = ["pipeline.cli", f"pipeline.commands.{names[0].replace('-', '_')}"]
    return roots + (["pipeline.__main__"] if "--nproc" in cmd else [])


def dvc_stages() -> list[tuple[str, str]]:
    return [(path, stage) for path in DVC_FILES for stage in yaml.safe_load((REPO / path).read_text())["stages"]]


def code_deps(path: str, stage: str) -> tuple[str, list[str]]:
    """(the stage's command, its deps on the project's code, relative to the repository root)."""
    definition = yaml.safe_load((REPO / path).read_text())["stages"][stage]
    body = definition.get("do", definition)
    prefix = DVC_FILES[path]
    deps = [d[len(prefix) :] for d in body["deps"] if isinstance(d, str) and d.startswith(prefix)]
    return body["cmd"], [d for d in deps if d.split("/")[0] in PACKAGES]


def holds(dep: str, module_file: Path) -> bool:
    relative = module_file.relative_to(REPO).as_posix()
    return relative == dep if dep.endswith(".py") else relative.startswith(dep.rstrip("/") + "/")


@pytest.mark.parametrize("path, stage", dvc_stages())
def test_dvc_dependencies_are_the_code_the_command_runs(path, stage):
    cmd, code = code_deps(path, stage)
    modules = project_modules()
    needed = closure(command_graph(), stage_roots(cmd))
    uncovered = sorted(m for m in needed if not any(holds(d, modules[m]) for d in code))
    assert uncovered == [], f"{path} stage {stage} lacks the code of {uncovered}"
    unneeded = [d for d in code if not any(holds(d, modules[m]) for m in needed)]
    assert unneeded == [], f"{path} stage {stage} depends on code its command never imports: {unneeded}"
    for dep in code:
        if dep.split("/")[0] == "pipeline":  # one command's module, never every command's
            assert dep.endswith(".py"), f"{path} stage {stage}: {dep} (list the command's own modules)"
        else:  # a whole folder, or a module that sits beside folders and is shared by stages
            assert (REPO / dep).is_dir() or (REPO / dep).suffix == ".py", dep


def test_a_command_module_is_not_every_stages_dependency():
    """Editing one command (its help, say) re-runs only the stages that run it: DDPM training does not
    depend on the probe's command module, nor the probe on pretraining's."""
    deps = {stage: code_deps(path, stage)[1] for path, stage in dvc_stages() if path != "transfer/dvc.yaml"}
    assert "pipeline/commands/pretrain.py" in deps["pretrain"]
    assert not any(
        d.startswith("pipeline/commands/") and d != "pipeline/commands/pretrain.py" for d in deps["pretrain"]
    )
    assert "pipeline/commands/pretrain.py" not in deps["probe"] and "pipeline" not in deps["probe"]
