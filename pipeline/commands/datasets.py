"""`pipeline datasets`: the data-set kinds `--data` reads."""

from __future__ import annotations

import click


@click.command()
def datasets() -> None:
    """Print the data-set kinds --data reads: the layout each expects, its splits and classes."""
    from stages.data.registry import format_kinds

    click.echo(format_kinds())
