"""One selection API (`FeatureStore.select`, `cache.selection`): the pool rule written once, views looked up
behind it, typed errors for what a store lacks; and the rule and the view names nowhere outside `cache`."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest

from cache import FeatureStore
from cache.errors import ConfigError, NotInStoreError
from cache.selection import InputSet, SelectionError, Unavailable
from tests.helpers import write_store

REPO = Path(__file__).resolve().parents[1]
# block 1: 2 channels at resolution 8, stored 4x4; block 2: 3 channels at resolution 2, stored whole (2x2)
RESOLUTION = {1: 8, 2: 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    """Train with one augmented view (stored as a split of its own, the way extraction stores views), val."""
    rng = np.random.default_rng(0)
    features, labels = {}, {}
    for split, n in (("train", 10), ("train@view1", 10), ("val", 6)):
        labels[split] = np.arange(n) % 2
        for t in (10, 90):
            features.setdefault((1, t), {})[split] = rng.normal(size=(n, 2, 4, 4)).astype(np.float32)
        features.setdefault((2, 10), {})[split] = rng.normal(size=(n, 3, 2, 2)).astype(np.float32)
    path = write_store(
        tmp_path_factory.mktemp("selection") / "s.zarr",
        features,
        labels,
        resolution=RESOLUTION,
        pools=(1, 2, 4),
        chunk_samples=4,
    )
    return FeatureStore.open(path)


def test_defaults_are_everything_the_store_holds_at_its_extracted_pools(store):
    selection = store.select()
    assert selection.arrays == ((1, 10), (1, 90), (2, 10)) and selection.pools == (1, 2, 4)
    assert selection.split is None and selection.stored_split is None and selection.views == 1
    # pool-major, then blocks and timesteps in the store's order
    assert [(i.pool, i.block, i.timestep) for i in selection.inputs] == [
        (p, b, t) for p in (1, 2, 4) for b, t in ((1, 10), (1, 90), (2, 10))
    ]
    assert selection.blocks == [1, 2] and [i.array for i in selection.at(2)] == [(1, 10), (1, 90), (2, 10)]


def test_a_pool_below_the_resolution_reads_that_grid(store):
    item = store.select(blocks=[1], timesteps=[90], pools=[2]).inputs[0]
    assert item == InputSet(block=1, timestep=90, pool=2, grid=2, channels=2, stored_grid=4, resolution=8)
    assert item.width == 2 * 2 * 2
    np.testing.assert_array_equal(store.read("train", 1, 90, pool=2).shape, (10, 2, 2, 2))


@pytest.mark.parametrize("pool", [2, 3, 16])
def test_a_pool_at_or_above_the_resolution_reads_the_full_grid(store, pool):
    (item,) = store.select(blocks=[2], pools=[pool]).inputs
    assert (item.pool, item.grid, item.width) == (pool, 2, 3 * 2 * 2)
    # what the selection says is what the reader gives
    assert store.read("val", 2, 10, pool=pool).shape == (6, 3, item.grid, item.grid)


def test_pools_above_the_resolution_collapse_to_one_grid_and_stay_separate_inputs(store):
    """Kept as it was: each pool asked is its own input set (a probe key, a CKA label), all at the full grid."""
    selection = store.select(blocks=[2], pools=[2, 4, 16])
    items = selection.inputs
    assert [(i.pool, i.grid) for i in items] == [(2, 2), (4, 2), (16, 2)]
    assert selection.grids == {(2, 2): 2, (2, 4): 2, (2, 16): 2}
    assert len({i.width for i in items}) == 1


def test_without_full_above_a_pool_above_the_resolution_is_not_offered(store):
    """CKA and similarity label features by pool: they ask only for sizes a block has (as they always did)."""
    selection = store.select(blocks=[1, 2], timesteps=[10], pools=[2, 4], full_above=False, partial=True)
    assert [(i.block, i.pool) for i in selection.inputs] == [(1, 2), (2, 2), (1, 4)]
    assert selection.problems == (Unavailable("pool", (4,), (1, 2), block=2, grid=2),)
    with pytest.raises(SelectionError, match=r"block 2 cannot be read at pool 4 \(stored 2x2: pools \[1, 2\]\)"):
        store.select(blocks=[2], pools=[4], full_above=False)


def test_the_commands_keep_their_rule_for_pools_above_the_resolution(store):
    """The probe trains one input set per pool asked, each at the full grid; CKA (and similarity, which
    resolves as CKA does) refuses a pool the block does not have. Both as before the selection existed."""
    from stages.cka.run import CkaSettings, resolve_features
    from stages.cka.streaming import CkaInputError
    from stages.probe.plan import plan_combos
    from stages.probe.settings import ProbeSettings

    combos = plan_combos(store, ProbeSettings(store=store.path, head="linear", blocks=(2,), pools=(2, 4, 16)))
    assert [(c.key, c.shapes) for c in combos] == [
        ("b2_t10_p2", ((3, 2),)),
        ("b2_t10_p4", ((3, 2),)),
        ("b2_t10_p16", ((3, 2),)),
    ]
    settings = CkaSettings(stores=(("a", store.path),), out="unused", pools=(2, 4), split="val")
    with pytest.raises(CkaInputError) as error:
        resolve_features({"a": store}, settings)
    assert "cannot give pool 4 for block(s) 2; it can give block 2: pools [1, 2]" in str(error.value)


def test_a_pool_the_stored_grid_cannot_give_exactly_is_refused(store):
    with pytest.raises(SelectionError) as error:
        store.select(blocks=[1], pools=[3])
    assert error.value.problems == (Unavailable("pool", (3,), (1, 2, 4), block=1, grid=4),)


@pytest.mark.parametrize(
    "request_, problem",
    [
        ({"blocks": [1, 7]}, Unavailable("block", (7,), (1, 2))),
        ({"timesteps": [10, 50]}, Unavailable("timestep", (50,), (10, 90), block=1)),
        ({"split": "test"}, Unavailable("split", ("test",), ("train", "val"))),
        ({"split": "val", "view": 1}, Unavailable("view", (1,), (0,), split="val")),
        ({"split": "train", "view": 2}, Unavailable("view", (2,), (0, 1), split="train")),
    ],
)
def test_what_the_store_lacks_is_a_typed_error_saying_what_it_has(store, request_, problem):
    with pytest.raises(SelectionError) as error:
        store.select(**request_)
    assert problem in error.value.problems
    assert isinstance(error.value, NotInStoreError) and error.value.store == store.location
    message = str(error.value)
    assert message.startswith(f"{store.path} cannot serve this request: ") and problem.describe() in message
    assert "--" not in message and "pipeline" not in message  # cache speaks no command line


def test_every_problem_is_listed_at_once_and_partial_keeps_what_is_there(store):
    asked = dict(blocks=[1, 2, 7], timesteps=[10, 50], pools=[1, 3], split="val")
    with pytest.raises(SelectionError) as error:
        store.select(**asked)
    kinds = [p.kind for p in error.value.problems]
    assert kinds == ["block", "timestep", "timestep", "pool"]  # 7; 50 of blocks 1 and 2; pool 3 of block 1
    copy = pickle.loads(pickle.dumps(error.value))  # as it crosses to a dask worker's client
    assert (type(copy), str(copy), copy.problems) == (SelectionError, str(error.value), error.value.problems)
    selection = store.select(**asked, partial=True)
    assert selection.problems == error.value.problems
    assert selection.arrays == ((1, 10), (2, 10))
    assert [(i.block, i.pool) for i in selection.inputs] == [(1, 1), (2, 1), (2, 3)]
    # the side each stored block asked would be read at, readable or not (a head's minimum grid is checked on it)
    assert selection.grids == {(1, 1): 1, (1, 3): 3, (2, 1): 1, (2, 3): 2}


def test_bad_pools_and_views_are_config_errors(store):
    for pools in ([0], [-1], [1.5], [True]):
        with pytest.raises(ConfigError, match="positive integers"):
            store.select(pools=pools)
    with pytest.raises(ConfigError, match="of a split"):
        store.select(view=1)


def test_views_are_looked_up_behind_the_selection(store):
    centre, view = store.select(split="train"), store.select(split="train", view=1, blocks=[2], pools=[1])
    assert (centre.views, centre.stored_split, view.views, view.view) == (2, "train", 2, 1)
    assert view.stored_split == store.view_split("train", 1) and view.stored_split != "train"
    (item,) = view.inputs
    assert view.path(item) == f"{view.stored_split}/block2/t10"
    np.testing.assert_array_equal(store.read(view.stored_split, 2, 10), store.read("train", 2, 10, view=1))
    assert store.select(split="val").views == 1 and store.splits == ["train", "val"]


def test_the_description_lists_every_block(store):
    text = store.describe()
    assert "block 1: timesteps [10, 90], pools [1, 2, 4] (2 channels, 8x8)" in text
    assert "block 2: timesteps [10], pools [1, 2] (3 channels, 2x2)" in text


# -- the rule and the view names are written in cache/ only ------------------------------------------------------
RESOLUTION_NAMES = ("resolution",)


def mentions(node: ast.AST, words: tuple[str, ...]) -> bool:
    for sub in ast.walk(node):
        text = (
            sub.id
            if isinstance(sub, ast.Name)
            else sub.attr
            if isinstance(sub, ast.Attribute)
            else sub.value
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
            else ""
        )
        if any(word in text for word in words):
            return True
    return False


def violations(source: str) -> list[str]:
    """What in `source` clamps a pool to a resolution (`min(..., resolution)`) or spells or parses the
    name of a view's split (the separator, `VIEW_MARK`, `parse_view_split`)."""
    found = []
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("min", "max")
            and any(mentions(arg, RESOLUTION_NAMES) for arg in node.args)
        ):
            found.append(f"line {node.lineno}: {node.func.id}() of a resolution")
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "@view" in node.value
            and id(node) not in docstrings
        ):
            found.append(f"line {node.lineno}: the view separator")
        name = (
            node.id
            if isinstance(node, ast.Name)
            else node.attr
            if isinstance(node, ast.Attribute)
            else next((a.name for a in node.names if a.name in ("VIEW_MARK", "parse_view_split")), "")
            if isinstance(node, ast.ImportFrom)
            else ""
        )
        if name in ("VIEW_MARK", "parse_view_split"):
            found.append(f"line {node.lineno}: {name}")
    return found


def test_the_checker_sees_the_rule_and_the_view_names():
    assert violations("grid = min(int(p), info['resolution'])\n") == ["line 1: min() of a resolution"]
    assert violations("size = min(pool, block.resolution)\n") == ["line 1: min() of a resolution"]
    assert violations("name = f'{split}@view{v}'\n") == ["line 1: the view separator"]
    assert violations("from cache.layout import parse_view_split\n") == ["line 1: parse_view_split"]
    assert violations("base, view = layout.parse_view_split(name)\n") == ["line 1: parse_view_split"]
    assert violations("mark = layout.VIEW_MARK\n") == ["line 1: VIEW_MARK"]
    assert violations('def f():\n    """Reads train@view1."""\n    return min(a, b)\n') == []


def test_no_module_outside_cache_holds_the_pool_rule_or_the_view_names():
    found = {}
    for package in ("stages", "pipeline", "transfer"):
        for path in sorted((REPO / package).rglob("*.py")):
            problems = violations(path.read_text())
            if problems:
                found[path.relative_to(REPO).as_posix()] = problems
    assert found == {}


def test_in_cache_the_rule_is_written_once():
    found = {
        path.relative_to(REPO).as_posix(): [p for p in violations(path.read_text()) if "resolution" in p]
        for path in sorted((REPO / "cache").glob("*.py"))
    }
    found = {path: lines for path, lines in found.items() if lines}
    assert list(found) == ["cache/pooling.py"] and len(found["cache/pooling.py"]) == 1  # `read_grid`
