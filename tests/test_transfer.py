"""The transfer table from result directories alone (real runs on tiny fake CUB and Dogs stores), and
the transfer DVC template's wiring."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from stages.extract.pixels import write_pixel_store
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract
from stages.probe.run import run_probe
from stages.probe.settings import ProbeSettings

import fake_archives as fa

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory) -> Path:
    """results/<data set>/<model>/<head>/ for a fake CUB and a fake Stanford Dogs."""
    base = tmp_path_factory.mktemp("transfer")
    cub, _ = fa.make_cub(base / "cub", per_class=(4, 2))
    dogs, _ = fa.make_dogs(base / "dogs")
    out = base / "results"
    for name, root in (("cub", cub), ("dogs", dogs)):
        store = base / f"{name}.zarr"
        run_extract(
            ExtractConfig(
                model=str(tiny_model),
                data=str(root),
                out=str(store),
                blocks=(2, 4),
                timesteps=(10,),
                pools=(1,),
                batch_size=16,
            ),
            progress=False,
        )
        pixels = write_pixel_store(root, base / f"{name}_pixels.zarr", size=8, channels=3)
        for head in ("ridge", "knn"):
            run_probe(ProbeSettings(store=str(store), head=head, out=str(out / name / "pretrained"), val_fraction=0.34))
        run_probe(ProbeSettings(store=str(pixels), head="ridge", out=str(out / name / "pixels"), val_fraction=0.34))
    return out


def test_transfer_table_rows_columns_and_the_overlap_mark(results, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "report",
            "--transfer",
            "--results",
            f"cub={results / 'cub'}",
            "--results",
            f"dogs={results / 'dogs'}",
            "--out",
            str(tmp_path / "t"),
        ],
    )
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert list(table) == ["cub", "dogs"]
    assert list(table["cub"]) == ["pretrained/knn", "pretrained/ridge", "pixels/ridge"]  # baselines last
    assert all(0.0 <= v <= 1.0 for row in table.values() for v in row.values())
    markdown = (tmp_path / "t" / "transfer.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0] == "| data set | pretrained · knn | pretrained · ridge | pixels · ridge |"
    assert rows[1].startswith("| cub | ") and rows[2].startswith("| dogs † | ")
    assert "(b" in rows[1] and ", t10)" in rows[1]  # the chosen block and timestep
    assert "dogs: its images overlap ImageNet-1k train" in markdown
    with open(tmp_path / "t" / "transfer.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 6 and {r["kind"] for r in lines} == {"cub", "dogs"}
    dogs_ridge = next(
        r for r in lines if r["dataset"] == "dogs" and r["model"] == "pretrained" and r["head"] == "ridge"
    )
    assert abs(float(dogs_ridge["test_top1"]) - table["dogs"]["pretrained/ridge"]) < 1e-6
    assert dogs_ridge["overlaps"].startswith("ImageNet-1k train")
    assert (tmp_path / "t" / "transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_a_directory_of_data_sets_stands_for_each(results, tmp_path):
    from stages.transfer import build_transfer

    whole = build_transfer({"results": results}, tmp_path / "a")
    named = build_transfer({"cub": results / "cub", "dogs": results / "dogs"}, tmp_path / "b")
    assert whole == named
    build_transfer({"results": results}, tmp_path / "a")  # its own output is replaced
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep")
    result = CliRunner().invoke(main, ["report", "--transfer", "--results", str(results), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "was not written by" in result.output
    result = CliRunner().invoke(
        main, ["report", "--transfer", "--results", str(tmp_path), "--out", str(tmp_path / "d")]
    )
    assert result.exit_code == 1 and "holds no <model>/<head>/ probe results" in result.output


def test_the_transfer_template_covers_every_data_set_and_head():
    params = yaml.safe_load((REPO / "transfer" / "params.yaml").read_text())
    from stages.data.registry import KINDS

    assert {d["kind"] for d in params["datasets"].values()} <= set(KINDS)
    assert {"cub", "aircraft", "cars", "dogs", "flowers", "nabirds"} <= set(params["datasets"])
    stages = yaml.safe_load((REPO / "transfer" / "dvc.yaml").read_text())["stages"]
    assert stages["probe"]["matrix"] == {
        "dataset": "${datasets}",
        "features": ["pretrained", "random_init"],
        "head": "${probe.heads}",
    }
    assert "--transfer --results results" in stages["report"]["cmd"]
