"""Benchmark of the tiling stage (issue: foundation).  Not a test: prints figures.

From one run:
  * tiling throughput (MP/s) of ``tile_slide`` on a generated 16384² JPEG slide,
  * the decode limit: tifffile+imagecodecs decoding the same file's level-0 tiles
    on the same number of threads, doing nothing else,
  * their ratio (target ≥ 0.7), and the same ratio with one file per chunk instead of
    one shard file per task's 4×4 chunks (``tile.shards: false``),
  * the same two figures for a 16384² JPEG slide generated from real H&E: 256² tissue
    patches of CMU-1-Small-Region (``../shared/data``, CC0), when that file is present.
    The generated texture is noise-like: Blosc-LZ4 would shrink its chunks 1.06-1.08×
    in ~0.9 ms each (real H&E 1.3-2.4× in ~0.15-0.3 ms), so the tile store keeps such
    chunks uncompressed (``ChunkWriter(skip_incompressible=True)``) and the generated
    slide's figure is about writing, not compressing, them,
  * peak RSS of tiling 8192² and 32768² slides, each in a fresh process, and
    their ratio (target ≤ 1.2).

Usage:  python bench/bench_tile.py [--threads 2] [--workdir bench/out]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import tifffile

from slidejob.pipeline import tile_slide
from slidejob.synthetic import write_slide
from slidejob.wsi import open_slide


def make_slide(workdir: Path, side_px: int, tissue: str = "all") -> Path:
    path = workdir / f"bench-{side_px}-{tissue}.tif"
    if not path.exists():
        boxes = [(0, 0, side_px, side_px)] if tissue == "all" else [(0, 0, side_px, side_px // 2)]
        tmp = path.with_suffix(".tmp.tif")
        write_slide(tmp, side_px, side_px, tissue_boxes=boxes, compression="jpeg", n_levels=4, texture_pool=16)
        tmp.rename(path)
    return path


REAL_SOURCE = Path(__file__).resolve().parents[2] / "shared/data/slides/aperio/CMU-1-Small-Region.svs"


def make_real_texture_slide(workdir: Path, side_px: int, source: Path = REAL_SOURCE) -> Path | None:
    """A ``side_px``² slide tiled with 256² patches of real H&E that are all tissue (every level alike)."""
    path = workdir / f"bench-{side_px}-real.tif"
    if path.exists():
        return path
    if not source.exists():
        return None
    with open_slide(source) as reader:
        image = reader.read_region(0, 0, reader.info.height_px, reader.info.width_px)
    tile = 256
    patches = []
    for y in range(0, image.shape[0] - tile + 1, tile):
        for x in range(0, image.shape[1] - tile + 1, tile):
            p = image[y : y + tile, x : x + tile]
            # Tissue: stained (saturated) pixels, as the tissue detector sees them.
            if ((p.max(axis=2).astype(int) - p.min(axis=2)) > 25).mean() > 0.9:
                patches.append(np.ascontiguousarray(p))
    tmp = path.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp, bigtiff=side_px * side_px * 3 > 2**31) as tw:
        for level in range(4):
            n = side_px >> level
            tiles = (patches[(i * 7 + i // 13) % len(patches)] for i in range((n // tile) ** 2))
            extra = {"subifds": 3} if level == 0 else {"subfiletype": 1}
            tw.write(tiles, shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER", **extra)
    tmp.rename(path)
    return path


def decode_limit_mp_s(path: Path, threads: int) -> float:
    """Decode every level-0 tile, in ``threads`` threads, keeping nothing."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        n_px = page.shape[0] * page.shape[1]
        t0 = time.perf_counter()
        for _ in page.segments(maxworkers=threads):
            pass
        return n_px / 1e6 / (time.perf_counter() - t0)


def tile_mp_s(path: Path, out: Path, threads: int, shards: bool = True) -> tuple[float, dict]:
    # The last round's store goes before the clock starts: deleting 1024 chunk files and their
    # directories (~0.18 s of a ~3.5 s single-thread run) is not tiling.
    shutil.rmtree(out, ignore_errors=True)
    with dask.config.set(scheduler="threads", num_workers=threads):
        t0 = time.perf_counter()
        result = tile_slide(path, out, overwrite=True, shards=shards)
        seconds = time.perf_counter() - t0
    with tifffile.TiffFile(path) as tf:
        n_px = tf.pages[0].shape[0] * tf.pages[0].shape[1]
    return n_px / 1e6 / seconds, result.timings


def peak_rss_child(path: str, out: str, threads: int) -> None:
    with dask.config.set(scheduler="threads", num_workers=threads):
        tile_slide(Path(path), Path(out), overwrite=True)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss_mb(path: Path, out: Path, threads: int) -> float:
    proc = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(path), str(out), "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--rss-child", nargs=2, metavar=("SLIDE", "OUT"))
    args = ap.parse_args()
    if args.rss_child:
        peak_rss_child(*args.rss_child, threads=args.threads)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s16 = make_slide(args.workdir, 16384)
    s8 = make_slide(args.workdir, 8192)
    s32 = make_slide(args.workdir, 32768)
    print(f"slides ready in {time.perf_counter() - t0:.0f} s; threads={args.threads}")

    s16_real = make_real_texture_slide(args.workdir, 16384)
    out = args.workdir / "tile.zarr"
    figures: dict = {"threads": args.threads}
    for label, slide in (("generated", s16), ("real_texture", s16_real)):
        if slide is None:
            continue
        # Interleaved, so that both figures see the same moments of this shared machine.
        decode, tiling, unsharded = [], [], []
        for _ in range(3):
            decode.append(decode_limit_mp_s(slide, args.threads))
            unsharded.append(tile_mp_s(slide, out, args.threads, shards=False)[0])
            tiling.append(tile_mp_s(slide, out, args.threads))
        best_decode = max(decode)
        best_tile, timings = max(tiling, key=lambda t: t[0])
        figures[label] = {
            "decode_limit_mp_s": round(best_decode, 1),
            "tiling_mp_s": round(best_tile, 1),
            "tiling_over_decode": round(best_tile / best_decode, 3),
            "tiling_timings_s": timings,
            "store_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6, 1),
            "store_files": sum(1 for f in out.rglob("*") if f.is_file()),
            # The same store with a file per chunk (tile.shards: false), for comparison.
            "unsharded_tiling_over_decode": round(max(unsharded) / best_decode, 3),
        }
    rss8 = peak_rss_mb(s8, args.workdir / "rss8.zarr", args.threads)
    rss32 = peak_rss_mb(s32, args.workdir / "rss32.zarr", args.threads)
    for p in ("tile.zarr", "rss8.zarr", "rss32.zarr"):
        shutil.rmtree(args.workdir / p, ignore_errors=True)
    figures.update({
        "peak_rss_8192_mb": round(rss8, 1),
        "peak_rss_32768_mb": round(rss32, 1),
        "peak_rss_ratio_32768_over_8192": round(rss32 / rss8, 3),
    })
    print(json.dumps(figures, indent=2))
    ok = figures["generated"]["tiling_over_decode"] >= 0.7 and figures["peak_rss_ratio_32768_over_8192"] <= 1.2
    print("targets (ratio >= 0.7, rss ratio <= 1.2):", "MET" if ok else "NOT MET")


if __name__ == "__main__":
    main()
