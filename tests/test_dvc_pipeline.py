"""The DVC pipeline end to end on a reduced default, so the wiring of dvc.yaml cannot rot.

The project's tracked files are copied into a fresh git repository, `params.yaml` is shrunk (a few
hundred images, one epoch, one timestep) and `dvc repro` runs for real. Then: a second `dvc repro`
does nothing, and a probe parameter change re-runs the probes and the report only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # whole `dvc repro` runs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [p for p in listing.stdout.decode().split("\0") if p]


def run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(cwd)}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if shutil.which("dvc", path=str(BIN)) is None:
        pytest.fail(f"dvc is not installed beside {sys.executable}; install the project with its dependencies")
    root = tmp_path_factory.mktemp("dvc") / "project"
    for relative in tracked_files():
        source = REPO / relative
        if source.is_file():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / relative)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["per_class"] = 20
    params["pretrain"]["epochs"] = 1
    params["extract"]["timesteps"] = "25"
    params["extract"]["batch_size"] = 64
    params["probe"]["heads"] = ["linear"]
    params["similarity"].update(timesteps="25", samples=30, permutations=3)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "add", "-A"], root)
    run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "reduced"], root)
    run(["dvc", "repro"], root)
    return root


def test_repro_writes_metrics_for_every_head_and_baseline(project):
    metrics = json.loads((project / "report" / "metrics.json").read_text())
    assert set(metrics) == {"linear"}
    for head in metrics.values():
        assert set(head) == {"pretrained", "random_init", "pixels"}
        assert all(0.0 <= accuracy <= 1.0 for accuracy in head.values())
    assert (project / "report" / "summary.md").read_text().count("|") > 10
    assert list((project / "report" / "heatmaps").glob("*.png"))
    shown = run(["dvc", "metrics", "show", "--json"], project)
    assert "pretrained" in shown and "random_init" in shown and "pixels" in shown
    # issue 20: balanced accuracy, top-5 and the interval bounds beside top-1 (report/evaluation.json)
    assert "report/evaluation.json" in shown and "test_balanced" in shown and "test_top1_low" in shown
    assert list((project / "report" / "confusion").glob("*.png"))


def test_second_repro_does_nothing_and_probe_changes_rerun_only_probes(project):
    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["probe"]["seed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro"], project)
    assert "Running stage 'probe@" in changed and "Running stage 'report'" in changed
    for stage in ("data", "pretrain", "random_init", "extract@", "pixels"):
        assert f"Running stage '{stage}" not in changed, changed


def test_editing_one_command_makes_only_its_stages_stale(project):
    """Each stage depends on its own command's module: an edit of `pipeline probe`'s (its help, say)
    makes the probe stages stale and nothing upstream, DDPM training least of all."""
    module = project / "pipeline" / "commands" / "probe.py"
    original = module.read_text()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(project)}

    def stale() -> set[str]:
        done = subprocess.run(["dvc", "status", "--json"], cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return set(json.loads(done.stdout))

    before = stale()  # transfer/dvc.yaml's stages, never run here, are stale all along
    try:
        module.write_text(original + "\n# an edit of the probe command's module\n")
        after = stale()
    finally:
        module.write_text(original)
    assert after - before == {"probe@pretrained-linear", "probe@random_init-linear", "probe_pixels@linear"}
    assert not any(
        name.split("@")[0] in ("data", "pretrain", "random_init", "extract", "pixels", "report") for name in after
    )


def test_the_default_trains_nothing_and_the_retraining_stage_trains_on_request(project):
    """The default reads the bundled checkpoint (tests/test_model_records.py checks it); models/dvc.yaml's
    `pretrain` stage trains the same recipe (here one epoch) into models/pretrained when asked."""
    assert not (project / "models" / "pretrained").exists()
    done = run(["dvc", "repro", "models/dvc.yaml"], project)
    assert "Running stage 'models/dvc.yaml:pretrain'" in done
    log = json.loads((project / "models" / "pretrained" / "train_log.json").read_text())
    assert log["epochs"] == 1 and log["seed"] == 0 and log["config"]["block_out_channels"] == [32, 32, 64]
    again = run(["dvc", "repro"], project)  # the default still reads the bundle: nothing to do
    assert "Running stage" not in again
