"""`slidejob summary`, `query` and `report` on an output directory."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_export import SLIDES, make_output_dir

from slidejob.cli import cli


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_output_dir(tmp_path_factory.mktemp("out"))


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_help_has_examples() -> None:
    for cmd in ("summary", "query", "report"):
        code, out, _ = run(cmd, "--help")
        assert code == 0 and "Examples:" in out, cmd


def test_summary_table(out_dir: Path) -> None:
    code, out, _ = run("summary", str(out_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "slide",
        "status",
        "tissue_mm2",
        "cancer_mm2",
        "fraction",
        "lesions",
        "largest_mm",
        "category",
        "error",
    ]
    assert [line.split()[0] for line in lines[2:]] == list(SLIDES)
    assert "cannot decode tile 3" in out


def test_summary_where_sort_limit_csv(out_dir: Path) -> None:
    code, out, _ = run(
        "summary",
        str(out_dir),
        "--where",
        "status = 'ok'",
        "--sort",
        "-cancer_mm2",
        "--limit",
        "2",
        "--format",
        "csv",
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["slide"] for r in rows] == ["d-big", "a-small"]
    assert float(rows[0]["cancer_mm2"]) == pytest.approx(200 * 200 * 0.5e-3**2)


def test_summary_json_parses(out_dir: Path) -> None:
    code, out, _ = run("summary", str(out_dir), "--format", "json")
    assert code == 0
    records = json.loads(out)
    assert {r["slide"]: r["status"] for r in records} == {
        s: "failed" if side is None else "ok" for s, side in SLIDES.items()
    }


def test_summary_one_slide_with_lesions(out_dir: Path) -> None:
    code, out, _ = run("summary", str(out_dir), "--slide", "d-big", "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["slide"]["slide_id"] == "d-big" and doc["slide"]["weights_sha256"] == "0" * 64
    assert [les["area_px"] for les in doc["lesions"]] == [200 * 200]
    code, out, _ = run("summary", str(out_dir), "--slide", "d-big")
    assert code == 0 and "lesions (1, largest first)" in out and "fingerprint" in out
    code, _, err = run("summary", str(out_dir), "--slide", "nope")
    assert code != 0 and err.count("\n") == 1 and "no slide 'nope'" in err
    code, _, err = run("summary", str(out_dir), "--slide", "d-big", "--limit", "1")
    assert code == 2


def test_bad_sort_and_bad_where_are_one_line(out_dir: Path) -> None:
    code, _, err = run("summary", str(out_dir), "--sort", "colour")
    assert code != 0 and err.count("\n") == 1 and "cannot sort by 'colour'" in err
    code, _, err = run("summary", str(out_dir), "--where", "1); DELETE FROM slides; --")
    assert code != 0 and err.count("\n") == 1


def test_query_reads(out_dir: Path) -> None:
    code, out, _ = run(
        "query", str(out_dir), "SELECT slide_id, lesion_count FROM slides ORDER BY 1", "--format", "json"
    )
    assert code == 0
    assert [r["slide_id"] for r in json.loads(out)] == list(SLIDES)


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM slides",
        "DROP TABLE lesions",
        "UPDATE slides SET status = 'ok'",
        "PRAGMA journal_mode = DELETE",
    ],
)
def test_query_refuses_writes_with_one_line(out_dir: Path, sql: str) -> None:
    code, out, err = run("query", str(out_dir), sql)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("slidejob: error: ") and "read-only" in err
    assert "slidejob.sqlite" in err
    code, out, _ = run("query", str(out_dir), "SELECT count(*) AS n FROM slides", "--format", "csv")
    assert out == f"n\n{len(SLIDES)}\n"


def test_query_without_database(tmp_path: Path) -> None:
    code, _, err = run("query", str(tmp_path), "SELECT 1")
    assert code != 0 and err.count("\n") == 1 and "no summary database" in err


def test_report_rewrites_the_page(out_dir: Path) -> None:
    page = out_dir / "report.html"
    page.unlink()
    code, out, _ = run("report", str(out_dir))
    assert code == 0 and out.strip() == f"wrote {page}"
    assert "d-big" in page.read_text()
