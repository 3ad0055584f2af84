"""``slidejob summary``, ``slidejob query`` and ``slidejob report``: read an output directory's results.

Thin: each command parses, then calls one function of :mod:`slidejob.summarydb`
or :mod:`slidejob.export`.  All three only read the summary database (a
read-only connection); ``report`` writes ``DIR/report.html`` and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import click

from slidejob.errors import SlidejobError

__all__ = ["query", "report", "summary"]

FORMATS = ("table", "csv", "json")
DIR_ARG = click.argument(
    "out_dir", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="table for people; csv and json for programs.",
)


def _fail(exc: SlidejobError) -> NoReturn:
    # Same shape as slidejob.cli's one-line errors: one line on stderr, the error's exit status.
    click.echo(f"slidejob: error: {exc}", err=True)
    raise SystemExit(getattr(exc, "exit_code", 1))


@click.command(
    "summary",
    epilog="""\b
Examples:
  slidejob summary results/
  slidejob summary results/ --where "size_category = 'macrometastasis'" --sort -cancer_mm2
  slidejob summary results/ --sort -fraction --limit 10 --format csv > top10.csv
  slidejob summary results/ --slide S-0042
""",
)
@DIR_ARG
@click.option(
    "--where",
    help="SQL condition on the slides table's columns, e.g. \"status = 'ok' AND lesion_count > 0\".",
)
@click.option("--sort", help="Column to sort by; prefix '-' (or suffix ' desc') for descending. NULLs last.")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many slides.")
@FORMAT_OPTION
@click.option("--slide", "slide_id", metavar="ID", help="One slide's full record and its lesion list.")
def summary(
    out_dir: Path, where: str | None, sort: str | None, limit: int | None, fmt: str, slide_id: str | None
) -> None:
    """Per-slide results of DIR: status, tissue and cancer mm², fraction, lesions, size category.

    Lesions are 8-connected regions of the level-0 cancer mask; the category
    comes from the largest lesion diameter (itc < 0.2 mm, micrometastasis
    0.2–2 mm, macrometastasis > 2 mm; empty when µm/px is unknown).
    """
    from slidejob import summarydb

    if slide_id is not None and (where or sort or limit):
        raise click.UsageError("--slide shows one slide; it does not combine with --where, --sort or --limit")
    db = summarydb.db_path_for(out_dir)
    try:
        if slide_id is None:
            click.echo(
                summarydb.format_result(summarydb.summary(db, where=where, sort=sort, limit=limit), fmt)
            )
            return
        record, lesions = summarydb.slide_detail(db, slide_id)
    except SlidejobError as exc:
        _fail(exc)
    if fmt == "json":
        click.echo(json.dumps({"slide": record, "lesions": lesions.records()}, indent=2, ensure_ascii=False))
    elif fmt == "csv":
        click.echo(summarydb.format_result(lesions, "csv"), nl=False)
    else:
        width = max(map(len, record))
        for key, value in record.items():
            click.echo(f"{key.ljust(width)}  {summarydb.format_value(value)}")
        click.echo(f"\nlesions ({len(lesions.rows)}, largest first)")
        if lesions.rows:
            click.echo(summarydb.format_result(lesions, "table"))


@click.command(
    "query",
    epilog="""\b
Examples:
  slidejob query results/ "SELECT slide_id, cancer_area_mm2 FROM slides WHERE status = 'ok'"
  slidejob query results/ "SELECT * FROM lesions ORDER BY diameter_mm DESC LIMIT 5" --format csv
  slidejob query results/ "PRAGMA table_info(slides)"
""",
)
@DIR_ARG
@click.argument("sql")
@FORMAT_OPTION
def query(out_dir: Path, sql: str, fmt: str) -> None:
    """Run one read-only SQL statement on DIR's summary database (tables slides and lesions).

    The connection is read-only: INSERT, UPDATE, DELETE, CREATE, DROP, ATTACH
    and writing PRAGMAs are refused with an error.
    """
    from slidejob import summarydb

    try:
        result = summarydb.query(summarydb.db_path_for(out_dir), sql)
    except SlidejobError as exc:
        _fail(exc)
    click.echo(summarydb.format_result(result, fmt), nl=fmt != "csv")


@click.command(
    "report",
    epilog="""\b
Examples:
  slidejob report results/        # then open results/report.html
""",
)
@DIR_ARG
def report(out_dir: Path) -> None:
    """(Re)write DIR/report.html: one self-contained page with the sortable summary and thumbnails."""
    from slidejob.export import write_report

    try:
        path = write_report(out_dir)
    except SlidejobError as exc:
        _fail(exc)
    click.echo(f"wrote {path}")
