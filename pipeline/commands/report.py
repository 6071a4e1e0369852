"""`pipeline report`: tables, heatmaps and a summary from finished probe results."""

from __future__ import annotations

import click

from pipeline import options


@click.command()
@click.option(
    "--results",
    "results",
    type=options.NAMED_PATH,
    multiple=True,
    required=True,
    help="A result directory (runs side by side, or one run); NAME=PATH names it; repeat to compare.",
)
@click.option("--out", default="report", type=click.Path(file_okay=False), help="Where the report goes.")
@click.option(
    "--transfer",
    is_flag=True,
    help="The transfer table instead: each NAME=PATH is a data set whose PATH holds <model>/<head>/ "
    "results; writes transfer.md, .csv, .json and a bar chart.",
)
def report(results, out, transfer) -> None:
    """Tables, heatmaps and a summary from finished probe results (nothing is retrained)."""
    names = [name for name, _ in results]
    if len(set(names)) != len(names):
        raise click.UsageError(f"result sets need distinct names, got {names}; use NAME=PATH")
    if transfer:
        from stages.transfer import build_transfer

        table = build_transfer(dict(results), out)
        for dataset, cells in table.items():
            shown = ", ".join(f"{column} {100 * v:.1f}%" for column, v in cells.items() if v is not None)
            click.echo(f"{dataset}: {shown}")
        click.echo(f"wrote {out}/transfer.md")
        return
    from stages.report import build_report, headline

    metrics = build_report(dict(results), out)
    for line in headline(metrics, names):
        click.echo(line)
    click.echo(f"wrote {out}/summary.md; the picture: {out}/comparison.png")
