"""The summary database of an output directory: ``<out>/slidejob.sqlite``.

One SQLite file per output directory, in WAL mode so that readers (``slidejob
summary``, ``slidejob query``, the report) never block the run that writes it.
Only the client process writes (one writer); a re-run of a slide replaces its
rows in one transaction, so a slide never appears twice and never half-written.

Tables (see :data:`SLIDE_COLUMNS` and :data:`LESION_COLUMNS`)::

    schema_version(version)          one row; SCHEMA_VERSION of the writer
    slides(slide_id PRIMARY KEY, status 'ok'|'failed', error, statistics...,
           provenance: fingerprint, weights_sha256, threshold, parameters (JSON),
           slidejob_version, started_at, finished_at, duration_s)
    lesions(slide_id, lesion_id, area, bbox, centroid, diameter)  PRIMARY KEY (slide_id, lesion_id)

Lesions are 8-connected components of the level-0 mask (see :mod:`slidejob.stats`).
Areas and lengths in mm are NULL when µm/px is unknown, and every statistic is
NULL for a failed slide.  Reads go through :func:`connect_readonly`: a
``mode=ro`` connection with ``PRAGMA query_only`` and an authorizer that
allows reading only, so a user's SQL cannot change the database.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slidejob import __version__
from slidejob.errors import SlidejobError
from slidejob.stats import SIZE_CATEGORIES, Lesion, SlideStats

DB_NAME = "slidejob.sqlite"
SCHEMA_VERSION = 1
#: How long a connection waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 60

#: Statistics columns: NULL for a failed slide.
STAT_COLUMNS: dict[str, str] = {
    "height_px": "INTEGER",
    "width_px": "INTEGER",
    "mpp_um": "REAL",
    "tissue_area_px": "INTEGER",
    "tissue_area_mm2": "REAL",
    "cancer_area_px": "INTEGER",
    "cancer_area_mm2": "REAL",
    "cancer_fraction": "REAL",
    "lesion_count": "INTEGER",
    "largest_lesion_area_px": "INTEGER",
    "largest_lesion_area_mm2": "REAL",
    "largest_diameter_px": "REAL",
    "largest_diameter_mm": "REAL",
    "size_category": "TEXT",
}

SLIDE_COLUMNS: dict[str, str] = {
    "slide_id": "TEXT PRIMARY KEY",
    "status": "TEXT NOT NULL CHECK (status IN ('ok', 'failed'))",
    "error": "TEXT",
    "path": "TEXT",
    "fingerprint": "TEXT",
    **STAT_COLUMNS,
    "weights_sha256": "TEXT",
    "threshold": "REAL",
    "parameters": "TEXT",
    "slidejob_version": "TEXT",
    "started_at": "TEXT",
    "finished_at": "TEXT",
    "duration_s": "REAL",
    "recorded_at": "TEXT",
}

LESION_COLUMNS: dict[str, str] = {
    "slide_id": "TEXT NOT NULL REFERENCES slides(slide_id) ON DELETE CASCADE",
    "lesion_id": "INTEGER NOT NULL",
    "area_px": "INTEGER NOT NULL",
    "area_mm2": "REAL",
    "bbox_y0_px": "INTEGER NOT NULL",
    "bbox_x0_px": "INTEGER NOT NULL",
    "bbox_y1_px": "INTEGER NOT NULL",
    "bbox_x1_px": "INTEGER NOT NULL",
    "centroid_y_px": "REAL NOT NULL",
    "centroid_x_px": "REAL NOT NULL",
    "diameter_px": "REAL NOT NULL",
    "diameter_mm": "REAL",
}

_INDEXES = (
    "CREATE INDEX slides_status ON slides(status)",
    "CREATE INDEX slides_size_category ON slides(size_category)",
    "CREATE INDEX slides_cancer_fraction ON slides(cancer_fraction)",
    "CREATE INDEX slides_cancer_area ON slides(cancer_area_mm2)",
    "CREATE INDEX lesions_diameter ON lesions(diameter_px)",
    "CREATE INDEX lesions_area ON lesions(area_px)",
)

#: What ``slidejob summary`` shows: (column as shown, SQL expression on ``slides``).
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("slide", "slide_id"),
    ("status", "status"),
    ("tissue_mm2", "tissue_area_mm2"),
    ("cancer_mm2", "cancer_area_mm2"),
    ("fraction", "cancer_fraction"),
    ("lesions", "lesion_count"),
    ("largest_mm", "largest_diameter_mm"),
    ("category", "size_category"),
    ("error", "error"),
)


class SummaryError(SlidejobError, ValueError):
    """The summary database is missing, too new, or a query on it failed."""


class QueryRefused(SlidejobError, PermissionError):
    """A statement other than a read was offered to the read-only query path."""


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a query."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def _describe(db_path: Path, exc: sqlite3.Error) -> str:
    """One line on what is wrong with the summary database and what to do about it."""
    name = getattr(exc, "sqlite_errorname", "")  # Python >= 3.11
    text = str(exc)
    if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or "not a database" in text or "malformed" in text:
        return (f"{db_path}: not a usable summary database ({text}); it was left as it is: move it aside "
                "and run again (slides already done are recorded anew from their stats.json, not redone)")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return (f"{db_path}: locked by another process for over {BUSY_TIMEOUT_S} s ({text}); let it finish, "
                "or write to another output directory")
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) or "readonly" in text:
        return (f"{db_path}: cannot be opened for writing ({text}); check its and its directory's "
                "permissions, or write to another output directory")
    return f"{db_path}: summary database error: {text}"


@contextmanager
def _as_summary_error(db_path: Path) -> Iterator[None]:
    """sqlite's errors on the summary database as a one-line :class:`SummaryError` (the cause kept, for the
    batch's full-disk check and the log)."""
    try:
        yield
    except sqlite3.Error as exc:
        # The file or its locks (corrupt, not a database, busy, read-only, I/O); a broken
        # statement or constraint of ours (IntegrityError, ProgrammingError, and the
        # OperationalErrors sqlite raises for bad SQL) is a bug: traceback.
        ours = "no such column" in str(exc) or "syntax error" in str(exc)
        if ours or (not isinstance(exc, sqlite3.OperationalError) and type(exc) is not sqlite3.DatabaseError):
            raise
        raise SummaryError(_describe(db_path, exc)) from exc


def db_path_for(out_dir: Path) -> Path:
    """``<out_dir>/slidejob.sqlite``."""
    return Path(out_dir) / DB_NAME


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _create_schema(conn: sqlite3.Connection) -> None:
    def ddl(name: str, cols: Mapping[str, str], extra: str = "") -> str:
        body = ",\n  ".join(f"{c} {t}" for c, t in cols.items())
        return f"CREATE TABLE {name} (\n  {body}{extra}\n)"

    categories = ", ".join(f"'{c}'" for c in SIZE_CATEGORIES)
    slide_cols = dict(SLIDE_COLUMNS)
    slide_cols["size_category"] = f"TEXT CHECK (size_category IS NULL OR size_category IN ({categories}))"
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    conn.execute(ddl("slides", slide_cols))
    conn.execute(ddl("lesions", LESION_COLUMNS, ",\n  PRIMARY KEY (slide_id, lesion_id)"))
    for statement in _INDEXES:
        conn.execute(statement)


def open_database(db_path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the summary database for writing.

    The connection is in autocommit mode; writers open their own transactions
    (``BEGIN IMMEDIATE``).  Raises :class:`SummaryError` for a database written
    by a newer slidejob, or one that is not a summary database, locked for
    over :data:`BUSY_TIMEOUT_S` or cannot be written.
    """
    db_path = Path(db_path)
    with _as_summary_error(db_path):
        return _open_database(db_path)


def _open_database(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across application crashes in WAL mode; only an OS crash may lose the last commit.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not _has_schema(conn):
                # Never add our tables to somebody else's database.
                other = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' LIMIT 3").fetchall()
                if other:
                    raise _not_ours(db_path, f"it holds tables {', '.join(r[0] for r in other)}")
                _create_schema(conn)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        _check_version(conn, db_path)
    except BaseException:
        conn.close()
        raise
    return conn


#: What says which run a slide's results came from: a manifest, a database row and a stats.json agree on these.
PROVENANCE = ("fingerprint", "weights_sha256", "parameters")


def recorded_provenance(db_path: Path, slide_id: str) -> dict[str, Any] | None:
    """:data:`PROVENANCE` of ``slide_id``'s row if it is recorded as ok (parameters as a dict), else None."""
    db_path = Path(db_path)
    if not db_path.is_file():
        return None
    conn = open_database(db_path)
    try:
        with _as_summary_error(db_path):
            row = conn.execute(f"SELECT {', '.join(PROVENANCE)} FROM slides WHERE slide_id = ? AND status = 'ok'",
                               (slide_id,)).fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    found = dict(zip(PROVENANCE, row))
    found["parameters"] = json.loads(found["parameters"]) if found["parameters"] else None
    return found


def record_from_stats_json(db_path: Path, stats_path: Path, *, expect: Mapping[str, Any]) -> None:
    """Record a slide again from its ``stats.json`` (:func:`slidejob.export.write_stats_json`) as it was recorded.

    How a summary database that was lost or moved aside is rebuilt without redoing
    slides.  ``expect`` holds ``slide_id`` and :data:`PROVENANCE` as the slide's
    manifest says: a file from another run (killed between writing it and its
    manifest) is refused.  Raises ``OSError`` for a missing or unreadable file and
    ``ValueError`` for one that does not match or cannot be recorded (the
    database is then unchanged).
    """
    stats_path = Path(stats_path)
    doc = json.loads(stats_path.read_text())
    slide = doc["slide"]
    for key, value in expect.items():
        if slide.get(key) != value:
            raise ValueError(f"{stats_path}: its {key} is not the one its manifest records")
    try:
        record_slide(db_path, slide, doc["lesions"])
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError) as exc:
        raise ValueError(f"{stats_path}: cannot be recorded ({exc})") from exc


def _has_schema(conn: sqlite3.Connection) -> bool:
    return conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone() is not None


def _not_ours(db_path: Path, why: str) -> SummaryError:
    return SummaryError(f"{db_path}: an SQLite file, but not a slidejob summary database ({why}); it was left "
                        "as it is: write to another output directory")


def _check_version(conn: sqlite3.Connection, db_path: Path) -> None:
    if not _has_schema(conn):
        raise _not_ours(db_path, "no schema_version table")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    version = row[0] if row else None
    if version != SCHEMA_VERSION:
        raise SummaryError(
            f"{db_path}: summary schema version {version}, this slidejob reads version {SCHEMA_VERSION}; "
            "use the slidejob version that wrote it, or write to a new output directory"
        )


def _one_line(text: str | None, limit: int = 500) -> str | None:
    if text is None:
        return None
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _iso(t: _dt.datetime | str | None) -> str | None:
    if t is None or isinstance(t, str):
        return t
    if t.tzinfo is None:
        t = t.astimezone()
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")


def slide_record(
    *,
    slide_id: str,
    status: str,
    stats: SlideStats | None = None,
    error: str | None = None,
    slide: Mapping[str, Any] | None = None,
    weights_sha256: str | None = None,
    threshold: float | None = None,
    parameters: Mapping[str, Any] | None = None,
    started_at: _dt.datetime | None = None,
    finished_at: _dt.datetime | None = None,
    slidejob_version: str = __version__,
) -> dict[str, Any]:
    """One ``slides`` row as a dict, for :func:`record_slide` and ``stats.json``.

    Parameters
    ----------
    slide_id
        The slide's id (its output folder's name).
    status
        ``"ok"`` or ``"failed"``.
    stats
        The slide's statistics (``None`` for a failed slide).
    error
        One line saying why the slide failed (newlines are folded).
    slide
        ``SlideInfo.to_dict()``: its ``path``, ``fingerprint`` and size are recorded.
    weights_sha256, threshold, parameters
        Provenance of the mask; ``parameters`` is stored as JSON.
    started_at, finished_at
        When the slide's processing began and ended (timezone-aware; naive is
        taken as local time); stored as UTC ISO 8601 with the duration.
    """
    slide = slide or {}
    duration = (finished_at - started_at).total_seconds() if started_at and finished_at else None
    record: dict[str, Any] = {
        "slide_id": slide_id,
        "status": status,
        "error": _one_line(error),
        "path": slide.get("path"),
        "fingerprint": slide.get("fingerprint"),
        "height_px": slide.get("height_px"),
        "width_px": slide.get("width_px"),
        "mpp_um": slide.get("mpp_um"),
        "weights_sha256": weights_sha256,
        "threshold": threshold,
        "parameters": dict(parameters) if parameters is not None else None,
        "slidejob_version": slidejob_version,
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
        "duration_s": duration,
    }
    if stats is not None:
        record.update(stats.to_dict())
    return record


def _lesion_row(slide_id: str, lesion: Lesion | Mapping[str, Any]) -> tuple[Any, ...]:
    d = lesion.to_dict() if isinstance(lesion, Lesion) else dict(lesion)
    d["slide_id"] = slide_id
    return tuple(d.get(c) for c in LESION_COLUMNS)


def record_slide(
    db_path: Path, record: Mapping[str, Any], lesions: Iterable[Lesion | Mapping[str, Any]]
) -> None:
    """Write one slide's row and its lesions, replacing whatever a previous run recorded for it.

    All in one transaction: readers see the old rows or the new ones, never a
    mix, and a slide never has two rows.  A ``failed`` slide is recorded with
    every statistic NULL and no lesions.

    Parameters
    ----------
    db_path
        ``<out>/slidejob.sqlite`` (created when missing).
    record
        Columns of :data:`SLIDE_COLUMNS` (as from :func:`slide_record`);
        ``slide_id`` and ``status`` are required, ``parameters`` may be a dict.
    lesions
        :class:`~slidejob.stats.Lesion` objects or dicts with the
        :data:`LESION_COLUMNS` keys (``slide_id`` is taken from ``record``).
    """
    db_path = Path(db_path)
    unknown = set(record) - set(SLIDE_COLUMNS)
    if unknown:
        raise ValueError(
            f"{db_path}: unknown slide columns {sorted(unknown)}; expected some of {list(SLIDE_COLUMNS)}"
        )
    if not record.get("slide_id") or record.get("status") not in ("ok", "failed"):
        raise ValueError(
            f"{db_path}: a slide record needs slide_id and status 'ok' or 'failed', "
            f"got {record.get('slide_id')!r}, {record.get('status')!r}"
        )
    row = {c: record.get(c) for c in SLIDE_COLUMNS}
    if isinstance(row["parameters"], Mapping):
        row["parameters"] = json.dumps(row["parameters"], sort_keys=True)
    row["error"] = _one_line(row["error"])
    row["recorded_at"] = _iso(_dt.datetime.now(_dt.timezone.utc))
    lesion_rows: list[tuple[Any, ...]] = []
    if row["status"] == "failed":
        for c in STAT_COLUMNS:
            if c not in ("height_px", "width_px", "mpp_um"):
                row[c] = None
    else:
        lesion_rows = [_lesion_row(str(row["slide_id"]), les) for les in lesions]

    conn = open_database(db_path)
    try:
        with _as_summary_error(db_path):
            _replace_slide(conn, row, lesion_rows)
    finally:
        conn.close()


def _replace_slide(conn: sqlite3.Connection, row: Mapping[str, Any], lesion_rows: list[tuple[Any, ...]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM lesions WHERE slide_id = ?", (row["slide_id"],))
        conn.execute("DELETE FROM slides WHERE slide_id = ?", (row["slide_id"],))
        cols, lcols = list(SLIDE_COLUMNS), list(LESION_COLUMNS)
        conn.execute(
            f"INSERT INTO slides ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [row[c] for c in cols],
        )
        conn.executemany(
            f"INSERT INTO lesions ({', '.join(lcols)}) VALUES ({', '.join('?' * len(lcols))})",
            lesion_rows,
        )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    # After a full disk or an I/O error sqlite has already rolled back; a ROLLBACK then would fail
    # with "no transaction is active" and hide the error that matters.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


# --------------------------------------------------------------------------------------------------------
# Reading (read-only)
# --------------------------------------------------------------------------------------------------------

#: PRAGMAs that only read the schema; every other PRAGMA is refused on the read path.
_READ_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
_READ_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        getattr(sqlite3, "SQLITE_RECURSIVE", 33),
    }
)


class _ReadOnlyGuard:
    """SQLite authorizer that allows reading only, and remembers what it refused."""

    def __init__(self) -> None:
        self.refused: str | None = None

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None
    ) -> int:
        if action in _READ_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and arg1 and arg1.lower() in _READ_PRAGMAS:
            return sqlite3.SQLITE_OK
        self.refused = self.refused or _ACTION_NAMES.get(action, f"action {action}")
        return sqlite3.SQLITE_DENY


_ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{name.upper().replace(' ', '_')}"): name
    for name in (
        "insert",
        "update",
        "delete",
        "create table",
        "create index",
        "create view",
        "create trigger",
        "create temp table",
        "create temp index",
        "create temp view",
        "create temp trigger",
        "drop table",
        "drop index",
        "drop view",
        "drop trigger",
        "alter table",
        "attach",
        "detach",
        "pragma",
        "transaction",
        "savepoint",
        "reindex",
        "analyze",
        "create vtable",
        "drop vtable",
    )
    if hasattr(sqlite3, f"SQLITE_{name.upper().replace(' ', '_')}")
}


def connect_readonly(db_path: Path) -> tuple[sqlite3.Connection, _ReadOnlyGuard]:
    """A read-only connection: ``mode=ro`` URI, ``PRAGMA query_only`` and a read-only authorizer."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise SummaryError(
            f"{db_path}: no summary database here; point at an output directory of `slidejob run`"
        )
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    with _as_summary_error(db_path):
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        with _as_summary_error(db_path):
            conn.execute("PRAGMA query_only = ON")
            _check_version(conn, db_path)
    except BaseException:
        conn.close()
        raise
    guard = _ReadOnlyGuard()
    conn.set_authorizer(guard)
    return conn, guard


def query(db_path: Path, sql: str, params: Sequence[Any] = ()) -> QueryResult:
    """Run one read-only SQL statement; anything that would write is refused.

    Raises :class:`QueryRefused` for a write (INSERT, UPDATE, DELETE, DDL,
    ATTACH, a writing PRAGMA, …) and :class:`SummaryError` for bad SQL.
    """
    db_path = Path(db_path)
    conn, guard = connect_readonly(db_path)
    try:
        try:
            cur = conn.execute(sql, params)
            rows = cur.fetchall()
        except (sqlite3.DatabaseError, sqlite3.Warning) as exc:
            statement = _one_line(sql, 80)
            if guard.refused or "readonly" in str(exc) or "read-only" in str(exc):
                raise QueryRefused(
                    f"{db_path}: read-only; refused {guard.refused or 'a write'} in: {statement} "
                    "(only SELECT / WITH … SELECT may run here)"
                ) from None
            raise SummaryError(f"{db_path}: SQL error: {exc} in: {statement}") from None
        columns = tuple(d[0] for d in cur.description or ())
        return QueryResult(columns=columns, rows=rows)
    finally:
        conn.close()


def _order_by(sort: str | None) -> str:
    """ORDER BY clause from ``COLUMN``, ``-COLUMN`` or ``COLUMN desc``; NULLs last.

    >>> _order_by("-cancer_mm2")
    'ORDER BY cancer_area_mm2 IS NULL, cancer_area_mm2 DESC, slide_id'
    """
    if not sort:
        return "ORDER BY slide_id"
    text = sort.strip()
    descending = text.startswith("-")
    words = text.lstrip("-").split()
    if len(words) == 2 and words[1].lower() in ("asc", "desc"):
        descending = words[1].lower() == "desc"
        words = words[:1]
    aliases = dict(SUMMARY_COLUMNS)
    name = words[0] if len(words) == 1 else ""
    column = aliases.get(name, name)
    if column not in SLIDE_COLUMNS:
        raise SummaryError(
            f"cannot sort by {sort!r}: expected a column, optionally prefixed with '-' for descending: "
            f"{', '.join(list(aliases) + [c for c in SLIDE_COLUMNS if c not in aliases.values()])}"
        )
    return f"ORDER BY {column} IS NULL, {column}{' DESC' if descending else ''}, slide_id"


def summary(
    db_path: Path, *, where: str | None = None, sort: str | None = None, limit: int | None = None
) -> QueryResult:
    """The per-slide summary table (:data:`SUMMARY_COLUMNS`), read-only.

    Parameters
    ----------
    where
        An SQL expression on the columns of ``slides``, e.g.
        ``"status = 'ok' AND cancer_area_mm2 > 1"``.
    sort
        A column (``slides`` column or summary name), ``-`` prefix or ``desc``
        suffix for descending; NULLs sort last.
    limit
        At most this many slides.
    """
    select = ", ".join(f"{expr} AS {name}" for name, expr in SUMMARY_COLUMNS)
    sql = f"SELECT {select} FROM slides"
    if where:
        sql += f" WHERE ({where})"
    sql += " " + _order_by(sort)
    params: list[Any] = []
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return query(db_path, sql, params)


def slide_detail(db_path: Path, slide_id: str) -> tuple[dict[str, Any], QueryResult]:
    """One slide's full row and its lesions (largest first)."""
    rows = query(db_path, "SELECT * FROM slides WHERE slide_id = ?", (slide_id,)).records()
    if not rows:
        raise SummaryError(f"{db_path}: no slide {slide_id!r}; `slidejob summary` lists the slides")
    lesions = query(
        db_path,
        f"SELECT {', '.join(c for c in LESION_COLUMNS if c != 'slide_id')} FROM lesions "
        "WHERE slide_id = ? ORDER BY area_px DESC, lesion_id",
        (slide_id,),
    )
    return rows[0], lesions


# --------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A value as shown to a person (NULL as '-', floats to 4 significant digits).

    >>> [format_value(v) for v in (None, 3, 0.012345, 12.3456, 123456.7, "x")]
    ['-', '3', '0.01235', '12.35', '123457', 'x']
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def format_table(result: QueryResult) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    cells = [[format_value(v) for v in row] for row in result.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(result.columns)]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in result.rows) and result.rows
        for i in range(len(result.columns))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    out = [line(result.columns), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def format_csv(result: QueryResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(result.columns)
    writer.writerows(result.rows)
    return buf.getvalue()


def format_json(result: QueryResult) -> str:
    return json.dumps(result.records(), indent=2, ensure_ascii=False)


def format_result(result: QueryResult, fmt: str) -> str:
    """``table``, ``csv`` or ``json``."""
    formatters = {"table": format_table, "csv": format_csv, "json": format_json}
    if fmt not in formatters:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(formatters)}")
    return formatters[fmt](result)
