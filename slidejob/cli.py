"""Command-line interface (thin: parse, validate, call one library function)."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from slidejob import __version__
from slidejob.errors import SlidejobError

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("slidejob")


def one_line_errors(fn: F) -> F:
    """Turn slidejob's deliberate errors into one line on stderr and their exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SlidejobError as exc:
            click.echo(f"slidejob: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="slidejob")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="How much to log to stderr.",
)
def cli(log_level: str) -> None:
    """slidejob: find cancer in whole-slide images, in batch, on Dask.

    \b
    Stages (each is a command):
      info     what a slide file holds (size, pyramid, µm/px and where it came from)
      tissue   tissue detection, with a PNG to check it by eye
      tile     level 0 into a 512×512-chunked Zarr store (tissue chunks only)
      train    train the U-Net;  evaluate  score weights on labelled tiles

    Run `slidejob COMMAND --help` for each command's options and examples.
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # distributed logs every worker start at INFO; keep cluster chatter out of batch logs.
    logging.getLogger("distributed").setLevel(max(logging.WARNING, getattr(logging, log_level.upper())))


MPP_OPTION = click.option(
    "--mpp",
    "mpp_um",
    type=click.FloatRange(min=0.01, max=100.0),
    default=None,
    help="Microns per pixel at level 0, overriding the file's metadata (use when it is missing or wrong).",
)
MIN_TISSUE_OPTION = click.option(
    "--tissue-min-fraction",
    "min_tissue_fraction",
    type=click.FloatRange(min=0.0, max=1.0),
    default=None,
    help="A 512×512 chunk is tissue when at least this fraction of it is (default 0.01, from the config).",
)
ALL_TISSUE_OPTION = click.option(
    "--tissue-all", "all_tissue", is_flag=True, help="Treat every chunk as tissue (no background skipping)."
)
SLIDE_ARG = click.argument("slide", type=click.Path(path_type=Path, dir_okay=False))


@cli.command(
    epilog="""\b
Examples:
  slidejob info slide.svs
  slidejob info --format json scans/*.ndpi
"""
)
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@MPP_OPTION
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@one_line_errors
def info(slides: tuple[Path, ...], mpp_um: float | None, fmt: str) -> None:
    """Show what slide files hold: size, pyramid levels, vendor, µm/px and its source."""
    from slidejob.wsi import find_slides, open_slide

    records = []
    for path in find_slides(list(slides)):
        with open_slide(path, mpp_um=mpp_um) as reader:
            records.append(reader.info.to_dict())
    if fmt == "json":
        click.echo(json.dumps(records, indent=2))
        return
    for r in records:
        mpp = f"{r['mpp_um']:.4f} µm/px ({r['mpp_source']})" if r["mpp_um"] else f"unknown ({r['mpp_source']})"
        levels = ", ".join(f"{lv['width_px']}×{lv['height_px']} (/{lv['downsample']:.3g})" for lv in r["levels"])
        click.echo(f"{r['path']}")
        click.echo(f"  vendor      {r['vendor']}{'  [fluorescence]' if r['fluorescence'] else ''}")
        click.echo(f"  size        {r['width_px']}×{r['height_px']} px")
        click.echo(f"  levels      {levels}")
        click.echo(f"  resolution  {mpp}")
        click.echo(f"  objective   {r['objective_power'] or 'unknown'}")
        click.echo(f"  fingerprint {r['fingerprint']}")


@cli.command(
    epilog="""\b
Examples:
  slidejob tissue slide.svs --png slide-tissue.png
  slidejob tissue slide.svs --png check.png --tissue-min-fraction 0.05
"""
)
@SLIDE_ARG
@click.option("--png", "png_path", type=click.Path(path_type=Path, dir_okay=False), help="Write the overlay here.")
@MPP_OPTION
@MIN_TISSUE_OPTION
@one_line_errors
def tissue(slide: Path, png_path: Path | None, mpp_um: float | None, min_tissue_fraction: float | None) -> None:
    """Detect tissue and report the 512×512 chunk grid; --png draws it on a thumbnail.

    The PNG tints detected tissue green and outlines each chunk that will be
    tiled and inferred in blue.
    """
    from slidejob.pipeline import compute_thumbnail, detect_slide_tissue
    from slidejob.render import save_png, tissue_overlay

    tr = detect_slide_tissue(slide, mpp_um=mpp_um, min_tissue_fraction=min_tissue_fraction)
    click.echo(
        f"{slide}: {tr.n_tissue_chunks} of {tr.grid.size} chunks hold tissue "
        f"(tissue covers {tr.tissue_mask.mean():.1%} of the slide)"
    )
    if png_path is not None:
        side = max(tr.info.height_px, tr.info.width_px)
        picture, ds, _ = compute_thumbnail(slide, mpp_um=mpp_um, downsample=max(1.0, side / 1024), max_side_px=1024)
        save_png(tissue_overlay(picture, tr.tissue_mask, tr.grid, ds), png_path)
        click.echo(f"wrote {png_path}")


@cli.command(
    epilog="""\b
Examples:
  slidejob tile slide.svs --out slide.zarr
  slidejob tile scan.tif --out scan.zarr --mpp 0.25 --overwrite
"""
)
@SLIDE_ARG
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Zarr store to write.")
@MPP_OPTION
@MIN_TISSUE_OPTION
@ALL_TISSUE_OPTION
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--tile-block-chunks", "block_chunks", type=click.IntRange(1, 64), default=None,
              help="Chunks per side of one parallel task's block (default 4, from the config).")
@one_line_errors
def tile(
    slide: Path,
    out: Path,
    mpp_um: float | None,
    min_tissue_fraction: float | None,
    all_tissue: bool,
    overwrite: bool,
    block_chunks: int | None,
) -> None:
    """Tile a slide's level 0 into a Zarr v3 store of 512×512 chunks (tissue chunks only).

    Background chunks are left absent (they read as white). The store is built
    under a temporary name and renamed into place when complete.
    """
    from slidejob.pipeline import tile_slide

    result = tile_slide(
        slide,
        out,
        mpp_um=mpp_um,
        min_tissue_fraction=min_tissue_fraction,
        all_tissue=all_tissue,
        overwrite=overwrite,
        block_chunks=block_chunks,
    )
    click.echo(
        f"{out}: {result.n_tissue_chunks} of {result.n_chunks} chunks written in {result.seconds:.1f} s "
        f"({result.megapixels_per_s:.0f} MP/s)"
    )


from slidejob.cli_training import evaluate, train  # noqa: E402

cli.add_command(train)
cli.add_command(evaluate)

from slidejob.cli_summary import query, report, summary  # noqa: E402

cli.add_command(summary)
cli.add_command(query)
cli.add_command(report)
