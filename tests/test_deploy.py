"""deploy/: the SLURM batch script, run on the real scheduler from ../shared/cluster/slurm-up.sh."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slidejob.synthetic import write_slide

SBATCH_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "slidejob-run.sbatch"


def _slurm_ready() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found (start SLURM with ../shared/cluster/slurm-up.sh)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0 or not any(s in proc.stdout for s in ("idle", "mixed", "alloc")):
        return f"no SLURM node is up (sinfo: {proc.stdout.strip() or proc.stderr.strip()})"
    return None


def test_sbatch_script_text() -> None:
    text = SBATCH_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "#SBATCH --job-name=slidejob" in text
    assert 'run "$SLIDES" --out "$OUT"' in text and "exec" in text


@pytest.mark.slurm
@pytest.mark.slow
def test_batch_runs_as_a_slurm_job(tiny_model: Path, tmp_path: Path) -> None:
    reason = _slurm_ready()
    if reason:
        pytest.skip(reason)
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "a.tif", 900, 900, tissue_boxes=[(0, 0, 900, 900)], cancer_boxes=[(100, 100, 500, 500)])
    (slides / "broken.svs").write_bytes(b"not a slide")
    out = tmp_path / "out"
    slidejob = Path(sys.executable).with_name("slidejob")
    proc = subprocess.run(
        ["sbatch", "--wait", "--cpus-per-task=2", "--mem=4G", f"--output={tmp_path}/job-%j.log",
         f"--export=ALL,SLIDES={slides},OUT={out},SLIDEJOB={slidejob},EXTRA=--weights {tiny_model}",
         str(SBATCH_SCRIPT)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.log"))
    # One slide failed, so the job exits 1 — something a scheduler can act on — and the good one is done.
    assert proc.returncode == 1, proc.stdout + proc.stderr + log
    manifests = {m.parent.name.split("-")[0]: json.loads(m.read_text()) for m in out.glob("*/manifest.json")}
    assert manifests["a"]["status"] == "ok" and manifests["broken"]["status"] == "failed"
    assert "1 of 2 slide(s) done" in log
