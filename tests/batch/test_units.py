"""Fast pieces of the batch package: discovery, protocols, split rule, result validation, tables, the parallelism
rule, the CLI's errors and the socket checker the Ray test relies on."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from avatar.batch import BatchConfig, SubjectJob, find_subjects, resolve_protocol, select_subjects, synthetic_splits
from avatar.batch.backends import parallelism
from avatar.batch.discover import Subject
from avatar.batch.job import failed_record, read_result, write_result
from avatar.batch.table import mean_row, row_of, table_csv, table_markdown, write_tables
from tests.batch.netcheck import decode_address, inet_sockets


def _mk(root: Path, name: str, *files: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_bytes(b"")
    return d


def test_discovery_per_dataset(tmp_path):
    _mk(tmp_path, "CoreView_386", "annots.npy")
    _mk(tmp_path, "CoreView_377", "annots.npy")
    _mk(tmp_path, "my_377", "annots.npy")
    _mk(tmp_path, "CoreView_392")  # no annots.npy: not a subject
    _mk(tmp_path, "female-3-casual", "camera.pkl")
    _mk(tmp_path, "male-3-casual", "cameras.npz")
    _mk(tmp_path, "synth_a", "annots.npy", "body_model.json")
    zju = find_subjects("zju_mocap", tmp_path)
    assert [(s.id, s.folder.name) for s in zju] == [("377", "my_377"), ("386", "CoreView_386")]
    assert [s.id for s in find_subjects("peoplesnapshot", tmp_path)] == ["female-3-casual", "male-3-casual"]
    assert [s.id for s in find_subjects("synthetic", tmp_path)] == ["synth_a"]
    assert [s.id for s in select_subjects("zju_mocap", tmp_path, ["386", "my_377"])] == ["386", "377"]
    with pytest.raises(ValueError, match=r"unknown zju_mocap subject\(s\) 394; found: 377, 386"):
        select_subjects("zju_mocap", tmp_path, ["377", "394"])
    with pytest.raises(FileNotFoundError, match="nowhere: no such dataset root"):
        find_subjects("synthetic", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no peoplesnapshot subject folders found"):
        select_subjects("peoplesnapshot", tmp_path / "empty")


def test_protocol_resolution():
    s = Subject("377", Path("CoreView_377"))
    assert resolve_protocol("zju_mocap", None, s) == "zju_monocular"
    assert resolve_protocol("zju_mocap", "gauhuman", s) == "zju_monocular"
    assert resolve_protocol("zju_mocap", "zju_multiview", s) == "zju_multiview"
    p = Subject("male-3-casual", Path("male-3-casual"))
    assert resolve_protocol("peoplesnapshot", None, p) == resolve_protocol("peoplesnapshot", "gart", p) \
        == "peoplesnapshot/male-3-casual"
    assert resolve_protocol("synthetic", None, s) == "synthetic"
    assert resolve_protocol("synthetic", "zju_multiview", s) == "zju_multiview"
    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        resolve_protocol("zju_mocap", "nope", s)
    with pytest.raises(ValueError, match="is for peoplesnapshot, not zju_mocap"):
        resolve_protocol("zju_mocap", "peoplesnapshot/male-3-casual", s)


def test_synthetic_split_rule():
    r = synthetic_splits(10, 3)
    assert r["train"] == (tuple(range(8)), (0,))
    assert r["novel_view"] == ((0, 1, 2, 3, 4, 5, 6, 7), (1, 2))
    assert r["novel_pose"] == ((8, 9), (0, 1, 2))
    assert set(synthetic_splits(5, 1)) == {"train", "novel_pose"}  # one camera: no novel view
    with pytest.raises(ValueError, match="at least 2 frames"):
        synthetic_splits(1, 2)


def _job(tmp_path, **kw) -> SubjectJob:
    args = dict(subject_id="a", folder=str(tmp_path), dataset="synthetic", protocol="synthetic",
                out_dir=str(tmp_path / "out"), preset="fast", fit_overrides=(("seed", 0),), seed=0, crop="none",
                threads=1, device=None, smpl_dir=None, export=True, run_id="r1")
    return SubjectJob(**(args | kw))


def _ok(job: SubjectJob, nv: float, np_: float, lp: float | None = None) -> dict:
    return {"format": "avatar-batch-result", "version": 1, "status": "ok", "subject": job.subject_id, "key": job.key,
            "run_id": job.run_id, "gaussians": 100, "fit_seconds": 2.0, "bundle_bytes": 2_000_000,
            "metrics": {"novel_view": {"psnr": nv, "ssim": 0.9, "lpips": lp, "frames": 3},
                        "novel_pose": {"psnr": np_, "ssim": 0.8, "lpips": lp, "frames": 2}}}


def test_result_validation(tmp_path):
    job = _job(tmp_path)
    assert read_result(job.out_dir) == (None, "no result")
    write_result(job.out_dir, _ok(job, 30.0, 28.0))
    rec, why = read_result(job.out_dir, job.key)
    assert why == "" and rec["metrics"]["novel_view"]["psnr"] == 30.0
    # the key follows what decides the result, not where or when it runs
    assert _job(tmp_path, run_id="r2", threads=4).key == job.key != _job(tmp_path, seed=1).key
    assert "another configuration" in read_result(job.out_dir, _job(tmp_path, seed=1).key)[1]
    path = Path(job.out_dir) / "result.json"
    path.write_text('{"status": "ok", "metr')
    assert "corrupt (JSONDecodeError" in read_result(job.out_dir)[1]
    bad = _ok(job, 30.0, 28.0)
    bad["metrics"]["novel_pose"]["psnr"] = "high"
    write_result(job.out_dir, bad)
    assert "lacks numeric psnr" in read_result(job.out_dir)[1]
    del bad["bundle_bytes"]
    write_result(job.out_dir, bad)
    assert "incomplete" in read_result(job.out_dir)[1]
    try:
        raise ValueError("x.jpg: cannot read it")
    except ValueError as err:
        import traceback

        f = failed_record(job, err, traceback.format_exc())
    write_result(job.out_dir, f)
    rec, why = read_result(job.out_dir, job.key)
    assert rec["status"] == "failed" and rec["error"] == "ValueError: x.jpg: cannot read it"
    assert rec["traceback"].splitlines()[-1] == "ValueError: x.jpg: cannot read it"


def test_tables(tmp_path):
    jobs = [_job(tmp_path, subject_id=s) for s in ("377", "386", "387")]
    recs = [_ok(jobs[0], 30.0, 28.0, 0.05), _ok(jobs[1], 32.0, 27.0, 0.03),
            failed_record(jobs[2], "ValueError: broken")]
    rows = [row_of(r) for r in recs]
    assert rows[0].novel_view_lpips_x1000 == pytest.approx(50.0) and rows[0].size_mb == 2.0
    m = mean_row(rows)
    assert m.novel_view_psnr == 31.0 and m.novel_pose_psnr == 27.5 and m.novel_view_lpips_x1000 == pytest.approx(40.0)
    assert m.error == "1 failed"
    md = table_markdown(rows + [m], "t", ["a note"])
    assert "| 377 | 30.00 | 0.9000 | 50.0 | 28.00 | 0.8000 | 50.0 | 2.0 | 100 | 2.00 | ok |" in md
    assert "| **Mean** | 31.00 |" in md and "| Novel view PSNR↑ | 30.00 | 32.00 | n/a | 31.00 |" in md
    assert "- **387**: `ValueError: broken`" in md
    csv_text = table_csv(rows + [m])
    assert csv_text.splitlines()[3].startswith("387,failed,,,,,,,,,,ValueError: broken")
    no_lpips = [_ok(jobs[0], 30.0, 28.0), _ok(jobs[1], 32.0, 27.0)]
    paths = write_tables(no_lpips, tmp_path / "t", "title", ["LPIPS unavailable: no weights"], {"seed": 0})
    doc = json.loads(paths["json"].read_text())
    assert doc["mean"]["novel_view_lpips_x1000"] is None and doc["seed"] == 0
    assert "| n/a |" in paths["markdown"].read_text()
    if "png" in paths:
        assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_parallelism_rule():
    cores = len(os.sched_getaffinity(0))
    assert parallelism(2, None, 1.0) == (2, max(1, cores // 2))
    assert parallelism(3, 2, 1.0) == (3, 2)
    w, t = parallelism(None, None, 1e6)  # a job larger than the memory: one worker with every core
    assert (w, t) == (1, cores)
    w, t = parallelism(None, None, 1e-3)
    assert w == cores and t == 1


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        BatchConfig(dataset="nope", root=tmp_path, out=tmp_path).validate()
    with pytest.raises(ValueError, match="workers must be a positive int"):
        BatchConfig(dataset="synthetic", root=tmp_path, out=tmp_path, workers=0).validate()
    with pytest.raises(ValueError, match="address is only used with backend='ray'"):
        BatchConfig(dataset="synthetic", root=tmp_path, out=tmp_path, address="auto").validate()


def test_cli_errors(tmp_path, capsys):
    from tools.batch_reconstruct import main

    assert main(["--dataset", "synthetic", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing: no such dataset root folder" in capsys.readouterr().err
    _mk(tmp_path, "CoreView_377", "annots.npy")
    assert main(["--dataset", "zju_mocap", "--root", str(tmp_path), "--subjects", "394", "--out",
                 str(tmp_path / "o")]) == 2
    assert "unknown zju_mocap subject(s) 394; found: 377" in capsys.readouterr().err


def test_socket_checker_sees_exposed_and_loopback_sockets():
    assert decode_address("0100007F") == "127.0.0.1"
    assert decode_address("00000000000000000000000001000000") == "::1"
    assert decode_address("0000000000000000FFFF00000100007F") == "::ffff:127.0.0.1"
    lo, anyaddr = socket.socket(), socket.socket()
    try:
        lo.bind(("127.0.0.1", 0))
        lo.listen()
        anyaddr.bind(("0.0.0.0", 0))
        anyaddr.listen()
        mine = {(a, port) for pid, a, state, port in inet_sockets([os.getpid()]) if state == "LISTEN"}
        assert ("127.0.0.1", lo.getsockname()[1]) in mine and ("0.0.0.0", anyaddr.getsockname()[1]) in mine
    finally:
        lo.close()
        anyaddr.close()
