"""Command-line interface (thin: parse, validate, call one library function)."""

from __future__ import annotations

import logging

import click

from slidejob import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slidejob")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="How much to log to stderr.",
)
def cli(log_level: str) -> None:
    """slidejob: find cancer in whole-slide images, in batch, on Dask."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
