from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from slidejob.cli import cli
from slidejob.synthetic import write_slide


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slidejob", *args], check=False, capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, **(env or {})})


def test_help_has_examples() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0 and "tile" in top.output
    for cmd in ("info", "tissue", "tile"):
        res = runner.invoke(cli, [cmd, "--help"])
        assert res.exit_code == 0 and "Examples:" in res.output, cmd


def test_info_json(real_slides: Path) -> None:
    res = CliRunner().invoke(cli, ["info", "--format", "json", str(real_slides / "ome-tiff")])
    assert res.exit_code == 0, res.output
    records = json.loads(res.output)
    assert [Path(r["path"]).name for r in records] == ["OS-1-detail.ome.tif", "OS-2-ndpi.ome.tif"]
    assert all(r["mpp_source"] == "ome:PhysicalSizeX" for r in records)


def test_tissue_png_and_tile(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", 1100, 1600, tissue_boxes=[(0, 0, 700, 700)])
    res = CliRunner().invoke(cli, ["tissue", str(slide.path), "--png", str(tmp_path / "t.png")])
    assert res.exit_code == 0, res.output
    assert "4 of 12 chunks hold tissue" in res.output
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(cli, ["tile", str(slide.path), "--out", str(tmp_path / "s.zarr"), "--mpp", "0.3"])
    assert res.exit_code == 0, res.output
    assert "4 of 12 chunks written" in res.output
    assert [p.name for p in (tmp_path / "s.zarr" / "0").glob("c.*")] == ["c.0.0.0"]  # one shard
    res = CliRunner().invoke(cli, ["tile", str(slide.path), "--out", str(tmp_path / "u.zarr"), "--no-shards"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "u.zarr" / "0").glob("c.*")) == ["c.0.0.0", "c.0.1.0", "c.1.0.0",
                                                                            "c.1.1.0"]
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "u.zarr" / "0")[:], zarr.open_array(tmp_path / "s.zarr" / "0")[:])


@pytest.mark.parametrize("kind", ["missing", "empty", "not-tiff", "truncated"])
def test_bad_input_exits_nonzero_with_one_line(tmp_path: Path, kind: str) -> None:
    good = write_slide(tmp_path / "good.tif", 1024, 1024, tissue_boxes=[(0, 0, 1024, 1024)], n_levels=1).path
    bad = {
        "missing": tmp_path / "missing.svs",
        "empty": tmp_path / "empty.svs",
        "not-tiff": tmp_path / "text.tif",
        "truncated": tmp_path / "cut.tif",
    }[kind]
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "not-tiff":
        bad.write_text("hello")
    elif kind == "truncated":
        bad.write_bytes(good.read_bytes()[:5000])
    out = tmp_path / "out.zarr"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli("tile", str(bad), "--out", str(out))
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slidejob: error: ") and str(bad) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind


def test_run_on_a_directory_without_slides_is_bad_input(tmp_path: Path) -> None:
    # A mistyped scan directory must not end as "0 of 0 slide(s) done" with status 0.
    (tmp_path / "scans" / "2026").mkdir(parents=True)
    (tmp_path / "scans" / "2026" / "notes.txt").write_text("no slides here")
    proc = run_cli("run", str(tmp_path / "scans"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"slidejob: error: {tmp_path / 'scans'}: no slide files found "
        "(looked for .svs .ndpi .tif .tiff .btf .scn .bif, recursively)"
    )
    assert not (tmp_path / "out").exists()  # failed before a cluster started or anything was written


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A real file system of ``size`` at ``path`` that fills up (or is read-only), where this machine lets the tests mount one."""
    path.mkdir()
    options = f"ro,size={size}" if read_only else f"size={size}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_run_into_a_directory_with_a_corrupt_summary_database_stops_before_starting(
    tiny_model: Path, tmp_path: Path
) -> None:
    slide = write_slide(tmp_path / "a.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "slidejob.sqlite").write_bytes(b"not a database at all" * 100)
    proc = run_cli("run", str(slide.path), "--out", str(out), "--weights", str(tiny_model))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        (f"slidejob: error: {out / 'slidejob.sqlite'}: not a usable summary database (file is not a database); "
         "it was left as it is: move it aside and run again (slides already done are recorded anew from their "
         "stats.json, not redone)")
    ]
    assert sorted(p.name for p in out.iterdir()) == ["slidejob.sqlite"]  # no cluster, no slide started
    assert (out / "slidejob.sqlite").read_bytes() == b"not a database at all" * 100


def test_run_onto_a_read_only_file_system_stops_before_starting(tiny_model: Path, tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "a.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)])
    with small_tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        proc = run_cli("run", str(slide.path), "--out", str(ro / "out"), "--weights", str(tiny_model))
    assert proc.returncode == 1, proc.stderr[-3000:]
    # One line, and no cluster was started for nothing (it would have printed its dashboard).
    assert proc.stderr.strip().splitlines() == [f"slidejob: error: {ro / 'out'}: Read-only file system"]


def test_run_onto_a_full_file_system_exits_6_with_one_line(tiny_model: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "3m") as small:
        slides = tmp_path / "slides"
        slides.mkdir()
        for name in ("a", "b", "c"):
            write_slide(slides / f"{name}.tif", 1024, 1024, tissue_boxes=[(0, 0, 1024, 1024)])
        proc = run_cli("run", str(slides), "--out", str(small / "out"), "--weights", str(tiny_model),
                       "--cluster-workers", "1", "--cluster-threads", "2")
        assert proc.returncode == 6, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("slidejob: error: ")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert errors[0].startswith(f"slidejob: error: {small / 'out'}: its file system is full"), errors
        assert "rerun" in errors[0]
        # Nothing says a slide failed: the slides were not the problem.
        assert not [m for m in (small / "out").glob("*/manifest.json")
                    if json.loads(m.read_text())["status"] == "failed"]


def test_tile_and_tissue_onto_a_full_file_system_exit_6_and_leave_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "1m") as small:
        slide = write_slide(tmp_path / "s.tif", 2048, 2048, tissue_boxes=[(0, 0, 2048, 2048)]).path
        for args in (("tile", str(slide), "--out", str(small / "s.zarr")),
                     ("tissue", str(slide), "--png", str(small / "s.png"))):
            proc = run_cli(*args)
            assert proc.returncode == 6, proc.stderr[-2000:]
            assert proc.stderr.strip().splitlines()[-1].startswith("slidejob: error: "), proc.stderr[-2000:]
            assert "file system is full" in proc.stderr and "Traceback" not in proc.stderr
            assert list(small.iterdir()) == []  # no half-written output, no temporary


def test_existing_output_exit_status(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)])
    (tmp_path / "s.zarr").mkdir()
    proc = run_cli("tile", str(slide.path), "--out", str(tmp_path / "s.zarr"))
    assert proc.returncode == 4 and "--overwrite" in proc.stderr


def test_demo_the_readme_command(tmp_path: Path) -> None:
    # `make demo` / `slidejob demo`: the newcomer's first command, end to end on the embedded
    # LocalCluster with the shipped model, scored against the EBHI-Seg annotations it ships with.
    res = run_cli("demo", "--out", str(tmp_path / "demo"), "--cluster-workers", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    dice = float(res.stdout.split("Dice of the cancer mask against the tiles' annotations:")[1].split()[0])
    assert dice >= 0.8  # 0.855 measured; the all-negative mask scores 0
    results = tmp_path / "demo" / "results"
    assert (results / "report.html").is_file() and (results / "slidejob.sqlite").is_file()


def test_run_end_to_end_on_a_local_cluster_of_two_worker_processes(
    real_slides: Path, tiny_model: Path, tmp_path: Path
) -> None:
    # `slidejob run` as a user types it: a generated slide with known cancer and every real slide
    # (SVS, NDPI, OME-TIFF), on an embedded LocalCluster of two worker processes.
    import zarr

    from slidejob.wsi import open_slide

    made = write_slide(tmp_path / "made.tif", 1300, 1400, tissue_boxes=[(0, 0, 1300, 1400)],
                       cancer_boxes=[(400, 430, 640, 600), (1000, 100, 1250, 700)], compression="jpeg")
    out = tmp_path / "out"
    res = run_cli("run", str(made.path), str(real_slides), "--out", str(out), "--weights", str(tiny_model),
                  "--cluster-workers", "2", "--cluster-threads", "1")
    # The NDPI fluorescence scan fails with its reason (the H&E model does not apply); the others run.
    assert res.returncode == 1, res.stderr[-3000:]
    assert "dashboard: http" in res.stderr
    assert "CPU worker(s)" not in res.stderr  # the embedded cluster's workers have the malloc settings
    assert "5 of 6 slide(s) done" in res.stdout
    manifests = [json.loads(m.read_text()) for m in out.glob("*/manifest.json")]
    failed = [m for m in manifests if m["status"] != "ok"]
    assert len(manifests) == 6 and [m["slide_id"][:16] for m in failed] == ["test3-DAPI-2-387"]
    assert "fluorescence scan" in failed[0]["error"] and "test3-DAPI-2-387.ndpi" in failed[0]["error"]
    assert not (out / failed[0]["slide_id"] / "mask.ome.zarr").exists()
    manifests = [m for m in manifests if m["status"] == "ok"]
    for m in manifests:
        mask = zarr.open_group(out / m["slide_id"] / "mask.ome.zarr", mode="r")["0"]
        info = open_slide(m["input"]["path"]).info
        assert mask.shape == (info.height_px, info.width_px)
        assert (out / m["slide_id"] / "stats.json").is_file() and (out / m["slide_id"] / "lesions.geojson").is_file()
    ours = next(m for m in manifests if m["slide_id"].startswith("made-"))
    mask = zarr.open_group(out / ours["slide_id"] / "mask.ome.zarr", mode="r")["0"][...].astype(bool)
    truth = made.cancer_mask()
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
    assert (out / "report.html").is_file() and (out / "slidejob.sqlite").is_file()


def test_run_on_an_existing_cluster_by_address_and_by_scheduler_file(tiny_model: Path, tmp_path: Path) -> None:
    # --scheduler / --scheduler-file send the work to a cluster started elsewhere: the model
    # must be loaded on that cluster's worker, not in an embedded one.
    from distributed import Client, LocalCluster

    from slidejob import infer

    slide = write_slide(tmp_path / "s.tif", 700, 900, tissue_boxes=[(0, 0, 700, 900)],
                        cancer_boxes=[(100, 100, 400, 500)], compression="zlib")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert sum(client.run(infer.load_count).values()) == 0
        by_address = run_cli("run", str(slide.path), "--out", str(tmp_path / "a"), "--weights", str(tiny_model),
                             "--scheduler", cluster.scheduler_address)
        assert by_address.returncode == 0, by_address.stderr[-2000:]
        assert sum(client.run(infer.load_count).values()) == 1
        # A worker started without slidejob's malloc settings is named, with the settings to give it.
        assert "1 of 1 CPU worker(s) (tcp://" in by_address.stderr, by_address.stderr[-2000:]
        assert "MALLOC_ARENA_MAX=1" in by_address.stderr
        # What `dask scheduler --scheduler-file` writes, reduced to the field a client reads.
        (tmp_path / "scheduler.json").write_text(json.dumps({"type": "Scheduler", "address": cluster.scheduler_address}))
        by_file = run_cli("run", str(slide.path), "--out", str(tmp_path / "b"), "--weights", str(tiny_model),
                          "--scheduler-file", str(tmp_path / "scheduler.json"))
        assert by_file.returncode == 0, by_file.stderr[-2000:]
        assert sum(client.run(infer.load_count).values()) == 1  # the same worker, its model reused
    for out in ("a", "b"):
        (manifest,) = (tmp_path / out).glob("*/manifest.json")
        assert json.loads(manifest.read_text())["status"] == "ok"
    both = [(tmp_path / out).glob("*/mask.ome.zarr") for out in ("a", "b")]
    import zarr

    a, b = (zarr.open_group(next(g), mode="r")["0"][...] for g in both)
    assert (a == b).all() and a.any()
    # No cluster there: one line naming it, exit 5 (retry later), nothing written.
    for flag, where in (("--scheduler", "tcp://127.0.0.1:9"), ("--scheduler-file", str(tmp_path / "none.json"))):
        bad = run_cli("run", str(slide.path), "--out", str(tmp_path / "c"), flag, where,
                      env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
        assert bad.returncode == 5, bad.stderr[-2000:]
        assert bad.stderr.startswith("slidejob: error: ") and bad.stderr.count("\n") == 1 and where in bad.stderr
    assert not (tmp_path / "c").exists()


def _results(out: Path) -> tuple[list[dict], list[tuple], dict[str, bytes]]:
    """A run's summary rows (without times), its lesions and its level-0 mask chunks' bytes."""
    from slidejob import summarydb

    times = {"started_at", "finished_at", "duration_s", "recorded_at"}
    db = summarydb.db_path_for(out)
    rows = [{k: v for k, v in r.items() if k not in times}
            for r in summarydb.query(db, "SELECT * FROM slides ORDER BY slide_id").records()]
    lesions = summarydb.query(db, "SELECT * FROM lesions ORDER BY slide_id, lesion_id").rows
    chunks = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/mask.ome.zarr/0/c/*/*"))}
    return rows, lesions, chunks


@pytest.fixture(scope="module")
def uninterrupted_batch(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str], Path]:
    """Three slides, the run options, and the output of a run that nothing interrupted."""
    base = tmp_path_factory.mktemp("batch")
    slides = [str(write_slide(base / f"s{i}.tif", 2048, 2048, tissue_boxes=[(0, 0, 2048, 2048)],
                              cancer_boxes=[(300, 300, 900, 900), (1200, 1000, 1900, 1500)], seed=i,
                              compression="zlib").path) for i in range(3)]
    common = ["--weights", str(tiny_model), "--cluster-workers", "1", "--cluster-threads", "2"]
    assert run_cli("run", *slides, "--out", str(base / "clean"), *common).returncode == 0
    return slides, common, base / "clean"


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["inferring the first slide", "after the first slide", "after two slides"])
def test_run_killed_9_at_any_moment_then_rerun_loses_and_duplicates_nothing(
    uninterrupted_batch: tuple[list[str], list[str], Path], tmp_path: Path, moment: str
) -> None:
    # Overnight robustness: SIGKILL (no handler runs) with slides in flight, then the same command
    # again.  Its worker processes must go with it, and the rerun must give exactly what an
    # uninterrupted run gives: the same rows (one per slide), lesions and mask chunks, no
    # temporaries left, slides finished before the kill not redone.
    import signal
    import time

    import psutil

    slides, common, clean = uninterrupted_batch
    out = tmp_path / "out"
    reached = {
        "inferring the first slide": lambda: bool(list(out.glob("*/.mask.ome.zarr.tmp-*/0/c/*/*"))),
        "after the first slide": lambda: len(list(out.glob("*/manifest.json"))) >= 1,
        "after two slides": lambda: len(list(out.glob("*/manifest.json"))) >= 2,
    }[moment]
    log = tmp_path / "killed-run.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "slidejob", "run", *slides, "--out", str(out), *common],
                                stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not reached():
            time.sleep(0.01)
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {log.read_text()[-3000:]}"
    def running(p: psutil.Process) -> bool:
        # A worker that exited but that nobody reaped (the orphan goes to PID 1, which in some
        # containers never reaps) is a zombie: gone for our purposes, though its pid exists.
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 30
    while time.time() < deadline and any(running(p) for p in children):
        time.sleep(0.1)
    alive = [p.pid for p in children if running(p)]
    assert not alive, f"worker processes outlived the killed run: {alive}"
    done_before = {m.parent.name: m.stat().st_mtime_ns for m in out.glob("*/manifest.json")}
    rerun = run_cli("run", *slides, "--out", str(out), *common)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _results(out) == _results(clean)
    assert {m.parent.name: m.stat().st_mtime_ns for m in out.glob("*/manifest.json")
            if m.parent.name in done_before} == done_before  # skipped, not redone
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_run_interrupted_with_slides_in_flight_records_no_failure(tiny_model: Path, tmp_path: Path) -> None:
    # Ctrl-C while two slides are in flight: the command stops promptly, no slide is recorded as
    # failed because its cluster went away, nothing unfinished looks done, and a rerun completes.
    import signal
    import time

    slides = [str(write_slide(tmp_path / f"s{i}.tif", 2048, 2048, tissue_boxes=[(0, 0, 2048, 2048)],
                              cancer_boxes=[(300, 300, 900, 900)], compression="zlib").path) for i in range(4)]
    out = tmp_path / "out"
    args = ["run", *slides, "--out", str(out), "--weights", str(tiny_model), "--cluster-workers", "1",
            "--cluster-threads", "1", "--slides-in-flight", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "slidejob", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/.mask.ome.zarr.tmp-*/0/c/*/*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("slidejob run did not stop within 90 s of SIGINT")
    assert proc.returncode != 0
    manifests = [json.loads(m.read_text()) for m in out.glob("*/manifest.json")]
    assert len(manifests) < 4, "the run finished before the interrupt; nothing was tested"
    assert all(m["status"] == "ok" for m in manifests), [m["error"] for m in manifests]
    for slide_dir in out.iterdir():
        if slide_dir.is_dir() and not (slide_dir / "manifest.json").exists():
            assert not (slide_dir / "mask.ome.zarr").exists()  # nothing unfinished under a final name
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "4 of 4 slide(s) done" in rerun.stdout
    # What the interrupted process left under temporary names is gone (it is dead; the rerun is not).
    assert not [p.name for p in out.glob("*/.*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize(("value", "message"), [("1x0", "at least 1"), ("17", "at most 16"), ("big", "ROWSxCOLS")])
def test_run_rejects_a_bad_forward_chunks_before_reading_anything(tmp_path: Path, value: str, message: str) -> None:
    res = CliRunner().invoke(cli, ["run", str(tmp_path), "--out", str(tmp_path / "out"), "--forward-chunks", value])
    assert res.exit_code == 2, res.output
    assert "--forward-chunks" in res.output and message in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), (" Auto ", "auto"), ("3", "3x3"), ("1X2", "1x2")])
def test_forward_chunks_takes_auto_n_and_rxc(value: str, parsed: str) -> None:
    from slidejob.cli import _forward_chunks

    assert _forward_chunks(None, None, value) == parsed  # type: ignore[arg-type]
