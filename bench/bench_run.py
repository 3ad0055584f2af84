"""Benchmark of the main job, `slidejob run` (issue: distributed inference).  Not a test: prints figures.

From one run, same model, same precision and layout, same threads:
  * model-only limit: the U-Net's forward on in-memory 512² batches (MP/s), the better of this
    process's default malloc and, in a fresh process, the CPU workers' (pipeline.worker_environ);
  * halo bound: the same forward on the inputs a CPU forward takes (run.forward-chunks: auto, 2x4
    chunks in bf16, 1136 x 2160 with the 56-px halo; 2x2 in fp32, 1136²), counting the kept pixels
    only, with the workers' malloc: the ceiling
    of inference in forwards of that shape with a halo, as a fraction of the limit;
  * all-tissue 8192² slide: end to end (tissue + tile + infer + stitch + write + pyramid) as a
    fraction of that limit (target ≥ 0.9);
  * half-glass 8192² slide: run time over the run time with background skipping off
    (target ≤ tissue-chunk fraction + 0.05);
This 2-core VM's speed drifts by ±25 % within a minute, so every figure is measured more than
once, interleaved: the limits before and after the runs (the higher one is used: conservative),
the all-tissue run twice (the faster one), the half-glass pair three times (half, then without
skipping), reporting the ratio of the fastest of each and the median of the three pairwise ratios.
  * a batch of eight 2048² slides (all-tissue and half-glass), one slide at a time against two in
    flight (``--slides-in-flight``), interleaved twice: the second lets the next slide's tiling and
    the last one's merge and exports fill the workers' idle time; the workers' RSS after each of
    those four batches (32 slides) shows whether a long batch grows them;
  * peak memory, client plus all workers (RSS sampled every 50 ms), for an 8192² slide and a
    32768² slide holding the same 8192² of tissue, each run from a fresh client process as
    ``slidejob run`` starts one (target ≤ 1.5 GB, ratio ≤ 1.2).
When the embedded cluster has GPU workers, "gpu" adds the GPU's own limit (512² batches in the precision
``auto`` picks there), tiles/s of the all-tissue runs on the GPU workers, their fraction of that limit, and
the GPUs' busy fraction sampled during those runs (NVML or nvidia-smi), the forward of one whole 4×4 block
plus the halo, and with --gpu-sweep the all-tissue runs on clusters of other shapes; the CPU limits are
left out there.

Usage:  python bench/bench_run.py [--side 8192] [--workdir bench/out] [--weights CARD] [--skip-memory]
                                  [--gpu-sweep 1x15x1,4x4x1,8x2x1:heap]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from slidejob import config
from slidejob.geometry import forward_margin, forward_shape, halo_for, resolve_forward_chunks
from slidejob.model import ModelCard, resolve_model_paths
from slidejob.pipeline import dask_client, local_cluster_shape, run_batch, worker_environ
from slidejob.synthetic import write_slide


def make_slide(workdir: Path, side_px: int, tissue: str) -> Path:
    path = workdir / f"run-{side_px}-{tissue}.tif"
    if not path.exists():
        boxes = {
            "all": [(0, 0, side_px, side_px)],
            "half": [(0, 0, side_px, side_px // 2)],
            "8k": [(0, 0, 8192, 8192)],
        }[tissue]
        tmp = path.with_suffix(".tmp.tif")
        write_slide(tmp, side_px, side_px, tissue_boxes=boxes, compression="jpeg", n_levels=4, texture_pool=16)
        tmp.rename(path)
    return path


def default_halo_px(card: Path | None) -> int:
    """The halo a run takes by default with this card: its receptive radius rounded up to 8 (56 px, shipped model)."""
    card_path, _ = resolve_model_paths(card, None)
    return halo_for(ModelCard.load(card_path).receptive_radius_px)


def model_limit_mp_s(card: Path | None, threads: int, seconds: float = 20.0, *,
                     side_px: int | tuple[int, int] = 512, kept_px: int | tuple[int, int] = 512) -> dict:
    """Forward of in-memory ``side_px`` tiles (a side, or (height, width)): `threads` parallel forwards of one torch thread each.

    ``mp_s`` counts ``kept_px`` per forward: with ``side_px`` a forward's chunks plus the halo
    each side and ``kept_px`` those chunks, it is the most a pipeline that infers forwards of
    that shape with their halo can reach.
    """

    from slidejob.model import load_model

    precision, channels_last = cpu_precision()
    model = load_model(card, None, precision=precision, channels_last=channels_last)
    side_hw = (side_px, side_px) if isinstance(side_px, int) else side_px
    kept_hw = (kept_px, kept_px) if isinstance(kept_px, int) else kept_px
    # The halo's outputs are not wanted, as in the pipeline's forwards (UNet.forward's margin).
    margin_px = forward_margin(min(s - k for s, k in zip(side_hw, kept_hw)) // 2)
    tile = np.random.default_rng(0).integers(0, 255, (1, *side_hw, 3), dtype=np.uint8)
    model.predict_proba(tile, margin_px)  # warm-up
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            model.predict_proba(tile, margin_px)
            counts[i] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(worker, range(threads)))
    elapsed = time.perf_counter() - t0
    return {"precision": precision, "channels_last": channels_last, "input_px": list(side_hw),
            "mp_s": sum(counts) * kept_hw[0] * kept_hw[1] / 1e6 / elapsed}


def cpu_precision() -> tuple[str, bool]:
    """``(precision, channels_last)`` as ``auto`` resolves them on this CPU for one task thread, as a worker's task.

    Leaves this process on one torch thread: set first, since best_precision may time forwards.
    """
    import torch

    from slidejob.model import best_precision

    torch.set_num_threads(1)
    return best_precision("cpu")


def model_limit_in_worker_env(card: Path | None, threads: int, **shape: object) -> dict:
    """:func:`model_limit_mp_s` in a fresh process with the CPU workers' malloc settings, as their forwards run.

    The settings are those the embedded cluster gives its CPU workers (``cluster.worker-malloc``).
    """
    env = {**os.environ, **{k: str(v) for k, v in worker_environ(0).items()}}
    args = json.dumps({"card": str(card or ""), "threads": threads, **shape})
    return {**_child_json("--limit-child", args, env=env), "malloc": "workers'"}


def _child_json(*args: str, env: dict[str, str] | None = None) -> dict:
    """The JSON line this script prints last when run with ``args`` in a fresh process."""
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{args[0]} child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def limit_child(args: str) -> None:
    a = json.loads(args)
    shape = {k: tuple(v) if isinstance(v, list) else v for k, v in a.items() if k in ("side_px", "kept_px")}
    print(json.dumps(model_limit_mp_s(Path(a["card"]) if a["card"] else None, a["threads"], **shape)))


def gpu_limit(card: Path | None, *, side_px: int = 512, kept_px: int = 512, batch: int = 8,
              seconds: float = 10.0, cudnn_benchmark: bool = False) -> dict:
    """Forward of in-memory batches of ``side_px``² tiles on the first GPU, in the precision ``auto`` picks there.

    ``tiles_s`` counts ``kept_px``² tiles: with ``side_px = 2048 + 2 × halo`` and ``kept_px = 2048`` each
    input holds 16 chunks (the GPU workers' forward of a whole 4×4 block).
    """
    import torch

    from slidejob.model import best_precision, load_model

    precision, channels_last = best_precision("cuda")
    # cudnn.benchmark (off in slidejob: tissue rectangles give many input shapes, each would be autotuned)
    # measured for the record: whether cuDNN's default choice of kernels costs the forward anything.
    model = load_model(card, None, device="cuda", precision=precision, channels_last=channels_last)
    tiles = np.random.default_rng(0).integers(0, 255, (batch, side_px, side_px, 3), dtype=np.uint8)
    margin_px = forward_margin((side_px - kept_px) // 2)  # the halo's outputs are not wanted, as in the pipeline
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        for _ in range(3):
            model.predict_proba(tiles, margin_px)  # warm-up (cuDNN autotuning, allocator)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.predict_proba(tiles, margin_px)  # returns numpy: synchronised, host copy included
            n += 1
        elapsed = time.perf_counter() - t0
    finally:
        torch.backends.cudnn.benchmark = False
    chunks = batch * (kept_px // 512) ** 2
    return {"precision": precision, "channels_last": channels_last, "input_px": side_px, "batch": batch,
            "tiles_s": n * chunks / elapsed, "mp_s": n * chunks * 512 * 512 / 1e6 / elapsed}


class _Sampler:
    """A thread that samples something while a ``with`` block runs."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # the subclass, for `with X() as x`
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class GpuBusy(_Sampler):
    """Mean GPU utilisation over a block (nvidia-smi's utilization.gpu: the share of time a kernel ran).

    Sampled every 100 ms over all GPUs, through NVML (``torch.cuda.utilization``) or ``nvidia-smi``;
    ``fraction`` is None when neither is available.
    """

    def __init__(self) -> None:
        self.samples: list[float] = []
        super().__init__()

    @staticmethod
    def _sample() -> float | None:
        import subprocess

        import torch

        n_gpus = torch.cuda.device_count()
        if n_gpus == 0:
            return None
        try:
            return float(np.mean([torch.cuda.utilization(i) for i in range(n_gpus)]))
        except Exception:  # noqa: BLE001 - pynvml missing or its own NVMLError: ask nvidia-smi
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5, check=True).stdout
                return float(np.mean([float(v) for v in out.split()]))
            except (OSError, ValueError, subprocess.SubprocessError):
                return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._sample()
            if value is None:
                return
            self.samples.append(value)
            time.sleep(0.1)

    @property
    def fraction(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100, 3) if self.samples else None


class PeakRSS(_Sampler):
    """Peak of (this process + its children) RSS, sampled in a thread."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        super().__init__()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            time.sleep(0.05)


def peak_memory_child(slide: str, out: str, card: str | None) -> None:
    """One slide's run as ``slidejob run`` does it: a fresh client process and its embedded cluster."""
    with PeakRSS() as rss, dask_client() as client:
        client.wait_for_workers(local_cluster_shape()["n_workers"])
        timed_run(Path(slide), Path(out), Path(card) if card else None)
    print(json.dumps({"peak_mb": rss.peak_mb}))


def peak_memory_mb(slide: Path, out: Path, card: Path | None) -> float:
    """Peak RSS of client + workers for one slide, measured in a child process.

    Not in this one: its own limit measurements loaded torch and the model and ran
    forwards, hundreds of MB that a real run's client never holds.
    """
    return float(_child_json("--memory-child", str(slide), str(out), str(card or ""))["peak_mb"])


def timed_run(slide: Path, out: Path, card: Path | None, **kwargs) -> tuple[float, dict]:
    """Seconds of one slide's run, and its manifest."""
    t0 = time.perf_counter()
    result = run_batch([slide], out, weights=card, force=True, **kwargs)
    seconds = time.perf_counter() - t0
    o = result.outcomes[0]
    assert o.status == "ok", o.error
    return seconds, o.manifest


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def timed_batch(slides: list[Path], out: Path, card: Path | None, in_flight: int) -> float:
    t0 = time.perf_counter()
    result = run_batch(slides, out, weights=card, force=True, slides_in_flight=in_flight)
    assert not result.failed, [o.error for o in result.failed]
    return time.perf_counter() - t0


def warm_up(workdir: Path, card: Path | None, *, threads: int = 1) -> None:
    """One small slide first: workers import torch and load the model once per batch, not per slide.

    With GPU workers (several to a GPU), a slide of at least as many 4×4-chunk blocks (one task
    each) as the cluster has task threads, so that every worker starts CUDA and loads its model
    now, not in the first timed run.
    """
    side = 1024 if threads <= 1 else 2048 * math.ceil(math.sqrt(threads))
    slide = make_slide(workdir, side, "all")
    run_batch([slide], workdir / "warm-out", weights=card, force=True)


def gpu_sweep(slide: Path, out: Path, card: Path | None,
              configs: list[tuple[tuple[int, ...], dict[str, str]]]) -> list[dict]:
    """All-tissue runs on GPU workers of other shapes, a fresh cluster each.

    A config is (threads per worker, blocks per task) or (workers per GPU, threads per worker,
    blocks per task), with options: ``malloc`` (``cluster.worker-malloc``, "auto" unless given),
    ``block`` (``run.block-chunks``), ``batch`` (``run.batch-size-gpu``).  Each row carries the
    manifest's ``task_stage_s``.  On an H200 with 16 cores, 4 processes of 3-4 threads ran
    1.3-1.6x the tiles/s of one of 15 (README, GPU figures): hence ``cluster.workers-per-gpu``.
    """
    import dask.config

    rows = []
    for config_, options in configs:
        per_gpu, threads, blocks = config_ if len(config_) == 3 else (1, *config_)
        n_gpus = local_cluster_shape()["gpus"] or 1
        malloc = options.get("malloc", "auto")
        settings = {"slidejob.cluster.threads-per-worker": threads,
                    "slidejob.cluster.n-workers": per_gpu * n_gpus,
                    "slidejob.run.blocks-per-task-gpu": blocks,
                    "slidejob.cluster.worker-malloc": malloc}
        if "block" in options:
            settings["slidejob.run.block-chunks"] = int(options["block"])
        if "batch" in options:
            settings["slidejob.run.batch-size-gpu"] = int(options["batch"])
        with dask.config.set(settings):
            shape = local_cluster_shape()
            with dask_client() as client:
                client.wait_for_workers(shape["n_workers"])
                warm_up(out.parent, card, threads=shape["n_workers"] * shape["threads_per_worker"])
                with GpuBusy() as busy:
                    runs = [timed_run(slide, out, card) for _ in range(2)]
        seconds, manifest = min(runs, key=lambda r: r[0])
        rows.append({"workers_per_gpu": per_gpu, "threads_per_worker": threads, "blocks_per_task": blocks,
                     "options": options, "worker_malloc": malloc,
                     "runs_s": [round(r[0], 2) for r in runs],
                     "tiles_s": round(manifest["tissue"]["n_tissue_chunks"] / seconds, 1),
                     "busy_fraction": busy.fraction, "timings_s": manifest["timings_s"],
                     "inference": {k: v for k, v in manifest["inference"].items() if k != "runtimes"}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=8192)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--weights", type=Path, default=None, help="model card (default: the shipped model)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--gpu-sweep", default="",
                    help="with GPUs: also time the all-tissue slide for these THREADSxBLOCKS (threads per worker, "
                         "blocks per task) or WORKERSxTHREADSxBLOCKS (worker processes per GPU first), each "
                         "optionally with :MALLOC (cluster.worker-malloc) and :block=N (run.block-chunks), :batch=N "
                         "(run.batch-size-gpu), "
                         "e.g. 4x1,15x4,4x3x1,1x15x1:heap,1x15x1:block=2")
    ap.add_argument("--memory-child", nargs=3, metavar=("SLIDE", "OUT", "CARD"), help=argparse.SUPPRESS)
    ap.add_argument("--limit-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        peak_memory_child(*args.memory_child)
        return
    if args.limit_child:
        limit_child(args.limit_child)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = local_cluster_shape()
    threads = shape["n_workers"] * shape["threads_per_worker"]
    figures: dict = {"cluster": {k: shape[k] for k in ("n_workers", "threads_per_worker", "gpus")},
                     "cpu_count": os.cpu_count()}
    # With GPU workers the CPU's forward is no limit of anything: the "gpu" section replaces it.
    cpu_limits = not shape["gpus"]
    # The limit is the better of this process's default malloc and the workers' settings
    # (pipeline.worker_environ, a fresh process); the halo bound is measured with the workers'.
    limits = [{**model_limit_mp_s(args.weights, threads), "malloc": "default"},
              model_limit_in_worker_env(args.weights, threads)] if cpu_limits else []
    # The same forward on the chunks one CPU forward covers (run.forward-chunks: auto is 2x4 in bf16,
    # 2x2 in fp32) plus the default halo (56 px for the shipped model) each side, counting only the
    # kept chunks: the ceiling of a pipeline that infers forwards of that shape with a halo.
    rows, cols = forward_shape(resolve_forward_chunks(config.get("run.forward-chunks"), cpu_precision()[0]))
    halo_px = default_halo_px(args.weights)
    halo_shape = {"side_px": (rows * 512 + 2 * halo_px, cols * 512 + 2 * halo_px), "kept_px": (rows * 512, cols * 512)}
    halo_bounds = [model_limit_in_worker_env(args.weights, threads, **halo_shape)] if cpu_limits else []
    side = args.side
    all_slide = make_slide(args.workdir, side, "all")
    half_slide = make_slide(args.workdir, side, "half")
    out = args.workdir / "run-out"
    with dask_client() as client:
        client.wait_for_workers(shape["n_workers"])
        warm_up(args.workdir, args.weights, threads=threads if shape["gpus"] else 1)
        with GpuBusy() if shape["gpus"] else contextlib.nullcontext() as busy:
            all_runs = [timed_run(all_slide, out, args.weights) for _ in range(2)]
        half_runs = [
            (timed_run(half_slide, out, args.weights), timed_run(half_slide, out, args.weights, all_tissue=True)[0])
            for _ in range(3)
        ]
        half_pairs = [(half[0], noskip) for half, noskip in half_runs]
        # What the tissue detector found on the half-glass slide (the target is this + 0.05).
        tissue = half_runs[0][0][1]["tissue"]
        half_fraction = tissue["n_tissue_chunks"] / tissue["n_chunks"]
        # A batch of small slides, one at a time and two in flight, interleaved twice.
        batch_slides = []
        for i in range(8):
            source = make_slide(args.workdir, 2048, "all" if i % 2 == 0 else "half")
            copy = args.workdir / f"batch-{i}-{source.name}"  # distinct files: a batch dedupes paths
            if not copy.exists():
                shutil.copyfile(source, copy)
            batch_slides.append(copy)
        batch_pairs = []
        worker_rss_mb = []  # after each batch: does a long night's batch grow the workers?
        for _ in range(2):
            pair = []
            for in_flight in (1, 2):
                pair.append(timed_batch(batch_slides, out, args.weights, in_flight))
                worker_rss_mb.append(round(sum(client.run(_rss_mb).values()), 1))
            batch_pairs.append(tuple(pair))
    t_all, manifest_all = min(all_runs, key=lambda r: r[0])
    timings_all = manifest_all["timings_s"]
    mp = side * side / 1e6
    figures["all_tissue"] = {"seconds": round(t_all, 1), "runs_s": [round(r[0], 1) for r in all_runs],
                             "mp_s": round(mp / t_all, 3), "timings_s": timings_all,
                             "inference": {k: v for k, v in manifest_all["inference"].items() if k != "runtimes"}}
    if cpu_limits:
        limits.append(model_limit_in_worker_env(args.weights, threads))
        halo_bounds.append(model_limit_in_worker_env(args.weights, threads, **halo_shape))
        limit = max(limits, key=lambda x: x["mp_s"])
        figures["model_limit"] = {**limit, "mp_s": round(limit["mp_s"], 3),
                                  "measured_mp_s": [[round(x["mp_s"], 3), x["malloc"]] for x in limits]}
        halo_mp_s = max(x["mp_s"] for x in halo_bounds)
        figures["halo_bound"] = {"forward_chunks": f"{rows}x{cols}", "mp_s": round(halo_mp_s, 3),
                                 "fraction_of_limit": round(halo_mp_s / limit["mp_s"], 3),
                                 "measured_mp_s": [round(x["mp_s"], 3) for x in halo_bounds]}
        figures["all_tissue"]["fraction_of_limit"] = round(mp / t_all / limit["mp_s"], 3)
    if shape["gpus"]:
        # GPU workers ran the slide: compare with the GPU's own forward, in its precision, on batches of 512²
        # tiles (the limit) and of whole 4×4 blocks plus the halo (what the GPU workers feed it).
        gpu = gpu_limit(args.weights)
        gpu_blocks = gpu_limit(args.weights, side_px=2048 + 2 * halo_px, kept_px=2048, batch=1)
        gpu_blocks_tuned = gpu_limit(args.weights, side_px=2048 + 2 * halo_px, kept_px=2048, batch=1,
                                     cudnn_benchmark=True)
        chunks = (side // 512) ** 2
        figures["gpu"] = {
            "limit": {k: round(v, 3) if isinstance(v, float) else v for k, v in gpu.items()},
            "block_bound_tiles_s": round(gpu_blocks["tiles_s"], 1),
            "block_bound_tiles_s_cudnn_benchmark": round(gpu_blocks_tuned["tiles_s"], 1),
            "all_tissue_tiles_s": round(chunks / t_all, 1),
            "all_tissue_fraction_of_limit": round(chunks / t_all / gpu["tiles_s"], 3),
            "busy_fraction_during_all_tissue_runs": busy.fraction if busy is not None else None,
        }
        print(json.dumps(figures, indent=2), flush=True)  # so far: the sweep below may run out of time
        if args.gpu_sweep:
            configs = []
            for c in args.gpu_sweep.split(","):
                shape_, *opts = c.split(":")
                # ":heap" is short for ":malloc=heap"
                options = dict(o.split("=", 1) if "=" in o else ("malloc", o) for o in opts if o)
                if set(options) - {"malloc", "block", "batch"}:
                    ap.error(f"--gpu-sweep {c}: options are malloc, block and batch, got {', '.join(options)}")
                configs.append((tuple(int(v) for v in shape_.split("x")), options))
            figures["gpu"]["sweep"] = gpu_sweep(all_slide, out, args.weights, configs)
    t_half = min(h for h, _ in half_pairs)
    t_half_noskip = min(n for _, n in half_pairs)
    figures["half_glass"] = {"seconds": round(t_half, 1), "seconds_without_skipping": round(t_half_noskip, 1),
                             "pairs_s": [[round(h, 1), round(n, 1)] for h, n in half_pairs],
                             "ratio": round(t_half / t_half_noskip, 3),
                             "median_pair_ratio": round(float(np.median([h / n for h, n in half_pairs])), 3),
                             "tissue_chunk_fraction": round(half_fraction, 4),
                             "target_ratio_max": round(half_fraction + 0.05, 4)}
    figures["batch_8_slides_2048"] = {
        "seconds_one_at_a_time": round(min(a for a, _ in batch_pairs), 1),
        "seconds_two_in_flight": round(min(b for _, b in batch_pairs), 1),
        "pairs_s": [[round(a, 1), round(b, 1)] for a, b in batch_pairs],
        "ratio": round(min(b for _, b in batch_pairs) / min(a for a, _ in batch_pairs), 3),
        "worker_rss_mb_after_each_batch": worker_rss_mb,
    }
    if not args.skip_memory:
        big = make_slide(args.workdir, 4 * 8192, "8k") if side == 8192 else None
        small = make_slide(args.workdir, 8192, "all")
        peaks = {}
        for name, slide in (("8192", small), ("32768", big)):
            if slide is None:
                continue
            peaks[name] = round(peak_memory_mb(slide, out, args.weights), 1)
        figures["peak_memory_mb"] = peaks
        if len(peaks) == 2:
            figures["peak_memory_ratio_32768_over_8192"] = round(peaks["32768"] / peaks["8192"], 3)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
