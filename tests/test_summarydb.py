"""The summary database: schema, replace-on-rerun, the read-only guard, parseable output."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from slidejob import summarydb
from slidejob.stats import merge_partials, partial_from_array
from slidejob.summarydb import QueryRefused, SummaryError

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def slide_stats(n_lesions: int, mpp_um: float | None = 0.25):  # type: ignore[no-untyped-def]
    mask = np.zeros((40, 40 * max(n_lesions, 1)), np.uint8)
    for i in range(n_lesions):
        mask[5 : 10 + i, 40 * i + 5 : 40 * i + 20] = 1
    part = partial_from_array(mask, 0, 0)
    return merge_partials(
        [part], height_px=mask.shape[0], width_px=mask.shape[1], mpp_um=mpp_um, tissue_area_px=mask.size / 2
    )


def ok_record(slide_id: str, stats, **extra):  # type: ignore[no-untyped-def]
    return summarydb.slide_record(
        slide_id=slide_id,
        status="ok",
        stats=stats,
        slide={
            "path": f"/data/{slide_id}.svs",
            "fingerprint": "ab" * 8,
            "height_px": stats.height_px,
            "width_px": stats.width_px,
            "mpp_um": stats.mpp_um,
        },
        weights_sha256="c" * 64,
        threshold=0.5,
        parameters={"tile_overlap_px": 64, "model": "unet"},
        started_at=T0,
        finished_at=T0 + dt.timedelta(seconds=12.5),
        **extra,
    )


def failed_record(slide_id: str) -> dict[str, object]:
    return summarydb.slide_record(
        slide_id=slide_id,
        status="failed",
        error="corrupt tile at level 0\n  (JPEG decoder)",
        slide={"path": f"/data/{slide_id}.svs"},
        weights_sha256="c" * 64,
        threshold=0.5,
        parameters={},
        started_at=T0,
        finished_at=T0 + dt.timedelta(seconds=1),
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / summarydb.DB_NAME
    a = slide_stats(3)
    summarydb.record_slide(path, ok_record("a", a), a.lesions)
    b = slide_stats(0)
    summarydb.record_slide(path, ok_record("b", b), b.lesions)
    summarydb.record_slide(path, failed_record("c"), [])
    return path


def test_schema(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(summarydb.SCHEMA_VERSION,)]
        slides = [r[1] for r in conn.execute("PRAGMA table_info(slides)")]
        lesions = [r[1] for r in conn.execute("PRAGMA table_info(lesions)")]
        assert slides == list(summarydb.SLIDE_COLUMNS)
        assert lesions == list(summarydb.LESION_COLUMNS)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"slides_status", "slides_size_category", "lesions_diameter"} <= indexes
        row = dict(zip(slides, conn.execute("SELECT * FROM slides WHERE slide_id = 'a'").fetchone()))
    finally:
        conn.close()
    assert row["status"] == "ok" and row["lesion_count"] == 3 and row["size_category"] == "itc"
    assert row["fingerprint"] == "ab" * 8 and row["weights_sha256"] == "c" * 64 and row["threshold"] == 0.5
    assert json.loads(row["parameters"]) == {"model": "unet", "tile_overlap_px": 64}
    assert row["started_at"] == "2026-01-02T03:04:05.000+00:00" and row["duration_s"] == 12.5
    assert row["slidejob_version"] and row["recorded_at"]


def test_failed_slide_has_null_statistics_and_one_line_error(db: Path) -> None:
    (row,) = summarydb.query(db, "SELECT * FROM slides WHERE slide_id = 'c'").records()
    assert row["status"] == "failed"
    assert row["error"] == "corrupt tile at level 0 (JPEG decoder)"
    assert all(row[c] is None for c in ("cancer_area_px", "lesion_count", "size_category", "cancer_fraction"))
    assert summarydb.query(db, "SELECT count(*) FROM lesions WHERE slide_id = 'c'").rows == [(0,)]


def test_rerun_replaces_rows_never_duplicates(db: Path) -> None:
    assert summarydb.query(db, "SELECT count(*) FROM lesions WHERE slide_id = 'a'").rows == [(3,)]
    again = slide_stats(2)
    summarydb.record_slide(db, ok_record("a", again), again.lesions)
    summarydb.record_slide(db, ok_record("a", again), again.lesions)
    assert summarydb.query(db, "SELECT count(*) FROM slides WHERE slide_id = 'a'").rows == [(1,)]
    assert summarydb.query(db, "SELECT count(*) FROM lesions WHERE slide_id = 'a'").rows == [(2,)]
    # A slide that failed on re-run loses its old lesions too.
    summarydb.record_slide(db, failed_record("a"), again.lesions)
    assert summarydb.query(db, "SELECT status, lesion_count FROM slides WHERE slide_id = 'a'").rows == [
        ("failed", None)
    ]
    assert summarydb.query(db, "SELECT count(*) FROM lesions WHERE slide_id = 'a'").rows == [(0,)]
    assert summarydb.query(db, "SELECT count(*) FROM slides").rows == [(3,)]


def test_a_failed_write_leaves_the_old_rows(db: Path) -> None:
    bad = [les.to_dict() for les in slide_stats(2).lesions]
    bad[1]["area_px"] = None  # NOT NULL: the insert fails after the deletes
    with pytest.raises(sqlite3.IntegrityError):
        summarydb.record_slide(db, ok_record("a", slide_stats(2)), bad)
    assert summarydb.query(db, "SELECT count(*) FROM lesions WHERE slide_id = 'a'").rows == [(3,)]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO slides (slide_id, status) VALUES ('x', 'ok')",
        "UPDATE slides SET status = 'failed'",
        "DELETE FROM lesions",
        "DROP TABLE slides",
        "CREATE TABLE t (a)",
        "ATTACH DATABASE 'other.sqlite' AS other",
        "PRAGMA journal_mode = DELETE",
        "PRAGMA query_only = OFF",
        "WITH x AS (SELECT 1) DELETE FROM slides",
        "SELECT 1; DELETE FROM slides",
    ],
)
def test_read_only_guard_refuses_writes(db: Path, sql: str) -> None:
    before = summarydb.query(db, "SELECT count(*) FROM slides").rows
    with pytest.raises((QueryRefused, SummaryError)) as err:
        summarydb.query(db, sql)
    assert "\n" not in str(err.value) and str(db) in str(err.value)
    assert summarydb.query(db, "SELECT count(*) FROM slides").rows == before == [(3,)]
    assert not (db.parent / "other.sqlite").exists()


def test_write_statements_are_refused_as_such(db: Path) -> None:
    with pytest.raises(QueryRefused, match="refused delete"):
        summarydb.query(db, "DELETE FROM lesions")


def test_reads_are_allowed(db: Path) -> None:
    res = summarydb.query(
        db,
        "WITH big AS (SELECT slide_id, max(area_px) AS a FROM lesions GROUP BY slide_id) "
        "SELECT s.slide_id, b.a FROM slides s LEFT JOIN big b USING (slide_id) ORDER BY 1",
    )
    assert res.columns == ("slide_id", "a") and [r[0] for r in res.rows] == ["a", "b", "c"]
    assert summarydb.query(db, "PRAGMA table_info(lesions)").rows
    with pytest.raises(SummaryError, match="SQL error"):
        summarydb.query(db, "SELEC 1")


def test_summary_where_sort_limit(db: Path) -> None:
    res = summarydb.summary(db, sort="-lesions")
    assert [r["slide"] for r in res.records()] == ["a", "b", "c"]  # NULL (failed) last
    res = summarydb.summary(db, where="status = 'ok'", sort="slide_id desc", limit=1)
    assert [r["slide"] for r in res.records()] == ["b"]
    assert res.columns == tuple(name for name, _ in summarydb.SUMMARY_COLUMNS)
    with pytest.raises(SummaryError, match="cannot sort"):
        summarydb.summary(db, sort="slide_id; DROP TABLE slides")


def test_csv_and_json_parse_back(db: Path) -> None:
    res = summarydb.summary(db)
    rows = list(csv.DictReader(io.StringIO(summarydb.format_result(res, "csv"))))
    assert [r["slide"] for r in rows] == ["a", "b", "c"]
    assert float(rows[0]["cancer_mm2"]) == pytest.approx(res.records()[0]["cancer_mm2"])
    records = json.loads(summarydb.format_result(res, "json"))
    assert records == res.records()
    table = summarydb.format_result(res, "table").splitlines()
    assert table[0].split()[:3] == ["slide", "status", "tissue_mm2"] and len(table) == 2 + 3


def test_unknown_mpp_stored_as_null(tmp_path: Path) -> None:
    db = tmp_path / summarydb.DB_NAME
    stats = slide_stats(1, mpp_um=None)
    summarydb.record_slide(db, ok_record("n", stats), stats.lesions)
    (row,) = summarydb.query(db, "SELECT cancer_area_px, cancer_area_mm2, size_category FROM slides").rows
    assert row[0] > 0 and row[1] is None and row[2] is None
    assert summarydb.query(db, "SELECT count(*) FROM lesions WHERE area_mm2 IS NULL").rows == [(1,)]


def test_newer_schema_is_refused(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(SummaryError, match="schema version 99"):
        summarydb.summary(db)
    with pytest.raises(SummaryError, match="schema version 99"):
        summarydb.record_slide(db, failed_record("d"), [])


def test_missing_database_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(SummaryError, match="slidejob.sqlite: no summary database"):
        summarydb.summary(tmp_path / summarydb.DB_NAME)


def test_a_corrupt_database_is_named_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / summarydb.DB_NAME
    junk = b"SQLite format 3\x00" + bytes(range(256)) * 8  # a header, then garbage
    path.write_bytes(junk)
    for reading in (lambda: summarydb.summary(path), lambda: summarydb.query(path, "SELECT 1")):
        with pytest.raises(SummaryError, match=f"^{path}: not a usable summary database .*move it aside"):
            reading()
    with pytest.raises(SummaryError, match=f"^{path}: not a usable summary database"):
        summarydb.record_slide(path, failed_record("a"), [])
    assert path.read_bytes() == junk


def test_another_programs_sqlite_file_is_refused_not_added_to(tmp_path: Path) -> None:
    path = tmp_path / summarydb.DB_NAME
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE patients (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(SummaryError, match="not a slidejob summary database .*patients"):
        summarydb.record_slide(path, failed_record("a"), [])
    with pytest.raises(SummaryError, match="not a slidejob summary database"):
        summarydb.summary(path)
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["patients"]
    conn.close()


def test_a_database_locked_too_long_is_one_line(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(summarydb, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(SummaryError, match=f"^{db}: locked by another process for over 0.2 s"):
            summarydb.record_slide(db, failed_record("d"), [])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    summarydb.record_slide(db, failed_record("d"), [])  # and fine once it is free


def test_a_slide_is_recorded_again_from_its_stats_json(db: Path, tmp_path: Path) -> None:
    from slidejob.export import write_stats_json

    a = slide_stats(3)
    stats_json = write_stats_json(tmp_path / "stats.json", ok_record("a", a), a.lesions)
    sql = "SELECT * FROM slides WHERE slide_id = 'a'"
    before = summarydb.query(db, sql).records()[0]
    lesions = summarydb.query(db, "SELECT * FROM lesions ORDER BY lesion_id").rows
    fresh = tmp_path / "fresh" / summarydb.DB_NAME
    fresh.parent.mkdir()
    provenance = {"fingerprint": "ab" * 8, "weights_sha256": "c" * 64,
                  "parameters": {"tile_overlap_px": 64, "model": "unet"}}
    assert summarydb.recorded_provenance(fresh, "a") is None
    # A stats.json of another run than the manifest's (other parameters) is refused, nothing recorded.
    with pytest.raises(ValueError, match="stats.json: its parameters is not the one its manifest records"):
        summarydb.record_from_stats_json(fresh, stats_json,
                                         expect={"slide_id": "a", **provenance, "parameters": {"model": "x"}})
    assert summarydb.recorded_provenance(fresh, "a") is None
    summarydb.record_from_stats_json(fresh, stats_json, expect={"slide_id": "a", **provenance})
    after = summarydb.query(fresh, sql).records()[0]
    assert {k: v for k, v in after.items() if k != "recorded_at"} == \
        {k: v for k, v in before.items() if k != "recorded_at"}
    assert summarydb.query(fresh, "SELECT * FROM lesions ORDER BY lesion_id").rows == lesions
    assert summarydb.recorded_provenance(fresh, "a") == provenance


def test_a_stats_json_that_cannot_be_recorded_is_a_value_error_and_changes_nothing(db: Path, tmp_path: Path) -> None:
    from slidejob.export import write_stats_json

    a = slide_stats(2)
    lesions = [les.to_dict() for les in a.lesions]
    lesions[1]["lesion_id"] = lesions[0]["lesion_id"]  # a duplicate: the database's key refuses it
    stats_json = write_stats_json(tmp_path / "stats.json", ok_record("a", a), lesions)
    rows = summarydb.query(db, "SELECT * FROM lesions ORDER BY lesion_id").rows
    with pytest.raises(ValueError, match="stats.json: cannot be recorded"):
        summarydb.record_from_stats_json(db, stats_json, expect={"slide_id": "a"})
    assert summarydb.query(db, "SELECT * FROM lesions ORDER BY lesion_id").rows == rows


def test_our_own_sql_mistakes_keep_their_traceback(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        with pytest.raises(sqlite3.OperationalError, match="no such column"), summarydb._as_summary_error(db):
            conn.execute("SELECT colour FROM slides")
    finally:
        conn.close()


def test_bad_record_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown slide columns"):
        summarydb.record_slide(tmp_path / "x.sqlite", {"slide_id": "a", "status": "ok", "colour": 1}, [])
    with pytest.raises(ValueError, match="status"):
        summarydb.record_slide(tmp_path / "x.sqlite", {"slide_id": "a", "status": "done"}, [])
