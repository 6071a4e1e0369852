"""Data-set kinds on tiny fake archives in their official layouts (tests/fake_archives.py): splits,
labels and class names as the official files say, recognition, selections, and each missing file."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner

from pipeline.cli import main
from stages.data.errors import DataError, MissingDataError
from stages.data.folders import dataset_identity, scan
from stages.data.registry import KINDS, open_dataset, resolve_data
from stages.data.subsets import LISTS, named_lists

import fake_archives as fa
from helpers import make_image_folder

MAKERS = {
    "cub": (fa.make_cub, "CUB_200_2011"),
    "nabirds": (fa.make_nabirds, "nabirds"),
    "aircraft": (fa.make_aircraft, "fgvc-aircraft-2013b"),
    "cars": (fa.make_cars, None),
    "dogs": (fa.make_dogs, None),
    "flowers": (fa.make_flowers, None),
    "imagenet": (fa.make_imagenet, None),
}
CLASSES = {
    "cub": fa.CUB_CLASSES,
    "nabirds": ["Oak Titmouse", "Cedar Waxwing (Adult)", "Red-tailed Hawk (Dark morph)"],
    "aircraft": [v for v, _, _ in fa.AIRCRAFT],
    "cars": fa.CARS,
    "dogs": fa.DOGS,
    "flowers": ["1", "2", "3"],
    "imagenet": ["n01440764", "n01601694", "n02119789"],
}


def listing(splits) -> dict:
    return {name: [(p, int(label)) for p, label in zip(s.paths, s.labels)] for name, s in splits.items()}


@pytest.fixture(params=sorted(MAKERS))
def archive(request, tmp_path):
    make, _ = MAKERS[request.param]
    root, expected = make(tmp_path)
    return request.param, tmp_path, root, expected


def test_each_kind_reads_its_official_splits_labels_and_classes(archive):
    name, given, root, expected = archive
    splits = open_dataset(str(given))  # recognised from the layout (the archive's folder inside, where it has one)
    assert listing(splits) == expected
    assert all(s.classes == CLASSES[name] for s in splits.values())
    assert all(s.root == root for s in splits.values())
    identity = dataset_identity(splits)
    assert identity["kind"] == name and identity["splits"] == {k: len(v) for k, v in expected.items()}
    assert identity["files"] and all(len(digest) == 64 for digest in identity["files"].values())
    # the same with the kind named, on the archive folder itself
    assert listing(open_dataset(f"{name}:{root}")) == expected


def test_recorded_roles_follow_the_official_splits():
    assert KINDS["aircraft"].roles["val"] == "val" and KINDS["flowers"].roles["val"] == "val"
    assert all(KINDS[k].roles["val"] is None for k in ("cub", "nabirds", "cars", "dogs", "imagenet"))
    assert KINDS["imagenet"].roles["test"] == "val"


def test_nabirds_leaf_ids_are_remapped_and_recorded(tmp_path):
    root, _ = fa.make_nabirds(tmp_path)
    identity = dataset_identity(open_dataset(str(root)))
    assert identity["label_ids"] == [295, 817, 1000]
    assert identity["classes"] == ["Oak Titmouse", "Cedar Waxwing (Adult)", "Red-tailed Hawk (Dark morph)"]


def test_nabirds_images_labelled_with_an_inner_node_are_refused(tmp_path):
    root, _ = fa.make_nabirds(tmp_path)
    lines = (root / "image_class_labels.txt").read_text().replace(" 295\n", " 1\n")
    (root / "image_class_labels.txt").write_text(lines)
    with pytest.raises(DataError, match="hierarchy.txt lists as parents"):
        open_dataset(str(root))


def test_aircraft_levels_and_the_banner_crop(tmp_path):
    root, expected = fa.make_aircraft(tmp_path)
    family = open_dataset(f"aircraft-family:{tmp_path}")
    assert family["train"].classes == ["Boeing 707", "Cessna 172", "F/A-18"]
    assert [int(x) for x in family["test"].labels] == [1, 2, 0]
    manufacturer = open_dataset(f"aircraft-manufacturer:{root}")
    assert manufacturer["val"].classes == ["Boeing", "Cessna", "McDonnell Douglas"]
    # 24x44 images, black above a 20-row white banner: cut first, the 24x24 rest is all black; without
    # the cut the centre crop would hold ten rows of banner.
    split = open_dataset(str(tmp_path))["train"]
    assert split.crop_bottom == 20
    image, _ = split.read(0, 16, 3)
    assert image.shape == (3, 16, 16) and float(image.max()) == -1.0
    from stages.data.images import load_image

    uncut = load_image(root / split.paths[0], 16, 3)
    assert float(uncut.max()) == 1.0


def test_aircraft_banner_taller_than_the_image_names_the_file(tmp_path):
    root, _ = fa.make_aircraft(tmp_path)
    split = open_dataset(str(root))["test"]
    fa.banner_jpeg(root / split.paths[0], height=15, banner=10)
    with pytest.raises(DataError, match=r"15 pixels high"):
        split.read(0, 16, 3)


def test_mat_quirks_one_sample_split_and_column_vectors(tmp_path):
    root, expected = fa.make_cars(tmp_path, test_count=1)
    assert listing(open_dataset(str(root)))["test"] == expected["test"]
    # the test annotations inside devkit/ (where some copies keep them) read the same
    (root / "cars_test_annos_withlabels.mat").rename(root / "devkit" / "cars_test_annos_withlabels.mat")
    assert listing(open_dataset(f"cars:{root}"))["test"] == expected["test"]
    flowers = tmp_path / "flowers"
    flowers.mkdir()
    _, expected = fa.make_flowers(flowers)
    sets = scipy.io.loadmat(flowers / "setid.mat")
    scipy.io.savemat(flowers / "setid.mat", {k: v.reshape(-1, 1) for k, v in sets.items() if not k.startswith("__")})
    assert listing(open_dataset(str(flowers))) == expected


def test_imagenet_val_in_class_folders_is_a_plain_folder_unless_named(tmp_path):
    _, expected = fa.make_imagenet(tmp_path, flat_val=False, devkit=False)
    kind, _, _ = resolve_data(str(tmp_path))
    assert kind.name == "folder"  # reads the same, and keeps the identity stores made before kinds have
    assert dataset_identity(open_dataset(str(tmp_path))) == dataset_identity(scan(tmp_path, ["train", "val"]))
    named = open_dataset(f"imagenet:{tmp_path}")
    assert listing(named) == expected and dataset_identity(named)["kind"] == "imagenet"


def test_imagenet_val_alone_takes_its_classes_from_the_devkit(tmp_path):
    _, expected = fa.make_imagenet(tmp_path)
    val = open_dataset(str(tmp_path), splits=("val",))["val"]
    assert val.classes == CLASSES["imagenet"]  # the 3 leaves of meta.mat, not its inner synset
    assert listing({"val": val}) == {"val": expected["val"]}


def test_a_plain_image_folder_keeps_its_identity(tmp_path):
    root = make_image_folder(tmp_path / "images", counts={"train": 7, "val": 4})
    opened = open_dataset(str(root))
    assert dataset_identity(opened) == dataset_identity(scan(root, ["train", "val"]))
    assert set(dataset_identity(opened)) == {"file_list_sha256", "classes", "splits"}
    assert all(s.crop_bottom == 0 and s.meta == {} for s in opened.values())
    assert list(open_dataset(str(root), splits=("val",))) == ["val"]


@pytest.mark.parametrize(
    "name, removed",
    [
        ("cub", "image_class_labels.txt"),
        ("cub", "classes.txt"),
        ("nabirds", "hierarchy.txt"),
        ("aircraft", "data/variants.txt"),
        ("aircraft", "data/images_variant_val.txt"),
        ("cars", "devkit/cars_meta.mat"),
        ("cars", "cars_test_annos_withlabels.mat"),
        ("cars", "cars_test"),
        ("dogs", "test_list.mat"),
        ("dogs", "Images"),
        ("flowers", "setid.mat"),
        ("flowers", "imagelabels.mat"),
        ("imagenet", "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"),
        ("imagenet", "ILSVRC2012_devkit_t12/data/meta.mat"),
    ],
)
def test_a_missing_file_of_a_named_kind_is_named_with_the_layout(tmp_path, name, removed):
    make, _ = MAKERS[name]
    root, _ = make(tmp_path)
    target = root / removed
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(MissingDataError) as caught:
        open_dataset(f"{name}:{root}")
    message = str(caught.value)
    assert str(target) in message and KINDS[name].title in message and "expects" in message


def test_a_missing_image_listed_by_the_metadata_is_named(tmp_path):
    root, expected = fa.make_cub(tmp_path)
    (root / expected["test"][0][0]).unlink()
    with pytest.raises(MissingDataError, match=expected["test"][0][0].split("/")[-1]):
        dataset_identity(open_dataset(str(root)))


def test_layouts_that_match_nothing_and_unknown_kinds(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("x")
    with pytest.raises(MissingDataError) as caught:
        open_dataset(str(tmp_path / "stuff"))
    assert "matches none of the data-set layouts" in str(caught.value) and "cub:" in str(caught.value)
    with pytest.raises(DataError, match="unknown data-set kind 'birds'"):
        open_dataset(f"birds:{tmp_path}")
    with pytest.raises(MissingDataError, match="no such directory"):
        open_dataset(f"cub:{tmp_path / 'nope'}")
    root, _ = fa.make_cub(tmp_path / "c")
    with pytest.raises(DataError, match="official splits are train, test"):
        open_dataset(str(root), splits=("train", "val"))


def test_an_unnamed_layout_missing_one_file_says_which_kind_it_resembles(tmp_path):
    root, _ = fa.make_cub(tmp_path)
    (root / "train_test_split.txt").unlink()
    with pytest.raises(MissingDataError) as caught:
        open_dataset(str(tmp_path))
    assert f"CUB-200-2011 (cub:) without {root / 'train_test_split.txt'}" in str(caught.value)


def test_torchvisions_flowers_folder_is_recognised(tmp_path):
    _, expected = fa.make_flowers(tmp_path / "flowers-102")
    assert listing(open_dataset(str(tmp_path))) == expected


def test_classes_selects_and_relabels_in_the_data_sets_order(tmp_path):
    root, expected = fa.make_cub(tmp_path)
    chosen = tmp_path / "two.txt"
    chosen.write_text("# two of three\n003.Sooty_Albatross\n\n001.Black_footed_Albatross extra words\n")
    splits = open_dataset(str(root), classes=str(chosen))
    assert splits["train"].classes == ["001.Black_footed_Albatross", "003.Sooty_Albatross"]
    want = [(p, {0: 0, 2: 1}[label]) for p, label in expected["test"] if label != 1]
    assert listing(splits)["test"] == want
    record = dataset_identity(splits)["class_list"]
    assert record["name"] == "two.txt" and record["classes"] == 2 and len(record["sha256"]) == 64
    chosen.write_text("004.Nope\n")
    with pytest.raises(DataError, match="name no class"):
        open_dataset(str(root), classes=str(chosen))


def test_shipped_imagenet50_selects_by_wnid_and_keeps_the_devkit_names(tmp_path):
    fa.make_imagenet(tmp_path)
    wnids = {line.split()[0] for line in (LISTS / "imagenet50.txt").read_text().splitlines()}
    present = sorted(w for _, w, _ in fa.IMAGENET if w in wnids)
    assert present == ["n01601694"]  # the dipper is in ImageNet-50; a list naming absent classes is refused
    with pytest.raises(DataError, match="49 of the 50 lines"):
        open_dataset(str(tmp_path), classes="imagenet50")
    mine = tmp_path / "mine.txt"
    mine.write_text("water ouzel, dipper\nn02119789 Kit Fox\n")
    splits = open_dataset(str(tmp_path), classes=str(mine))
    identity = dataset_identity(splits)
    assert identity["classes"] == ["n01601694", "n02119789"]
    assert identity["class_names"] == ["water ouzel, dipper", "kit fox, Vulpes macrotis"]
    assert [int(x) for x in splits["val"].labels] == [1, 0, 1]


def test_subset_by_file_name_keeps_the_other_splits_whole(tmp_path):
    names = {
        "n01440764": ["n01440764_10026.JPEG", "n01440764_10027.JPEG"],
        "n01601694": ["n01601694_1.JPEG"],
        "n02119789": ["n02119789_5.JPEG", "n02119789_6.JPEG"],
    }
    _, expected = fa.make_imagenet(tmp_path, train_names=names)
    subset = tmp_path / "subset.txt"
    subset.write_text("n02119789_6.JPEG\nn01440764/n01440764_10026.JPEG\n")
    splits = open_dataset(str(tmp_path), subset=str(subset))
    assert listing(splits)["train"] == [
        ("train/n01440764/n01440764_10026.JPEG", 0),
        ("train/n02119789/n02119789_6.JPEG", 2),
    ]
    assert listing(splits)["val"] == expected["val"]
    record = dataset_identity(splits)["subset"]
    assert record["lines"] == 2 and record["splits"] == {"train": 2} and record["dropped"] == 0
    subset.write_text("n02119789_6.JPEG\nn09999999_1.JPEG\n")
    with pytest.raises(DataError, match="1 of the 2 lines"):
        open_dataset(str(tmp_path), subset=str(subset))
    # with --classes, lines outside the chosen classes are dropped (and counted)
    chosen = tmp_path / "one.txt"
    chosen.write_text("n02119789\n")
    splits = open_dataset(str(tmp_path), classes=str(chosen), subset=str(subset))
    assert listing(splits)["train"] == [("train/n02119789/n02119789_6.JPEG", 0)]
    assert dataset_identity(splits)["subset"]["dropped"] == 1


def test_shipped_1pct_list_selects_the_images_it_names(tmp_path):
    lines = (LISTS / "imagenet1pct.txt").read_text().split()
    picked = {}
    for name in lines:
        wnid = name.split("_")[0]
        if wnid in {w for _, w, _ in fa.IMAGENET} and len(picked.get(wnid, [])) < 2:
            picked.setdefault(wnid, []).append(name)
    full = {w: sorted(picked.get(w, []) + [f"{w}_999999.JPEG"]) for _, w, _ in fa.IMAGENET}
    fa.make_imagenet(tmp_path, train_names=full)
    chosen = tmp_path / "three.txt"
    chosen.write_text("\n".join(w for _, w, _ in fa.IMAGENET))
    splits = open_dataset(str(tmp_path), classes=str(chosen), subset="imagenet1pct")
    assert sorted(p.split("/")[-1] for p in splits["train"].paths) == sorted(n for v in picked.values() for n in v)
    subset = dataset_identity(splits)["subset"]
    assert subset["name"] == "imagenet1pct" and subset["source"]["repository"].endswith("soumik-kanad/diffssl")
    with pytest.raises(DataError, match="give it as --subset imagenet1pct"):
        open_dataset(str(tmp_path), classes="imagenet1pct")


def test_shipped_lists_are_the_upstream_files_verbatim():
    counts = {"imagenet50": 50, "imagenet100": 100, "imagenet200": 200, "imagenet1pct": 12811, "imagenet10pct": 128116}
    for name, entry in named_lists().items():
        path = LISTS / entry["file"]
        blob = subprocess.run(
            ["git", "hash-object", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert blob == entry["git_blob"], name  # the blob id upstream's tree records for entry["path"]
        assert (
            len(path.read_text().split("\n" if entry["selects"] == "classes" else None))
            - (entry["selects"] == "classes")
            == counts[name]
        ), name
    assert set(named_lists()) == set(counts)


def test_the_datasets_command_lists_every_kind():
    result = CliRunner().invoke(main, ["datasets"])
    assert result.exit_code == 0, result.output
    for name, kind in KINDS.items():
        assert name in result.output and kind.title in result.output
    assert "images overlap ImageNet-1k train" in result.output


def test_sources_record_where_each_list_comes_from():
    for entry in json.loads((LISTS / "sources.json").read_text()).values():
        assert entry["repository"].startswith("https://github.com/") and len(entry["commit"]) == 40
        assert np.all([key in entry for key in ("path", "git_blob", "selects", "description")])
