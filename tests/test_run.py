"""The main job, `slidejob run`: distributed inference over the chunk store, seamless stitched masks."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from scipy import ndimage

from slidejob import chunkstore, export, infer, maskstore, stats, summarydb
from slidejob.model import load_model
from slidejob.pipeline import cuda_device_count, run_batch, slide_id_for
from slidejob.synthetic import write_slide
from slidejob.wsi import open_slide


def _mask(outcome) -> np.ndarray:
    return zarr.open_group(outcome.out_dir / "mask.ome.zarr", mode="r")["0"][...]


def _one_pass(card: Path, slide_path: Path, halo_px: int, precision: str = "fp32") -> np.ndarray:
    model = load_model(card, precision=precision, channels_last=precision != "fp32")
    with open_slide(slide_path) as reader:
        image = reader.read_region(0, 0, reader.info.height_px, reader.info.width_px)
    return infer.predict_one_pass(model, image, halo_px)


def _without_small(mask: np.ndarray, min_area_px: int) -> np.ndarray:
    """Plain scipy reference: drop 8-connected components below ``min_area_px`` from a whole mask."""
    labels, _ = ndimage.label(mask != 0, structure=np.ones((3, 3), bool))
    small = np.bincount(labels.ravel()) < min_area_px
    small[0] = False
    return np.where(small[labels], 0, mask).astype(np.uint8)


def _reference(card: Path, slide_path: Path, outcome) -> np.ndarray:
    """The one-pass mask with the run's own halo and minimum lesion area."""
    one_pass = _one_pass(card, slide_path, outcome.manifest["parameters"]["halo_px"]) >= 0.5
    return _without_small(one_pass.astype(np.uint8), outcome.manifest["small_lesions"]["min_area_px"])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture()
def all_tissue_slide(tmp_path: Path):
    # Cancer crossing chunk borders, one lesion over the corner where four chunks meet.
    return write_slide(
        tmp_path / "slide.tif", 1300, 1400, tissue_boxes=[(0, 0, 1300, 1400)],
        cancer_boxes=[(400, 430, 640, 600), (150, 900, 400, 1300), (1000, 100, 1250, 700)], compression="zlib",
    )


def test_stitched_mask_equals_one_pass(tiny_model: Path, all_tissue_slide, tmp_path: Path) -> None:
    # Blocks of one chunk put a block border every 512 px: the strictest seam test.
    result = run_batch([all_tissue_slide.path], tmp_path / "out", weights=tiny_model, precision="fp32",
                       block_chunks=1)
    outcome = result.outcomes[0]
    assert outcome.status == "ok", outcome.error
    halo = outcome.manifest["parameters"]["halo_px"]
    assert halo >= 51 and halo % 8 == 0
    stitched = _mask(outcome)
    reference = _reference(tiny_model, all_tissue_slide.path, outcome)
    assert stitched.shape == reference.shape
    assert (stitched != reference).mean() <= 0.001
    assert _dice(stitched, all_tissue_slide.cancer_mask()) > 0.9


@pytest.mark.parametrize(("block_chunks", "forward_chunks", "recorded"),
                         [(4, 1, "1x1"), (2, 2, "2x2"), (3, 2, "2x2"), (3, "1x2", "1x2"), (4, "3x1", "3x1"),
                          (4, "2x4", "2x4")])
def test_blocks_and_forward_pieces_do_not_change_the_mask(
    tiny_model: Path, all_tissue_slide, tmp_path: Path, block_chunks: int, forward_chunks: int | str, recorded: str
) -> None:
    # A block is read once and cut into forwards; ragged pieces (3 chunks in forwards of 2) and
    # pieces that are not square (1x2, the CPU default until 2x2) included.
    outcome = run_batch([all_tissue_slide.path], tmp_path / "out", weights=tiny_model, precision="fp32",
                        block_chunks=block_chunks, forward_chunks=forward_chunks).outcomes[0]
    assert outcome.status == "ok", outcome.error
    assert outcome.manifest["parameters"]["forward_chunks"] == recorded
    reference = _reference(tiny_model, all_tissue_slide.path, outcome)
    assert (_mask(outcome) != reference).mean() <= 0.001


def test_statistics_and_outlines_made_in_the_tasks_equal_a_pass_over_the_mask(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Many small lesions inside blocks and some across block borders: the fused path
    # (partials and outlines from the inference tasks) must equal reading the store afresh.
    slide = write_slide(tmp_path / "s.tif", 1536, 2048, tissue_boxes=[(0, 0, 1536, 2048)],
                        cancer_boxes=[(100, 100, 300, 250), (480, 480, 560, 560), (900, 1000, 1100, 1030),
                                      (1200, 1500, 1300, 1600), (20, 1000, 60, 1040)],
                        compression="zlib")
    outcome = run_batch([slide.path], tmp_path / "out", weights=tiny_model, block_chunks=2).outcomes[0]
    assert outcome.status == "ok", outcome.error
    mask_path = outcome.out_dir / "mask.ome.zarr"
    fresh = dask.compute(stats.statistics_graph(mask_path))[0]
    doc = json.loads((outcome.out_dir / "stats.json").read_text())
    assert doc["slide"]["lesion_count"] == fresh.lesion_count >= 5
    assert [les["area_px"] for les in doc["lesions"]] == [les.area_px for les in fresh.lesions]
    assert [les["diameter_px"] for les in doc["lesions"]] == [les.diameter_px for les in fresh.lesions]
    export.write_geojson(mask_path, tmp_path / "fresh.geojson", stats=fresh)
    fused = json.loads((outcome.out_dir / "lesions.geojson").read_text())["features"]
    again = json.loads((tmp_path / "fresh.geojson").read_text())["features"]
    assert fused == again


def test_naive_tiles_show_seams_that_the_halo_removes(tiny_model: Path, all_tissue_slide, tmp_path: Path) -> None:
    probs = {}
    for halo in (0, 56):
        res = run_batch([all_tissue_slide.path], tmp_path / f"h{halo}", weights=tiny_model, precision="fp32",
                        block_chunks=1, halo_px=halo, save_probabilities=True)
        probs[halo] = zarr.open_group(res.outcomes[0].out_dir / "probability.ome.zarr", mode="r")["0"][...]
    reference = np.round(_one_pass(tiny_model, all_tissue_slide.path, 56) * 255)
    err_naive = np.abs(probs[0].astype(float) - reference)
    err_halo = np.abs(probs[56].astype(float) - reference)
    # Near the chunk borders the naive tiles are visibly wrong; with the halo they match the one-pass map.
    border = np.zeros(reference.shape, bool)
    border[500:524, :] = border[:, 500:524] = border[1012:1036, :] = border[:, 1012:1036] = True
    assert err_naive[border].mean() > 5 * max(err_halo[border].mean(), 0.05)
    assert err_halo.max() <= 2


def test_lesion_over_four_chunk_corner(tiny_model: Path, all_tissue_slide, tmp_path: Path) -> None:
    outcome = run_batch([all_tissue_slide.path], tmp_path / "out", weights=tiny_model, precision="fp32").outcomes[0]
    mask = _mask(outcome)
    truth = all_tissue_slide.cancer_mask()
    corner = (slice(400, 640), slice(430, 600))  # spans chunks (0,0), (0,1), (1,0), (1,1)
    for ys, xs in ((slice(400, 512), slice(430, 512)), (slice(400, 512), slice(512, 600)),
                   (slice(512, 640), slice(430, 512)), (slice(512, 640), slice(512, 600))):
        assert mask[ys, xs].mean() > 0.9
    assert _dice(mask[corner], truth[corner]) > 0.95


def test_auto_precision_matches_fp32(tiny_model: Path, all_tissue_slide, tmp_path: Path) -> None:
    import torch

    from slidejob.model import best_precision

    fp32_run = run_batch([all_tissue_slide.path], tmp_path / "a", weights=tiny_model, precision="fp32").outcomes[0]
    auto_run = run_batch([all_tissue_slide.path], tmp_path / "b", weights=tiny_model, precision="auto").outcomes[0]
    assert _dice(_mask(auto_run), _mask(fp32_run)) >= 0.99
    # The manifest says what "auto" became where it ran, not just "auto".
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    precision, channels_last = best_precision(device.split(":")[0])
    [ran] = auto_run.manifest["inference"]["runtimes"]
    assert (ran["device"], ran["precision"], ran["channels_last"]) == (device, precision, channels_last)
    assert auto_run.manifest["parameters"]["precision"] == "auto"
    # forward-chunks auto: on CPU 2x4 where the model runs in bf16, 2x2 in fp32; on CUDA 4x4, whole blocks.
    assert auto_run.manifest["parameters"]["forward_chunks"] == "auto"
    assert ran["forward_chunks"] == ("4x4" if device != "cpu" else {"bf16": "2x4", "fp32": "2x2"}[precision])
    [ran] = fp32_run.manifest["inference"]["runtimes"]
    assert ran["precision"] == "fp32" and ran["device_name"]
    assert ran["forward_chunks"] == ("4x4" if device != "cpu" else "2x2")


def test_background_chunks_absent_and_zero(tiny_model: Path, tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "half.tif", 1024, 2048, tissue_boxes=[(0, 0, 1024, 1024)],
                        cancer_boxes=[(100, 100, 400, 400)], compression="zlib")
    outcome = run_batch([slide.path], tmp_path / "out", weights=tiny_model).outcomes[0]
    mask_path = outcome.out_dir / "mask.ome.zarr"
    assert chunkstore.stored_chunks(mask_path, "0") == {(0, 0), (0, 1), (1, 0), (1, 1)}
    mask = _mask(outcome)
    assert not mask[:, 1024:].any()
    assert outcome.manifest["outputs"]["inferred_chunks"] == 4
    assert not (outcome.out_dir / "tiles.zarr").exists()  # removed unless --keep-tiles


def test_manifest_and_ome_zarr_open_without_slidejob(tiny_model: Path, all_tissue_slide, tmp_path: Path) -> None:
    outcome = run_batch([all_tissue_slide.path], tmp_path / "out", weights=tiny_model).outcomes[0]
    manifest = json.loads((outcome.out_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["schema"] == "slidejob-run-manifest/1"
    assert manifest["input"]["fingerprint"].startswith("sha256:")
    assert len(manifest["model"]["weights_sha256"]) == 64
    assert {"threshold", "precision", "halo_px", "block_chunks"} <= set(manifest["parameters"])
    assert {"slidejob", "torch", "dask", "zarr", "tifffile"} <= set(manifest["versions"])
    assert {"tissue", "tile", "infer", "pyramid", "statistics", "total"} <= set(manifest["timings_s"])
    # Where the inference tasks' thread time went, stage by stage (tests/test_infer.py checks the
    # attribution): every stage ran, and no more thread time than the stage's wall time on all the
    # threads of the scheduler (without a client, Dask's threaded one: a thread per core).
    inference = manifest["inference"]
    assert inference["tasks"] >= 1 and list(inference["task_stage_s"]) == list(infer.TASK_STAGES)
    assert inference["task_stage_s"]["forward"] > 0 and inference["task_stage_s"]["read"] > 0
    assert all(v >= 0 for v in inference["task_stage_s"].values())
    assert sum(inference["task_stage_s"].values()) <= manifest["timings_s"]["infer"] * (os.cpu_count() or 1)
    # Statistics, pictures and the summary database are written beside the mask.
    for name in ("stats.json", "overlay.png", "lesions.geojson"):
        assert (outcome.out_dir / name).stat().st_size > 0, name
    stats = json.loads((outcome.out_dir / "stats.json").read_text())
    from scipy import ndimage

    n_lesions = ndimage.label(_mask(outcome), structure=np.ones((3, 3)))[1]
    assert stats["slide"]["lesion_count"] == manifest["statistics"]["lesion_count"] == n_lesions >= 3
    assert (tmp_path / "out" / "report.html").exists()
    from slidejob import summarydb

    rows = summarydb.query(summarydb.db_path_for(tmp_path / "out"), "SELECT slide_id, status FROM slides")
    assert [tuple(r) for r in rows.rows] == [(outcome.slide_id, "ok")]
    # A standard OME-Zarr reader, not slidejob, reads the label image and its pyramid.
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(outcome.out_dir / "mask.ome.zarr")))())
    data = nodes[0].data
    assert len(data) == 3 and tuple(data[0].shape) == (1300, 1400) and tuple(data[1].shape) == (650, 700)
    np.testing.assert_array_equal(np.asarray(data[0]), _mask(outcome))
    level1 = np.asarray(data[1])
    m = _mask(outcome)
    assert level1[200:300, 250:300].max() == 1 and level1.max() == m.max()


def test_rerun_is_skipped_unless_forced(tiny_model: Path, all_tissue_slide, tmp_path: Path) -> None:
    first = run_batch([all_tissue_slide.path], tmp_path / "out", weights=tiny_model).outcomes[0]
    again = run_batch([all_tissue_slide.path], tmp_path / "out", weights=tiny_model).outcomes[0]
    assert (first.status, again.status) == ("ok", "skipped")
    forced = run_batch([all_tissue_slide.path], tmp_path / "out", weights=tiny_model, force=True).outcomes[0]
    assert forced.status == "ok"
    changed = run_batch([all_tissue_slide.path], tmp_path / "out", weights=tiny_model, threshold=0.7).outcomes[0]
    assert changed.status == "ok"  # a different parameter is not "already done"


def test_a_lost_summary_database_is_rebuilt_on_rerun_without_redoing_slides(
    tiny_model: Path, all_tissue_slide, tmp_path: Path
) -> None:
    from slidejob import summarydb

    out = tmp_path / "out"
    first = run_batch([all_tissue_slide.path], out, weights=tiny_model).outcomes[0]
    db = summarydb.db_path_for(out)
    rows_sql = "SELECT * FROM slides ORDER BY slide_id"
    lesions_sql = "SELECT * FROM lesions ORDER BY slide_id, lesion_id"
    slides, lesions = summarydb.query(db, rows_sql).records(), summarydb.query(db, lesions_sql).rows
    assert first.status == "ok" and lesions  # the tiny model marks lesions on this slide
    # A plain rerun skips the slide and leaves its row alone (its provenance matches the manifest's).
    assert run_batch([all_tissue_slide.path], out, weights=tiny_model).outcomes[0].status == "skipped"
    assert summarydb.query(db, rows_sql).records() == slides
    for p in out.glob(summarydb.DB_NAME + "*"):
        p.rename(tmp_path / p.name)  # moved aside, as the error for a broken database advises
    mask_before = (first.out_dir / "mask.ome.zarr").stat().st_mtime_ns
    again = run_batch([all_tissue_slide.path], out, weights=tiny_model).outcomes[0]
    assert again.status == "skipped" and (first.out_dir / "mask.ome.zarr").stat().st_mtime_ns == mask_before
    rebuilt = summarydb.query(db, rows_sql).records()
    assert [{k: v for k, v in r.items() if k != "recorded_at"} for r in rebuilt] == \
        [{k: v for k, v in r.items() if k != "recorded_at"} for r in slides]
    assert summarydb.query(db, lesions_sql).rows == lesions
    # A stats.json of another run (killed before its manifest) or none: the slide is done again.
    for spoil in ("other run", "missing"):
        db.unlink()
        stats_json = first.out_dir / "stats.json"
        if spoil == "missing":
            stats_json.unlink()
        else:
            doc = json.loads(stats_json.read_text())
            doc["slide"]["threshold"] = doc["slide"]["parameters"]["threshold"] = 0.7
            stats_json.write_text(json.dumps(doc))
        redone = run_batch([all_tissue_slide.path], out, weights=tiny_model).outcomes[0]
        assert redone.status == "ok" and summarydb.query(db, lesions_sql).rows == lesions, spoil


def test_a_rerun_killed_after_replacing_outputs_leaves_no_manifest_vouching_for_them(
    tiny_model: Path, all_tissue_slide, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slidejob import summarydb

    out = tmp_path / "out"
    first = run_batch([all_tissue_slide.path], out, weights=tiny_model).outcomes[0]
    mask_a = _mask(first)

    def killed(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed")  # as kill -9 after the new mask and stats.json are in place

    with monkeypatch.context() as m:
        m.setattr(summarydb, "record_slide", killed)
        with pytest.raises(SystemExit):
            run_batch([all_tissue_slide.path], out, weights=tiny_model, threshold=0.99)
    assert not (first.out_dir / "manifest.json").exists()
    assert not np.array_equal(_mask(first), mask_a)  # the other threshold's mask is what is there now
    again = run_batch([all_tissue_slide.path], out, weights=tiny_model).outcomes[0]
    assert again.status == "ok"  # redone, not skipped over the other run's mask
    np.testing.assert_array_equal(_mask(again), mask_a)


def test_same_file_name_in_two_folders_gets_two_ids(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    s1 = write_slide(tmp_path / "a" / "scan.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)], seed=1)
    s2 = write_slide(tmp_path / "b" / "scan.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)], seed=2)
    result = run_batch([tmp_path / "a", tmp_path / "b"], tmp_path / "out", weights=tiny_model)
    ids = [o.slide_id for o in result.outcomes]
    assert len(set(ids)) == 2 and all(i.startswith("scan-") for i in ids)
    assert slide_id_for(s1.path, open_slide(s1.path).info.fingerprint) == ids[0]  # stable
    assert s2.path.exists()


def test_one_bad_slide_does_not_stop_the_batch(tiny_model: Path, tmp_path: Path) -> None:
    good = write_slide(tmp_path / "in" / "good.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)]) if (
        (tmp_path / "in").mkdir() or True) else None
    (tmp_path / "in" / "broken.svs").write_bytes(b"II*\x00garbage")
    (tmp_path / "in" / "empty.ndpi").write_bytes(b"")
    result = run_batch([tmp_path / "in"], tmp_path / "out", weights=tiny_model)
    by_name = {Path(o.source).name: o for o in result.outcomes}
    assert by_name["good.tif"].status == "ok"
    assert by_name["broken.svs"].status == "failed" and "broken.svs" in by_name["broken.svs"].error
    assert by_name["empty.ndpi"].status == "failed" and "empty" in by_name["empty.ndpi"].error
    for o in result.failed:
        manifest = json.loads((o.out_dir / "manifest.json").read_text())
        assert manifest["status"] == "failed" and "\n" not in manifest["error"]
        assert not (o.out_dir / "mask.ome.zarr").exists()
    from slidejob import summarydb

    rows = summarydb.query(summarydb.db_path_for(tmp_path / "out"), "SELECT status, count(*) FROM slides GROUP BY 1")
    assert sorted(tuple(r) for r in rows.rows) == [("failed", 2), ("ok", 1)]
    assert good is not None


def test_a_full_disk_stops_the_batch_and_keeps_what_was_done(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk is no bad slide: every further slide would fail the same way.  The batch stops with
    # OutputStorageFull (exit 6), the slide being written leaves nothing behind, the slide before it
    # keeps all its outputs, and a rerun after freeing space goes on from there.
    import errno

    from slidejob import export
    from slidejob.errors import OutputStorageFull

    (tmp_path / "in").mkdir()
    for name in ("a", "b", "c"):
        write_slide(tmp_path / "in" / f"{name}.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)])
    real_overlay = export.write_overlay_png

    def overlay(*args, **kwargs):
        if "b-" in str(args[-1]):  # the second slide's overlay: the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))
        return real_overlay(*args, **kwargs)

    monkeypatch.setattr(export, "write_overlay_png", overlay)
    with pytest.raises(OutputStorageFull, match=r"file system is full \(No space left on device\) while writing b\.tif"):
        run_batch([tmp_path / "in"], tmp_path / "out", weights=tiny_model)
    out = tmp_path / "out"
    dirs = {p.name.split("-")[0]: p for p in out.iterdir() if p.is_dir()}
    assert json.loads((dirs["a"] / "manifest.json").read_text())["status"] == "ok"
    assert not (dirs["b"] / "manifest.json").exists() and not list(dirs["b"].glob(".*tmp-*"))
    assert "c" not in dirs or not (dirs["c"] / "manifest.json").exists()
    rows = summarydb.query(summarydb.db_path_for(out), "SELECT slide_id, status FROM slides")
    assert [r[1] for r in rows.rows] == ["ok"]  # no row says b or c failed: they were not the problem
    monkeypatch.setattr(export, "write_overlay_png", real_overlay)
    rerun = run_batch([tmp_path / "in"], out, weights=tiny_model)
    assert [o.status for o in rerun.outcomes] == ["skipped", "ok", "ok"]


@pytest.mark.slow
def test_local_cluster_model_once_per_worker_and_gpu_path(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """2 worker processes declaring a GPU resource (the GPU-cluster code path, run on CPU)."""
    import torch
    from distributed import Client, LocalCluster

    slide = write_slide(tmp_path / "s.tif", 2048, 2048, tissue_boxes=[(0, 0, 2048, 2048)],
                        cancer_boxes=[(300, 300, 1500, 900)], compression="zlib")
    reference = _mask(run_batch([slide.path], tmp_path / "ref", weights=tiny_model, block_chunks=1).outcomes[0])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
                      dashboard_address=None) as cluster, Client(cluster) as client:
        outcome = run_batch([slide.path], tmp_path / "dist", weights=tiny_model, block_chunks=1).outcomes[0]
        loads = client.run(infer.load_count)
    assert outcome.status == "ok", outcome.error
    np.testing.assert_array_equal(_mask(outcome), reference)
    assert sorted(loads.values()) == [1, 1], loads  # each process loaded the model once, for 16 tasks
    # Workers that declare a GPU but infer on CPU are reported, not silently slow.
    on_cpu = [r for r in caplog.records if "declaring a GPU ran the model on their CPU" in r.getMessage()]
    assert len(on_cpu) == (0 if torch.cuda.is_available() else 1)


@pytest.mark.slow
def test_gpu_tasks_go_to_gpu_workers_only(tiny_model: Path, tmp_path: Path) -> None:
    """A cluster with one worker declaring a GPU and one without: only the GPU worker infers."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    slide = write_slide(tmp_path / "s.tif", 2048, 2048, tissue_boxes=[(0, 0, 2048, 2048)],
                        cancer_boxes=[(300, 300, 1500, 900)], compression="zlib")
    workers = {"gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
               "cpu": {"cls": Nanny, "options": {"nthreads": 1}}}
    with SpecCluster(scheduler={"cls": Scheduler, "options": {"dashboard_address": None}}, workers=workers) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        outcome = run_batch([slide.path], tmp_path / "out", weights=tiny_model, block_chunks=1).outcomes[0]
        loads = client.run(infer.load_count)
        resources = {a: w["resources"] for a, w in client.scheduler_info()["workers"].items()}
    gpu_address = next(a for a, r in resources.items() if r)
    assert outcome.status == "ok", outcome.error
    assert outcome.manifest["outputs"]["inferred_chunks"] == 16
    assert loads[gpu_address] == 1 and sum(loads.values()) == 1, (loads, resources)


_BOTH_RUNNING = threading.Barrier(2)


def _wait_for_the_other(i: int) -> int:
    _BOTH_RUNNING.wait(timeout=20)  # raises BrokenBarrierError unless two tasks run at once
    return i


def test_inference_tasks_share_a_gpu_workers_threads() -> None:
    """GPU_RESOURCES places tasks on GPU workers without making each take the whole worker."""
    from distributed import Client, LocalCluster

    from slidejob.pipeline import GPU_RESOURCES

    _BOTH_RUNNING.reset()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster, Client(cluster):
        tasks = [dask.delayed(_wait_for_the_other, pure=False)(i) for i in range(2)]
        assert dask.compute(*tasks, resources=GPU_RESOURCES) == (0, 1)


@pytest.mark.parametrize(("cores", "gpus", "per_gpu", "expected"), [
    (16, 1, "auto", (4, 3)), (64, 8, "auto", (16, 3)), (4, 1, "auto", (1, 3)), (16, 1, 1, (1, 15)),
    (16, 0, "auto", (2, 8)), (4, 0, "auto", (1, 4)),
    # Many GPUs, few cores: one worker per GPU, still 2 task threads each (one reads while one infers).
    (8, 8, "auto", (8, 2)),
])
def test_local_cluster_shape_per_gpu_and_per_core(
    monkeypatch: pytest.MonkeyPatch, cores: int, gpus: int, per_gpu: object, expected: tuple[int, int]
) -> None:
    from slidejob import pipeline

    monkeypatch.setattr(pipeline, "CPU_COUNT", cores)
    monkeypatch.setattr(pipeline, "cuda_device_count", lambda: gpus)
    with dask.config.set({"slidejob.cluster.workers-per-gpu": per_gpu}):
        shape = pipeline.local_cluster_shape()
    assert (shape["n_workers"], shape["threads_per_worker"]) == expected
    assert shape["gpus"] == gpus and shape["resources"] == ({"GPU": 1} if gpus else None)
    # A SLURM job's allocation caps the cores (a SLURM without affinity shows the whole node).
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    with dask.config.set({"slidejob.cluster.workers-per-gpu": per_gpu}):
        in_job = pipeline.local_cluster_shape()
    assert in_job["n_workers"] * in_job["threads_per_worker"] <= max(4, 2 * in_job["n_workers"])
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    # Given counts win over the rule, as --cluster-workers / --cluster-threads give them.
    given = pipeline.local_cluster_shape(n_workers=3, threads_per_worker=5)
    assert (given["n_workers"], given["threads_per_worker"]) == (3, 5)


def test_local_gpu_cluster_gives_each_worker_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker sees one of the GPUs this process may use (a scheduler's allocation), shared out evenly."""
    from distributed import Client

    from slidejob.pipeline import _gpu_local_cluster

    # GPUs 5 and 7 (an allocation as visible_gpu_ids reads it) exist only on paper: on a GPU machine
    # the workers' NVML monitor would fail to open them.
    monkeypatch.setenv("DASK_DISTRIBUTED__DIAGNOSTICS__NVML", "False")
    with _gpu_local_cluster()(n_workers=3, gpu_ids=["5", "7"], threads_per_worker=1, processes=True,
                              resources={"GPU": 1}, dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(3)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["5", "5", "7"]  # a third worker shares the least-held GPU


@pytest.mark.slow
def test_slides_in_flight_overlap_and_give_what_one_by_one_gives(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client, LocalCluster

    from slidejob import pipeline

    slides = [
        write_slide(tmp_path / f"s{i}.tif", 1024, 1536, tissue_boxes=[(0, 0, 1024, 1536)],
                    cancer_boxes=[(100 + 150 * i, 200, 600, 700 + 200 * i)], compression="zlib").path
        for i in range(3)
    ]
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    copy = tmp_path / "elsewhere" / slides[0].name  # the same slide in another folder: the same id
    copy.parent.mkdir()
    copy.write_bytes(slides[0].read_bytes())
    inputs = [slides[0], bad, copy, slides[1], slides[2]]
    one_by_one = run_batch(inputs, tmp_path / "seq", weights=tiny_model).outcomes
    spans: list[tuple[float, float]] = []
    real_run_one = pipeline._run_one

    def timed_run_one(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_run_one(*args, **kwargs)
        finally:
            spans.append((t0, time.perf_counter()))

    monkeypatch.setattr(pipeline, "_run_one", timed_run_one)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster):
        result = run_batch(inputs, tmp_path / "par", weights=tiny_model, slides_in_flight=2)
    # Outcomes come back in input order, the bad slide failed alone, and every mask is the same.
    assert [o.source for o in result.outcomes] == [o.source for o in one_by_one] == [str(p) for p in inputs]
    # The copy waits for the first and is skipped as done, as one after another it is.
    assert [o.status for o in result.outcomes] == [o.status for o in one_by_one] == [
        "ok", "failed", "skipped", "ok", "ok"]
    for par, seq in zip(result.outcomes, one_by_one):
        assert par.slide_id == seq.slide_id
        if par.status == "ok":
            np.testing.assert_array_equal(_mask(par), _mask(seq))
            assert par.manifest["statistics"] == seq.manifest["statistics"]
    # Two slides were in flight at once (never more).
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    depth = max(itertools.accumulate(step for _, step in events))
    assert depth == 2, spans
    rows = summarydb.query(summarydb.db_path_for(tmp_path / "par"), "SELECT status FROM slides").rows
    assert sorted(r[0] for r in rows) == ["failed", "ok", "ok", "ok"]


def _worker_pids(client) -> set[int]:
    """The cluster's worker processes; none while its only worker is going away under the call."""
    try:
        return set(client.run(os.getpid).values())
    except Exception:  # noqa: BLE001
        return set()


def _mark_and_return(path: str) -> int:
    with open(path, "a") as f:
        f.write("x")
    return 1


def _fail_after(seconds: float) -> int:
    time.sleep(seconds)
    raise ValueError("a bad tile")


@pytest.mark.slow
def test_a_failed_compute_lets_go_of_its_finished_tasks(tmp_path: Path) -> None:
    """Its error (and the traceback a caller keeps) must not hold futures that the scheduler would compute
    again when the worker holding their results dies: they would write into stores removed by then."""
    from distributed import Client, LocalCluster

    from slidejob.pipeline import compute_settled

    marks = tmp_path / "marks"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        done = dask.delayed(_mark_and_return, pure=False)(str(marks))
        failing = dask.delayed(_fail_after, pure=False)(0.5)
        with pytest.raises(ValueError, match="a bad tile") as raised:
            compute_settled(done, failing)
        assert marks.read_text() == "x"
        [pid] = client.run(os.getpid).values()
        os.kill(pid, signal.SIGKILL)  # the worker holding the finished task's result
        client.wait_for_workers(1, timeout=60)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and marks.read_text() == "x":
            time.sleep(0.1)
        assert raised.value.__traceback__ is not None  # still held here, as a caller's log or report may
        assert marks.read_text() == "x"  # not computed again


@pytest.mark.slow
def test_the_embedded_cluster_keeps_a_worker_that_dies_again_while_it_restarts() -> None:
    """15 s after a worker dies, distributed closes its nanny if no worker of its name is registered then;
    a second death whose restart spans that instant left the embedded cluster without workers for good."""
    from distributed.deploy.spec import SpecCluster

    from slidejob.pipeline import dask_client

    timeout_s = 15.0  # distributed's default distributed.deploy.lost-worker-timeout, which dask_client lifts
    assert dask.config.get("distributed.deploy.lost-worker-timeout") == "15s"
    with dask_client(n_workers=1, threads_per_worker=1) as client:
        assert isinstance(client.cluster, SpecCluster)
        [first] = _worker_pids(client)
        os.kill(first, signal.SIGKILL)
        died = time.monotonic()
        while time.monotonic() < died + 60 and not _worker_pids(client) - {first}:
            time.sleep(0.05)
        # The second death just before the first one's check: its restart (~0.5 s) spans it.
        time.sleep(max(0.0, died + timeout_s - 0.25 - time.monotonic()))
        [second] = _worker_pids(client) - {first}
        os.kill(second, signal.SIGKILL)
        time.sleep(2.0)
        client.wait_for_workers(1, timeout=30)
        assert len(client.cluster.workers) == 1
        assert client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3


@pytest.mark.slow
def test_worker_killed_mid_run_still_completes(tiny_model: Path, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    slide = write_slide(tmp_path / "s.tif", 2048, 2560, tissue_boxes=[(0, 0, 2048, 2560)],
                        cancer_boxes=[(300, 300, 1500, 2000)], compression="zlib")
    reference = _mask(run_batch([slide.path], tmp_path / "ref", weights=tiny_model, block_chunks=1).outcomes[0])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        victim = min(pids.values())
        done: dict = {}
        runner = threading.Thread(target=lambda: done.setdefault(
            "r", run_batch([slide.path], tmp_path / "dist", weights=tiny_model, block_chunks=1)))
        runner.start()
        # Kill once inference has started writing mask chunks.
        deadline = time.time() + 120
        while time.time() < deadline:
            tmp_masks = list((tmp_path / "dist").glob("*/.mask.ome.zarr.tmp-*/0/c/*/*"))
            if len(tmp_masks) >= 2:
                break
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        runner.join(timeout=300)
    outcome = done["r"].outcomes[0]
    assert outcome.status == "ok", outcome.error
    np.testing.assert_array_equal(_mask(outcome), reference)


@pytest.mark.slow
def test_a_slide_whose_workers_die_fails_alone_and_its_neighbour_in_flight_is_redone(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A slide that kills its worker (out of memory, a crashing codec) takes down the tasks of the slide in
    flight beside it on that worker; that one is retried alone and comes out right, the culprit fails."""
    from slidejob import pipeline
    from slidejob.pipeline import dask_client

    caplog.set_level(logging.INFO, logger="slidejob")
    good = write_slide(tmp_path / "good.tif", 3072, 3072, tissue_boxes=[(0, 0, 3072, 3072)],
                       cancer_boxes=[(300, 300, 1500, 2000)], compression="zlib").path
    poison = write_slide(tmp_path / "poison.tif", 3072, 3072, tissue_boxes=[(0, 0, 3072, 3072)],
                         compression="zlib").path
    reference = run_batch([good], tmp_path / "ref", weights=tiny_model).outcomes[0]
    out = tmp_path / "out"
    calls: list[tuple[str, float, float]] = []
    real_run_one = pipeline._run_one

    started: dict[str, int] = {}

    def observed_run_one(path, *args, **kwargs):
        started[Path(path).stem] = started.get(Path(path).stem, 0) + 1
        t0 = time.perf_counter()
        try:
            return real_run_one(path, *args, **kwargs)
        finally:
            calls.append((Path(path).name, t0, time.perf_counter()))

    monkeypatch.setattr(pipeline, "_run_one", observed_run_one)

    def inferring(stem: str) -> str | None:
        # The attempt (its temporary mask store) that has written some of the slide's 36 mask chunks and
        # not all: its inference tasks are on the worker.
        for store in out.glob(f"{stem}-*/.mask.ome.zarr.tmp-*"):
            if 0 < len(list(store.glob("0/c/*/*"))) < 36:
                return store.name
        return None

    stop, kills, killed = threading.Event(), [], set()

    def kill_worker(client) -> bool:
        pids = _worker_pids(client)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Until the nanny has its new worker up, so that the next kill lands on a worker running tasks.
        deadline = time.monotonic() + 60
        while pids and time.monotonic() < deadline and not (_worker_pids(client) - pids):
            time.sleep(0.05)
        return bool(pids)

    def killer(client) -> None:
        # Kill the worker under every attempt of the poison slide and under the good slide's first: the good
        # one fails with whichever slide's tasks it shared the worker with, then is retried alone.
        while not stop.is_set():
            for stem in ("poison", "good"):
                attempt = inferring(stem)
                if (attempt and attempt not in killed and (stem == "poison" or started.get("good") == 1)
                        and kill_worker(client)):
                    killed.add(attempt)
                    kills.append(f"{stem} {attempt}")
            time.sleep(0.005)

    # A task fails at its first worker's death (the scheduler's default retries it 3 times): one kill an attempt.
    # The embedded cluster, as `slidejob run` starts it (it keeps its worker through the deaths).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            dask_client(n_workers=1, threads_per_worker=2) as client:
        watcher = threading.Thread(target=killer, args=(client,), daemon=True)
        watcher.start()
        try:
            result = run_batch([good, poison], out, weights=tiny_model, slides_in_flight=2)
        finally:
            stop.set()
            watcher.join(timeout=30)
    assert len(kills) >= 2, kills  # the poison slide's two attempts at least
    ok, failed = result.outcomes
    assert ok.status == "ok", ok.error
    np.testing.assert_array_equal(_mask(ok), _mask(reference))
    assert ok.manifest["statistics"] == reference.manifest["statistics"]
    assert failed.status == "failed" and failed.workers_died
    assert failed.error == (f"{poison}: the worker processes running its tasks died, each try (killed for memory, "
                            "a crash in a reader or codec, or a lost node)")
    assert not (failed.out_dir / "tiles.zarr").exists()  # no copy of its tissue left behind
    # Each ran twice: together (both failed), then one after the other, alone.
    assert sorted(name for name, _, _ in calls) == ["good.tif", "good.tif", "poison.tif", "poison.tif"]
    first, retries = calls[:2], sorted(calls[2:], key=lambda c: c[1])
    assert max(t0 for _, t0, _ in first) < min(t1 for _, _, t1 in first)  # in flight together
    assert retries[0][2] <= retries[1][1] and min(t0 for _, t0, _ in retries) >= max(t1 for _, _, t1 in first)
    rows = dict(summarydb.query(summarydb.db_path_for(out), "SELECT slide_id, status FROM slides").rows)
    assert sorted(rows.values()) == ["failed", "ok"]
    # The first failures are warnings (to be retried); only the culprit's failure alone is an error.
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "slidejob.pipeline"]
    assert ("ERROR", f"{poison}: failed: {failed.error}") in logged
    assert not [m for level, m in logged if level == "ERROR" and str(good) in m], logged
    assert (f"{good}: failed: {good}: the worker processes running its tasks died, each try (killed for "
            "memory, a crash in a reader or codec, or a lost node); to be retried alone after the slides in "
            "flight") in [m for level, m in logged if level == "WARNING"]


def test_min_lesion_area_removes_small_lesions_everywhere_and_needs_mpp(tiny_model: Path, tmp_path: Path) -> None:
    # Lesions below the default 200 µm² (800 px at 0.5 µm/px) go from mask, statistics and
    # GeoJSON alike; with --min-lesion-area 0 they stay.  Blocks of one chunk: many block borders.
    slide = write_slide(tmp_path / "s.tif", 1024, 2048, tissue_boxes=[(0, 0, 1024, 2048)],
                        cancer_boxes=[(100, 100, 400, 400), (700, 700, 724, 724), (500, 980, 524, 1004)],
                        compression="zlib")
    runs = {}
    for area in (None, 0.0):
        o = run_batch([slide.path], tmp_path / f"out-{area}", weights=tiny_model, block_chunks=1,
                      min_lesion_area_um2=area).outcomes[0]
        assert o.status == "ok", o.error
        runs[area] = o
    default, keep_all = runs[None], runs[0.0]
    assert default.manifest["parameters"]["min_lesion_area_um2"] == 200
    assert default.manifest["small_lesions"]["min_area_px"] == 800
    assert keep_all.manifest["small_lesions"] == {"min_area_um2": 0.0, "min_area_px": 0, "removed": 0}
    small_kept = [les for les in json.loads((keep_all.out_dir / "stats.json").read_text())["lesions"]
                  if les["area_px"] < 800]
    assert len(small_kept) >= 2  # the tiny model's speckles
    doc = json.loads((default.out_dir / "stats.json").read_text())
    assert min(les["area_px"] for les in doc["lesions"]) >= 800
    assert default.manifest["small_lesions"]["removed"] == len(small_kept)
    assert len(json.loads((default.out_dir / "lesions.geojson").read_text())["features"]) == len(doc["lesions"])
    mask = _mask(default)
    np.testing.assert_array_equal(mask, _without_small(_mask(keep_all), 800))
    assert int(mask.sum()) == doc["slide"]["cancer_area_px"]
    # The pyramid was built from the cleaned level 0.
    level1 = zarr.open_group(default.out_dir / "mask.ome.zarr", mode="r")["1"][...]
    np.testing.assert_array_equal(level1, maskstore.downsample_max(mask))

    unknown = write_slide(tmp_path / "u.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)],
                          cancer_boxes=[(100, 100, 124, 124)], compression="zlib", mpp_um=None)
    o = run_batch([unknown.path], tmp_path / "out-u", weights=tiny_model).outcomes[0]
    assert o.status == "ok", o.error
    assert o.manifest["small_lesions"]["min_area_px"] == 0  # no µm/px: nothing is judged small


@pytest.mark.parametrize("block_chunks", [1, 2, 3, 4])
def test_pyramid_levels_written_by_the_tasks_equal_reducing_level_by_level(
    tiny_model: Path, tmp_path: Path, block_chunks: int
) -> None:
    # With blocks of 2 or 4 chunks the tasks write levels 1 (and 2) from their own blocks and
    # only the rest is reduced afterwards; every level must still be the 2×2 reduction of the
    # one below (max for the mask, mean for probabilities), glass gaps and ragged edges included.
    slide = write_slide(tmp_path / "s.tif", 1300, 2100, tissue_boxes=[(0, 0, 1300, 900), (0, 1300, 700, 2100)],
                        cancer_boxes=[(100, 100, 500, 800), (200, 1400, 600, 1900)], compression="zlib")
    outcome = run_batch([slide.path], tmp_path / "out", weights=tiny_model, block_chunks=block_chunks,
                        save_probabilities=True).outcomes[0]
    assert outcome.status == "ok", outcome.error
    for name, reduce in (("mask.ome.zarr", maskstore.downsample_max), ("probability.ome.zarr",
                                                                       maskstore.downsample_mean)):
        root = zarr.open_group(outcome.out_dir / name, mode="r")
        levels = [root[str(i)][...] for i in range(maskstore.n_levels_for(1300, 2100))]
        assert len(levels) == 4 and levels[0].any()
        for lv in range(1, len(levels)):
            np.testing.assert_array_equal(levels[lv], reduce(levels[lv - 1]), err_msg=f"{name} level {lv}")
        # Sparse above level 0: no chunk of zeros is stored.
        for lv in range(1, len(levels)):
            stored = [p for p in (outcome.out_dir / name / str(lv) / "c").rglob("*") if p.is_file()]
            assert stored
            for key in stored:
                r, c = int(key.parent.name), int(key.name)
                assert levels[lv][r * 512 : (r + 1) * 512, c * 512 : (c + 1) * 512].any()


def test_small_slides_get_smaller_blocks_on_cpu_and_the_same_mask(tiny_model: Path, all_tissue_slide,
                                                                   tmp_path: Path) -> None:
    # A 3×3-chunk slide is one 4×4 block: one task, one busy thread.  With the configured block
    # size the run halves it until every task thread has a block; each chunk is still its own
    # forward on CPU, so the mask is bit for bit the one of the 4×4 block.
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one task thread: nothing to share out")
    adapted = run_batch([all_tissue_slide.path], tmp_path / "a", weights=tiny_model, precision="fp32").outcomes[0]
    given = run_batch([all_tissue_slide.path], tmp_path / "b", weights=tiny_model, precision="fp32",
                      block_chunks=4).outcomes[0]
    assert adapted.status == given.status == "ok"
    assert given.manifest["block_chunks_used"] == 4
    assert adapted.manifest["block_chunks_used"] < 4 <= adapted.manifest["parameters"]["block_chunks"]
    np.testing.assert_array_equal(_mask(adapted), _mask(given))
    for lv in ("1", "2"):
        a = zarr.open_group(adapted.out_dir / "mask.ome.zarr", mode="r")[lv][...]
        np.testing.assert_array_equal(a, zarr.open_group(given.out_dir / "mask.ome.zarr", mode="r")[lv][...])


@pytest.mark.gpu
def test_cuda_run_matches_the_cpu_fp32_mask(tiny_model: Path, all_tissue_slide, tmp_path: Path) -> None:
    """On a CUDA machine: in process and on the embedded cluster's GPU workers, the mask is the CPU's."""
    import torch

    from slidejob.pipeline import dask_client, local_cluster_shape

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = _mask(run_batch([all_tissue_slide.path], tmp_path / "cpu", weights=tiny_model, device="cpu",
                          precision="fp32").outcomes[0])
    assert cpu.any()
    for precision in ("fp32", "auto"):
        gpu = run_batch([all_tissue_slide.path], tmp_path / f"cuda-{precision}", weights=tiny_model,
                        device="cuda", precision=precision).outcomes[0]
        assert gpu.status == "ok", gpu.error
        assert _dice(_mask(gpu), cpu) >= 0.99, precision
    shape = local_cluster_shape()
    assert shape["gpus"] == torch.cuda.device_count() and shape["resources"] == {"GPU": 1}
    with dask_client() as client:
        client.wait_for_workers(shape["n_workers"])
        outcome = run_batch([all_tissue_slide.path], tmp_path / "cluster", weights=tiny_model).outcomes[0]
        on_cuda = client.run(lambda: [key[1] for key in infer._MODELS])
    assert outcome.status == "ok", outcome.error
    assert _dice(_mask(outcome), cpu) >= 0.99
    # Every worker that ran a task ran it on its GPU (a small slide need not reach every worker).
    assert all(devices in ([], ["cuda"]) for devices in on_cuda.values()) and any(on_cuda.values()), on_cuda
    assert [r["device"] for r in outcome.manifest["inference"]["runtimes"]] == ["cuda:0"]


def test_the_client_of_a_run_does_not_import_torch(tiny_model: Path, tmp_path: Path) -> None:
    # The client reads the model card and plans the run; only workers run the model. torch in the
    # client would be ~180 MB of the batch's memory for nothing (bench_run counts client + workers).
    if cuda_device_count():
        pytest.skip("with CUDA the client imports torch to count the GPUs")
    script = f"""
import sys
from pathlib import Path
from slidejob.pipeline import dask_client, run_batch
from slidejob.synthetic import write_slide
if __name__ == "__main__":
    slide = write_slide(Path({str(tmp_path / 's.tif')!r}), 1024, 1024, tissue_boxes=[(0, 0, 1024, 1024)])
    with dask_client(n_workers=1, threads_per_worker=1) as client:
        outcome = run_batch([slide.path], Path({str(tmp_path / 'out')!r}), weights=Path({str(tiny_model)!r})).outcomes[0]
    print(outcome.status, "torch" in sys.modules)
"""
    (tmp_path / "client.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "client.py")], capture_output=True, text=True,
                          timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["ok", "False"], proc.stdout


def test_cpu_workers_keep_forward_memory_instead_of_faulting_it_in_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # glibc would hand a forward's large activations out as fresh mmaps and unmap them on free, so
    # every forward page-faulted them in again (~20,000 faults a 624 x 1136 forward with Dask's own
    # settings, two task threads; one 8-channel activation is ~5,500 pages); the CPU workers'
    # malloc settings keep them in the heap (~40-250).
    import glob
    import platform

    from slidejob.pipeline import CPU_WORKER_ENVIRON, WORKER_MALLOC, dask_client

    if cuda_device_count():
        pytest.skip("GPU workers keep the other malloc settings")
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the settings are glibc's")
    for key in set().union(*WORKER_MALLOC.values()):
        monkeypatch.delenv(key, raising=False)  # exported for some other cluster's workers

    def faults_per_forward() -> dict:
        import os
        import resource
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        from slidejob.model import load_model

        model = load_model(None, None, precision="fp32", channels_last=True)
        x = np.random.default_rng(0).integers(0, 255, (1, 624, 1136, 3), dtype=np.uint8)
        with ThreadPoolExecutor(2) as pool:  # as a worker's two task threads do
            for _ in pool.map(lambda _: model.predict_proba(x), range(8)):
                pass
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in pool.map(lambda _: model.predict_proba(x), range(8)):
                pass
            after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        return {"faults": (after - before) / 8, "environ": {k: os.environ.get(k) for k in CPU_WORKER_ENVIRON}}

    outside = dict(os.environ)
    huge_pages_always = any("[always]" in Path(f).read_text() for f in
                            glob.glob("/sys/kernel/mm/transparent_hugepage/**/enabled", recursive=True))
    if not huge_pages_always:  # 2 MiB pages would fault 512x less: nothing to tell apart
        with (dask.config.set({"slidejob.cluster.worker-malloc": "dask"}),
              dask_client(n_workers=1, threads_per_worker=2) as client):
            (with_dask_defaults,) = client.run(faults_per_forward).values()
        assert with_dask_defaults["faults"] > 10_000, with_dask_defaults  # what the settings save
    with dask_client(n_workers=1, threads_per_worker=2) as client:
        (seen,) = client.run(faults_per_forward).values()
    assert seen["environ"] == {k: str(v) for k, v in CPU_WORKER_ENVIRON.items()}
    assert seen["faults"] < 4000, seen
    # The nannies' spawn environment did not stay behind in this process's.
    assert dict(os.environ) == outside


def test_a_batch_hands_its_cpu_workers_kept_heap_back(tmp_path: Path) -> None:
    # The workers keep their forwards' heap while a batch runs (no page faults); at its end they
    # give it back, so a long-lived cluster does not hold ~0.3 GB a task thread between batches.
    from slidejob.pipeline import dask_client

    if cuda_device_count():
        pytest.skip("GPU workers keep the other malloc settings")
    slide = write_slide(tmp_path / "s.tif", 2048, 2048, tissue_boxes=[(0, 0, 2048, 2048)], compression="zlib")

    def peak_and_now_mb() -> tuple[float, float]:
        import resource

        import psutil

        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, psutil.Process().memory_info().rss / 2**20)

    with dask_client(n_workers=1, threads_per_worker=2) as client:
        outcome = run_batch([slide.path], tmp_path / "out", block_chunks=2).outcomes[0]  # shipped model, 2x2 forwards
        (after,) = client.run(peak_and_now_mb).values()
    assert outcome.status == "ok", outcome.error
    peak_mb, now_mb = after
    assert peak_mb - now_mb > 150, after
