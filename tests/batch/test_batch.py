"""Batch reconstruction on three tiny synthetic subjects (+ one broken copy): local pool and Ray give the same
table, a stopped run resumes without refitting, torn or stale result files are redone, a broken subject fails alone,
Ray stays on 127.0.0.1.

The fits are a few steps at 32x32 with the torch reference rasterizer (no numba compile in fresh workers), no
weight field and no AIAP term, so each job costs about two seconds plus its worker's start.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from avatar.batch import BatchConfig, read_result, run_batch
from avatar.batch.job import RESULT_FILE
from avatar.batch.table import METRIC_FIELDS
from avatar.fit.losses import LossConfig
from tests.batch.netcheck import descendants, inet_sockets

GOOD = ("subj0", "subj1", "subj2")
BROKEN = "subj_broken"
FIT = dict(backend="torch", weight_field=False, loss=LossConfig(aiap=0.0), init_color_frames=2)
STEPS = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory, anny_body):
    from avatar.data import SyntheticConfig, make_subject, write_zju

    root = tmp_path_factory.mktemp("batch_data")
    for i, name in enumerate(GOOD):
        cfg = SyntheticConfig(seed=i, motion="free", num_frames=3, width=32, height=32, rig="ring23", cameras=(4, 12),
                              shading=False, texture_size=64)
        write_zju(make_subject(cfg, anny_body), anny_body, root, name=name, progress=False)
    shutil.copytree(root / GOOD[0], root / BROKEN)
    (root / BROKEN / "Camera_B1" / "000001.jpg").write_bytes(b"this is not a jpeg")  # a training image
    return root


def _cfg(root: Path, out: Path, **kw) -> BatchConfig:
    return BatchConfig(dataset="synthetic", root=root, out=out, steps=STEPS, num_gaussians=1000, threads=1, seed=7,
                       **kw)


@pytest.fixture(scope="module")
def local_run(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch_local")
    # leftovers a killed or older run could leave: a torn result file and one of another configuration
    (out / "subjects" / "subj2").mkdir(parents=True)
    (out / "subjects" / "subj2" / RESULT_FILE).write_text('{"format": "avatar-batch-result", "vers')
    stale = {"format": "avatar-batch-result", "version": 1, "status": "ok", "subject": "subj1", "key": "0" * 16,
             "run_id": "old", "gaussians": 1, "fit_seconds": 1.0, "bundle_bytes": 1,
             "metrics": {"novel_view": {"psnr": 99.0, "ssim": 1.0}}}
    (out / "subjects" / "subj1").mkdir(parents=True)
    (out / "subjects" / "subj1" / RESULT_FILE).write_text(json.dumps(stale))
    return run_batch(_cfg(root, out, backend="local", workers=2), on_result=None, fit_kwargs=FIT)


def _metrics(result) -> dict[str, dict]:
    return {o.subject: o.record["metrics"] for o in result.outcomes if o.ok}


@pytest.mark.slow
def test_local_run_table_and_failure_isolation(local_run):
    res = local_run
    assert [o.subject for o in res.outcomes] == [*GOOD, BROKEN]
    assert not any(o.skipped for o in res.outcomes)  # the torn and the stale result were redone
    assert all(read_result(Path(o.record["log"]).parent)[0] == o.record for o in res.outcomes)
    assert res.failed == (BROKEN,) and res.exit_code == 1 and res.threads == 1 and res.workers == 2
    bad = res.outcomes[-1].record
    assert bad["status"] == "failed" and "000001.jpg" in bad["error"] and "cannot read it as an image" in bad["error"]
    assert "Traceback" in bad["traceback"] and "ValueError" in bad["traceback"]
    assert "000001.jpg" in Path(bad["log"]).read_text()  # the per-subject log holds the traceback too
    for o in res.outcomes[:3]:
        rec = o.record
        assert rec["status"] == "ok" and rec["fit_steps"] == STEPS and rec["gaussians"] == 13718  # anny's vertices
        assert set(rec["metrics"]) == {"novel_view", "novel_pose"}
        assert rec["metrics"]["novel_view"]["frames"] == 2 and rec["metrics"]["novel_pose"]["frames"] == 2
        for m in rec["metrics"].values():
            assert 8.0 < m["psnr"] < 40.0 and 0.2 < m["ssim"] < 1.0
            assert m["lpips"] is None or 0 <= m["lpips"] < 1
        # the result's metrics are the means of the per-frame numbers the evaluation wrote
        frames = json.loads((Path(rec["log"]).parent / "eval" / "metrics.json").read_text())["frames"]
        for split, m in rec["metrics"].items():
            ps = [f["psnr"] for f in frames if f["split"] == split]
            assert len(ps) == m["frames"] and math.isclose(sum(ps) / len(ps), m["psnr"], rel_tol=1e-12)
        bundle = Path(rec["log"]).parent / "avatar"
        assert rec["bundle_bytes"] == sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) > 1e6
    # the tables: every format, the mean row is the mean of the succeeded subjects
    assert {"csv", "markdown", "json", "png"} <= set(res.tables)
    rows = list(csv.DictReader(res.tables["csv"].open()))
    assert [r["subject"] for r in rows] == [*GOOD, BROKEN, "Mean"]
    for f in METRIC_FIELDS:
        if rows[0][f] == "":
            continue
        vals = [float(r[f]) for r in rows[:3]]
        assert math.isclose(float(rows[-1][f]), math.fsum(vals) / 3, rel_tol=1e-12), f
    ok = {o.subject: o.record for o in res.outcomes if o.ok}
    assert float(rows[1]["novel_pose_psnr"]) == ok["subj1"]["metrics"]["novel_pose"]["psnr"]
    assert rows[3]["status"] == "failed" and "000001.jpg" in rows[3]["error"] and rows[3]["novel_view_psnr"] == ""
    md = res.tables["markdown"].read_text()
    assert "LPIPS*↓ (x1000)" in md and "| subj_broken |" in md and "**failed**" in md and "## Failed subjects" in md
    doc = json.loads(res.tables["json"].read_text())
    assert doc["format"] == "avatar-batch-table" and len(doc["rows"]) == 4 and doc["mean"]["subject"] == "Mean"
    assert res.tables["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_ray_matches_local_and_stays_on_loopback(root, local_run, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install ray); the Ray backend is untested here")
    import os

    seen: list[list[tuple[int, str, str, int]]] = []

    def inspect(outcome, done, total):  # runs in the driver while the local Ray is up
        seen.append(inet_sockets(descendants(os.getpid())))

    res = run_batch(_cfg(root, tmp_path, backend="ray", workers=2), on_result=inspect, fit_kwargs=FIT)
    assert res.failed == (BROKEN,) and res.backend == "ray"
    assert "000001.jpg" in res.outcomes[-1].record["error"]
    local, ray_m = _metrics(local_run), _metrics(res)
    assert set(ray_m) == set(GOOD)
    for s in GOOD:
        for split in ("novel_view", "novel_pose"):
            for k in ("psnr", "ssim"):
                assert abs(ray_m[s][split][k] - local[s][split][k]) <= 1e-6, (s, split, k)
    local_rows = list(csv.DictReader(local_run.tables["csv"].open()))
    ray_rows = list(csv.DictReader(res.tables["csv"].open()))
    for a, b in zip(local_rows, ray_rows):
        assert a["subject"] == b["subject"] and a["status"] == b["status"]
        for f in METRIC_FIELDS:
            if f in ("fit_seconds",):
                continue
            assert (a[f] == b[f] == "") or abs(float(a[f]) - float(b[f])) <= 1e-6, (a["subject"], f)
    # every socket of every Ray process (GCS, raylet, workers) is on the loopback interface
    assert len(seen) == 4
    sockets = [s for snap in seen for s in snap]
    assert any(state == "LISTEN" for _, _, state, _ in sockets), "found no listening socket of the Ray processes"
    exposed = [s for s in sockets if not s[1].startswith("127.") and s[1] not in ("::1", "::ffff:127.0.0.1")]
    assert not exposed, f"Ray sockets off the loopback interface (pid, address, state, port): {exposed}"


class StopRun(Exception):
    pass


@pytest.mark.slow
def test_stopped_run_resumes_without_refitting(root, local_run, tmp_path):
    def stop_after_first(outcome, done, total):
        raise StopRun(outcome.subject)

    cfg = _cfg(root, tmp_path, backend="local", workers=1, subjects=GOOD)
    with pytest.raises(StopRun) as info:  # the run dies after its first subject; the running job is terminated
        run_batch(cfg, on_result=stop_after_first, fit_kwargs=FIT)
    first = info.value.args[0]
    done = [s for s in GOOD if (tmp_path / "subjects" / s / RESULT_FILE).exists()]
    assert done == [first]
    path = tmp_path / "subjects" / first / RESULT_FILE
    stamp, first_run = path.stat().st_mtime_ns, json.loads(path.read_text())["run_id"]

    again = run_batch(_cfg(root, tmp_path, backend="local", workers=2, subjects=GOOD), on_result=None,
                      fit_kwargs=FIT)
    assert again.exit_code == 0
    kept = {o.subject: o.skipped for o in again.outcomes}
    assert kept == {s: s == first for s in GOOD}
    assert path.stat().st_mtime_ns == stamp and json.loads(path.read_text())["run_id"] == first_run
    assert {o.record["run_id"] for o in again.outcomes if not o.skipped} == {again.run_id} != {first_run}
    assert _metrics(again) == _metrics(local_run)  # bit-identical across runs and worker counts
    on_disk = {s: json.loads((tmp_path / "subjects" / s / RESULT_FILE).read_text())["run_id"] for s in GOOD}
    assert on_disk == {s: first_run if s == first else again.run_id for s in GOOD}
    # the stopped run's worker was killed with it: it began at most the one job that was running, never another
    logs = [(tmp_path / "subjects" / s / "job.log").read_text() for s in GOOD]
    assert sum(f"run {first_run} " in log for log in logs) <= 2
