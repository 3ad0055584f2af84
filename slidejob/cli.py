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
from slidejob.errors import EXIT_ERROR, EXIT_STORAGE_FULL, STORAGE_FULL_ERRNOS, SlidejobError

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
        except OSError as exc:
            # The file system refusing an output (full, read-only, no permission) is no bug of ours:
            # one line, and for a full one the status a scheduler can act on.  Other OS errors
            # (no file named) keep their traceback.
            if exc.errno in STORAGE_FULL_ERRNOS:
                where = f"{exc.filename}: " if exc.filename else ""
                click.echo(f"slidejob: error: {where}the file system is full ({exc.strerror}); nothing half-written "
                           "is left in place — free space and run again", err=True)
                sys.exit(EXIT_STORAGE_FULL)
            if exc.filename is None:
                raise
            click.echo(f"slidejob: error: {exc.filename}: {exc.strerror or exc}", err=True)
            sys.exit(EXIT_ERROR)

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
    # distributed logs every worker start and stop at INFO; keep cluster chatter out of batch logs.
    # It configures its loggers from dask.config when imported (here and in worker processes).
    import dask.config

    quiet = logging.getLevelName(max(logging.WARNING, getattr(logging, log_level.upper()))).lower()
    dask.config.set({"logging.distributed": quiet})
    logging.getLogger("distributed").setLevel(quiet.upper())


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
        source = r["mpp_source"]
        if r["mpp_um"]:
            mpp = f"{r['mpp_um']:.4f} µm/px ({source})"
        else:  # the source already says "unknown (why)" where there is a why
            mpp = source if source.startswith("unknown") else f"unknown ({source})"
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
@click.option("--shards/--no-shards", default=None,
              help="One file per task's block of chunks (a zarr v3 shard; the default, from the config) "
                   "or one file per chunk.")
@one_line_errors
def tile(
    slide: Path,
    out: Path,
    mpp_um: float | None,
    min_tissue_fraction: float | None,
    all_tissue: bool,
    overwrite: bool,
    block_chunks: int | None,
    shards: bool | None,
) -> None:
    """Tile a slide's level 0 into a Zarr v3 store of 512×512 chunks (tissue chunks only).

    Background chunks are left absent (they read as white). Each parallel task's
    block of chunks is one file (a zarr v3 shard; --no-shards: a file per chunk).
    The store is built under a temporary name and renamed into place when complete.
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
        shards=shards,
    )
    click.echo(
        f"{out}: {result.n_tissue_chunks} of {result.n_chunks} chunks written in {result.seconds:.1f} s "
        f"({result.megapixels_per_s:.0f} MP/s)"
    )


def _forward_chunks(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--forward-chunks``: auto, N or ROWSxCOLS, 1 to 16 a side, as ``"RxC"``."""
    if value is None:
        return None
    from slidejob.geometry import forward_label, forward_shape

    try:
        label = forward_label(value)
        if label == "auto":  # resolved on each worker, by the precision its model runs in
            return label
        rows, cols = forward_shape(label)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if rows > 16 or cols > 16:
        raise click.BadParameter(f"at most 16 chunks a side, got {value!r}")
    return forward_label((rows, cols))


@cli.command(
    epilog="""\b
Examples:
  slidejob run scans/ --out results/                  # every slide under scans/, embedded LocalCluster
  slidejob run a.svs b.ndpi --out results/ --save-probabilities
  slidejob run scans/ --out results/ --scheduler tcp://head:8786   # an existing Dask cluster
  slidejob run scans/ --out results/ --weights my-model.json --threshold 0.4
\b
Per slide, results/<slide-id>/ holds mask.ome.zarr (OME-Zarr label image) and
manifest.json. Slides done before with the same inputs are skipped (--force redoes them).
Exit status: 0 when every slide succeeded, 1 when any failed (the others still ran),
3 when the inputs hold no slide file at all, 5 when the cluster of --scheduler /
--scheduler-file cannot be reached, 6 when the output's file system is full (the
batch stops; rerun after freeing space).
"""
)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output directory (one folder per slide).")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Model card (.json) or weights (.safetensors); default: the shipped model.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Probability threshold for cancer (default: the model card's).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto = the fastest safe one for each worker's hardware.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--halo-px", type=click.IntRange(0, 512), default=None,
              help="Context around each inferred block, a multiple of 8 (default: the model's receptive radius).")
@click.option("--infer-block-chunks", "block_chunks", type=click.IntRange(1, 16), default=None,
              help="Chunks per side of one inference task's block (default 4).")
@click.option("--forward-chunks", callback=_forward_chunks, default=None, metavar="auto|N|RxC",
              help="The most chunks one forward covers: N (N x N) or ROWSxCOLS (default auto: on CPU 2x4 where "
                   "the model runs in bf16, 2x2 in fp32; 4x4 on GPU).")
@click.option("--infer-batch-size", "batch_size", type=click.IntRange(1, 256), default=None,
              help="Inputs per forward (default 1 on CPU, 8 on GPU).")
@click.option("--min-lesion-area", "min_lesion_area_um2", type=click.FloatRange(min=0), default=None,
              help="Remove lesions smaller than this many µm² (default 200; 0 keeps all).")
@click.option("--save-probabilities", is_flag=True, help="Also write probability.ome.zarr (uint8).")
@click.option("--keep-tiles", is_flag=True, help="Keep each slide's tiles.zarr.")
@click.option("--force", is_flag=True, help="Redo slides already done with the same inputs.")
@click.option("--slides-in-flight", type=click.IntRange(1, 64), default=None,
              help="Slides processed at once, overlapping on the cluster (default 2).")
@MPP_OPTION
@MIN_TISSUE_OPTION
@ALL_TISSUE_OPTION
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler (tcp://host:8786).")
@click.option("--scheduler-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Scheduler file of an existing Dask cluster.")
@click.option("--cluster-workers", "n_workers", type=click.IntRange(1, 256), default=None,
              help="Embedded LocalCluster: worker processes (default: up to 4 per GPU, one per 4 of its cores, "
                   "sharing it; else one per 8 cores).")
@click.option("--cluster-threads", "threads_per_worker", type=click.IntRange(1, 256), default=None,
              help="Embedded LocalCluster: threads per worker.")
@one_line_errors
def run(
    inputs: tuple[Path, ...],
    out_dir: Path,
    weights: Path | None,
    threshold: float | None,
    precision: str,
    device: str,
    halo_px: int | None,
    block_chunks: int | None,
    forward_chunks: str | None,
    batch_size: int | None,
    min_lesion_area_um2: float | None,
    save_probabilities: bool,
    keep_tiles: bool,
    force: bool,
    slides_in_flight: int | None,
    mpp_um: float | None,
    min_tissue_fraction: float | None,
    all_tissue: bool,
    scheduler: str | None,
    scheduler_file: Path | None,
    n_workers: int | None,
    threads_per_worker: int | None,
) -> None:
    """Find cancer in slides: tile, infer on Dask workers, write stitched masks."""
    from slidejob.pipeline import dask_client, prepare_output_dir, run_batch
    from slidejob.wsi import find_slides

    if scheduler and scheduler_file:
        raise click.UsageError("give --scheduler or --scheduler-file, not both")
    if (scheduler or scheduler_file) and (n_workers or threads_per_worker):
        raise click.UsageError("--cluster-workers/--cluster-threads shape the embedded cluster; not with --scheduler")
    if halo_px is not None and halo_px % 8:
        raise click.UsageError(f"--halo-px must be a multiple of 8, got {halo_px}")
    # Inputs that hold no slide at all (a mistyped or empty directory) and an output whose summary
    # database cannot be used fail now, before a cluster starts (nothing is written yet).
    slides = find_slides(list(inputs))
    prepare_output_dir(out_dir, create=False)
    with dask_client(scheduler=scheduler, scheduler_file=scheduler_file, n_workers=n_workers,
                     threads_per_worker=threads_per_worker) as client:
        click.echo(f"dashboard: {client.dashboard_link}", err=True)
        result = run_batch(
            slides, out_dir, weights=weights, threshold=threshold, precision=precision, device=device,
            halo_px=halo_px, block_chunks=block_chunks, forward_chunks=forward_chunks, batch_size=batch_size,
            save_probabilities=save_probabilities, mpp_um=mpp_um, min_tissue_fraction=min_tissue_fraction,
            all_tissue=all_tissue, min_lesion_area_um2=min_lesion_area_um2, keep_tiles=keep_tiles, force=force,
            slides_in_flight=slides_in_flight,
        )
    for o in result.outcomes:
        click.echo(f"{o.status:8s} {o.slide_id}  {o.source}" + (f"  ({o.error})" if o.error else ""))
    n_ok = sum(o.status != "failed" for o in result.outcomes)
    click.echo(f"{n_ok} of {len(result.outcomes)} slide(s) done; results in {out_dir}")
    if result.failed:
        sys.exit(1)


@cli.command(
    epilog="""\b
Example:
  slidejob demo --out demo-out     # then open demo-out/results/report.html
"""
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("demo-out"),
              show_default=True, help="Where to write the demo slide and the results.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Model card or weights (default: the shipped model).")
@click.option("--cluster-workers", "n_workers", type=click.IntRange(1, 64), default=None)
@one_line_errors
def demo(out_dir: Path, weights: Path | None, n_workers: int | None) -> None:
    """Run the whole job on a demo slide made of real annotated H&E tiles.

    The slide mosaics EBHI-Seg tiles (CC BY 4.0, shipped with slidejob) from
    groups the shipped model never trained on: one adenocarcinoma fragment, one
    normal-mucosa fragment. The job runs on the embedded LocalCluster, then the
    mask is scored against the tiles' own annotations.
    """
    from slidejob.demo import run_demo
    from slidejob.summarydb import db_path_for, format_result, summary

    result = run_demo(out_dir, weights=weights, n_workers=n_workers)
    outcome = result.outcome
    click.echo(f"{outcome.status}: {outcome.slide_id} ({outcome.seconds:.1f} s)" +
               (f" — {outcome.error}" if outcome.error else ""))
    if outcome.status == "failed":
        sys.exit(1)
    click.echo(format_result(summary(db_path_for(result.results)), "table"))
    click.echo(f"Dice of the cancer mask against the tiles' annotations: {result.dice:.3f}")
    click.echo(f"outputs: {outcome.out_dir}  report: {result.results / 'report.html'}")

from slidejob.cli_training import evaluate, train

cli.add_command(train)
cli.add_command(evaluate)

from slidejob.cli_summary import query, report, summary

cli.add_command(summary)
cli.add_command(query)
cli.add_command(report)
