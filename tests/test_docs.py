"""The documentation site (mkdocs.yml, docs/) and the README that points into it.

The site is built with `mkdocs build --strict` offline, as a user would build it, so a broken link, a
missing page or a page left out of the nav fails here. The CLI reference is generated from the click
commands (mkdocs-click), so every command must appear in it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: mkdocs-click and mkdocstrings read this checkout's code, not an installed copy
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(site.parent)}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    done = mkdocs_build(REPO / "mkdocs.yml", out)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


@pytest.mark.slow
def test_site_builds_strict_and_offline(site):
    assert (site / "index.html").is_file()
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    # nothing that fetches at build or page-load time: Material's social and privacy plugins, Google Fonts
    plugins = {next(iter(p)) if isinstance(p, dict) else p for p in config["plugins"]}
    assert not plugins & {"social", "privacy", "material/social", "material/privacy"}, plugins
    assert config["theme"]["font"] is False


@pytest.mark.slow
def test_every_command_is_in_the_cli_reference(site):
    html = (site / "reference" / "cli" / "index.html").read_text()
    headings = set(re.findall(r'<h3 id="pipeline-([a-z-]+)"', html))
    assert headings == set(COMMANDS), f"missing: {set(COMMANDS) - headings}, unknown: {headings - set(COMMANDS)}"
    # the options come from the commands themselves: a few that only the generated text can hold
    assert "--preset" in html and "--recipe" in html and "--storage-option" in html


@pytest.mark.slow
def test_api_page_documents_the_store(site):
    html = (site / "reference" / "api" / "index.html").read_text()
    for name in (
        "cache.FeatureStore",
        "cache.FeatureStore.read",
        "cache.FeatureStore.read_dask",
        "cache.FeatureStore.labels",
        "stages.extract.noise",
        "cache.errors.UserError",
    ):
        assert f'id="{name}"' in html, name


@pytest.mark.slow
@pytest.mark.parametrize(
    "page, problem",
    [
        ("See [the missing page](missing.md).", "missing.md"),  # a link to a page that does not exist
        ("See [a heading](other.md#no-such-heading).", "no-such-heading"),  # an anchor that does not exist
        (None, "orphan.md"),  # a page that no nav entry reaches
    ],
)
def test_strict_build_fails_on_a_broken_link_or_an_unreachable_page(tmp_path, page, problem):
    """The project's own validation settings, on a two-page site: each defect alone fails the build."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n" + (page or "Nothing wrong here.") + "\n")
    (docs / "other.md").write_text("# Other\n\n## A heading\n")
    nav = [{"Home": "index.md"}, {"Other": "other.md"}]
    if page is None:
        (docs / "orphan.md").write_text("# Orphan\n")
    small = {key: config[key] for key in ("site_name", "theme", "validation", "markdown_extensions")}
    small.update(docs_dir="docs", nav=nav, strict=True, plugins=["search"])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(small))
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0 and problem in done.stdout + done.stderr, done.stdout + done.stderr
    # and the same site without the defect builds
    (docs / "index.md").write_text("# Home\n\nSee [a heading](other.md#a-heading).\n")
    (docs / "orphan.md").unlink(missing_ok=True)
    assert mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site").returncode == 0


def test_readme_fits_on_a_screen_and_keeps_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]  # CI and newcomers run these two
    assert "make repro" in setup and "make test" in setup


def test_readme_links_point_at_files_that_exist():
    text = (REPO / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets, "the README points into the documentation"
    missing = [t for t in targets if t and not (REPO / t).exists()]
    assert not missing, missing


def test_every_docs_page_is_in_the_nav():
    """Said without building the site (fast tier): a page under docs/ that no nav entry names is unreachable."""

    def entries(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from entries(value) if isinstance(value, list) else [value]

    nav = set(entries(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))
    pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert pages - nav == set(), f"add to mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"in the nav, not in docs/: {sorted(nav - pages)}"


def test_getting_started_lists_every_extra():
    """The extras table of docs/getting-started.md names every extra pyproject.toml defines, and no other."""
    import tomllib

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    page = (REPO / "docs" / "getting-started.md").read_text()
    table = page.split("### What is installed", 1)[1].split("\n#", 1)[0]
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, re.M))
    assert listed == extras, f"only in pyproject.toml: {extras - listed}; only on the page: {listed - extras}"


def documented_invocations():
    """(file, command, options) of every `pipeline COMMAND ...` line in a shell block of the README or docs/."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", path.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():  # continuation lines joined
                found = re.search(r"(?:^|\s)(?:pipeline|-m pipeline)\s+([a-z-]+)(.*)", line.split(" #")[0])
                if found:
                    options = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", found.group(2))
                    yield path.relative_to(REPO), found.group(1), options


def test_documented_commands_and_options_exist():
    """Examples in the prose cannot drift from the command line either: each names a command and its options."""
    import click

    from pipeline.cli import main

    context = click.Context(main)
    invocations = list(documented_invocations())
    assert len(invocations) > 50  # the README's tour and the how-to pages
    wrong = []
    for path, name, options in invocations:
        if name not in COMMANDS:
            wrong.append(f"{path}: no command {name!r}")
            continue
        command = main.get_command(context, name)
        known = {o for param in command.params for o in param.opts + param.secondary_opts}
        wrong += [f"{path}: pipeline {name} has no {option}" for option in options if option not in known]
    assert not wrong, "\n".join(wrong)
