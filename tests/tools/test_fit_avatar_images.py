"""``fit_avatar --images ... --cameras cams.json``: end to end on a tiny synthetic subject, and bad input."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tools.fit_avatar import FitAvatarArgs, main, run

FRAME = 17
SIZE = 96


@pytest.fixture(scope="module")
def tiny_views(tmp_path_factory, anny_body):
    """RGBA renders of a clothed synthetic subject from two ring cameras (front, back) + its cameras file."""
    from avatar.data.synthetic import SyntheticConfig, make_subject, render_frame
    from avatar.fusion.inputs import cameras_json
    from avatar.types import BodyPose

    folder = tmp_path_factory.mktemp("views")
    sub = make_subject(SyntheticConfig(seed=5, motion="free", num_frames=FRAME + 1, width=SIZE, height=SIZE,
                                       rig="ring23", cameras=(0, 12), texture_size=32), anny_body)
    frame = render_frame(sub, anny_body, FRAME)
    paths = []
    for i in range(2):
        rgba = torch.cat([frame.images[i], frame.masks[i][..., None]], -1)
        p = folder / f"view{i}.png"
        Image.fromarray((rgba.numpy() * 255).round().astype(np.uint8), "RGBA").save(p)
        paths.append(p)
    pose = BodyPose(sub.motion.rotations[FRAME], sub.motion.translation[FRAME])
    cams = folder / "cams.json"
    cams.write_text(json.dumps(cameras_json(sub.cameras, sub.shape, pose)))
    return sub, paths, cams, folder


@pytest.fixture(scope="module")
def predictor_path(tmp_path_factory):
    """The shipped predictor if it exists, else a small untrained network (its depth is a residual over the naked
    body's prior, so the pipeline still sees body-shaped input)."""
    from avatar.predict.infer import shipped_predictor_path

    if shipped_predictor_path().is_file():
        return None
    from avatar.predict.network import DepthSkinConfig, DepthSkinNet
    from avatar.predict.train import save_predictor

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("predictor") / "tiny.safetensors"
    return save_predictor(path, DepthSkinNet(DepthSkinConfig(size=32, widths=(8, 16))), {"note": "untrained, tests"})


@pytest.mark.slow
def test_images_end_to_end(tiny_views, predictor_path, anny_body, tmp_path):
    import trimesh
    from safetensors.torch import load_file

    from avatar.fusion import body_template, mesh_quality

    sub, paths, cams, _ = tiny_views
    out = tmp_path / "out"
    summary = run(FitAvatarArgs(images=tuple(paths), cameras=cams, out=out, predictor=predictor_path, voxel_size=0.02,
                                refine_steps=8, progress=False))
    for name in ("canonical_mesh.ply", "skin_weights.safetensors", "skin_weights.json", "summary.json",
                 "refined_mesh.ply", "refined_mesh_posed.ply", "refined_pose.json", "avatar.glb"):
        assert (out / name).is_file(), name
    assert set(summary["outputs"]) == {p.name for p in out.iterdir()} - {"summary.json"}
    assert json.loads((out / "summary.json").read_text())["views"] == 2 and summary["fused_points"] > 100
    mesh = trimesh.load(out / "canonical_mesh.ply", process=False)
    tensors = load_file(out / "skin_weights.safetensors")
    meta = json.loads((out / "skin_weights.json").read_text())
    V = len(mesh.vertices)
    assert tensors["skin_weights"].shape == (V, 104) and meta["num_vertices"] == V and len(meta["bone_names"]) == 104
    np.testing.assert_allclose(tensors["vertices"].numpy(), mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(tensors["faces"].numpy(), mesh.faces)
    torch.testing.assert_close(tensors["skin_weights"].sum(-1), torch.ones(V))
    # the canonical mesh is the subject, in canonical space: about as close to its clothed ground truth as the naked
    # template is (an untrained predictor adds little to the template; the shipped one must not do worse)
    q = mesh_quality(torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.faces), sub.canonical_vertices, sub.faces,
                     num_samples=10000)
    t = body_template(anny_body, sub.shape)
    q_t = mesh_quality(t.vertices, t.faces, sub.canonical_vertices, sub.faces, num_samples=10000)
    assert q.chamfer_mm < 1.3 * q_t.chamfer_mm + 5.0, (q, q_t)

    # refinement + export: the wrapped, refined template (template topology, exact weights), its posed copy under the
    # corrected pose, and a rigged .glb whose own skin reproduces our forward skinning of the refined mesh
    from avatar.export import read_mesh
    from avatar.export.gltf import accessor_array, read_glb
    from avatar.skinning.lbs import lbs_points
    from avatar.types import BodyPose

    rv, rf, rc = read_mesh(out / "refined_mesh.ply")
    assert rv.shape == t.vertices.shape and torch.equal(rf, t.faces.long()) and rc is not None
    assert float((rv - t.vertices.float()).norm(dim=-1).max()) < 0.15  # offsets along the normals, bounded search
    poses = json.loads((out / "refined_pose.json").read_text())["poses"]
    assert len(poses) == 1 and poses[0]["views"] == [0, 1]  # both views show one instant: one pose correction
    pose = BodyPose(torch.tensor(poses[0]["rotations"])[None], torch.tensor(poses[0]["translation"])[None])
    T, _ = anny_body.bone_transforms(pose, sub.shape[None])
    pv, _, _ = read_mesh(out / "refined_mesh_posed.ply")
    want = lbs_points(rv.double(), t.skin_weights.double(), T[0].double()).float()
    assert float((pv - want).norm(dim=-1).max()) < 1e-4
    doc, binary = read_glb(out / "avatar.glb")
    assert len(doc["skins"]) == 1 and len(doc["skins"][0]["joints"]) == anny_body.num_bones
    assert [a["name"] for a in doc["animations"]] == ["free"]
    pos = accessor_array(doc, binary, doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"])
    np.testing.assert_allclose(pos, rv.numpy(), atol=1e-6)
    assert len(trimesh.load(out / "avatar.glb", force="mesh", process=False).vertices) == rv.shape[0]
    assert summary["refined"]["vertices"] == rv.shape[0] and summary["seconds"]["refine_and_export"]["refine"] > 0


def _args(paths, cams, tmp_path, **kw):
    return FitAvatarArgs(images=tuple(paths), cameras=cams, out=tmp_path / "o", **kw)


def test_bad_inputs(tiny_views, tmp_path):
    sub, paths, cams, folder = tiny_views
    # images of different sizes
    small = tmp_path / "small.png"
    Image.open(paths[1]).resize((SIZE // 2, SIZE // 2)).save(small)
    with pytest.raises(ValueError, match=r"small\.png: image is 48x48 but .*view0\.png is 96x96"):
        run(_args([paths[0], small], cams, tmp_path))
    # no mask: RGB images without --masks
    rgb = tmp_path / "rgb.png"
    Image.open(paths[0]).convert("RGB").save(rgb)
    with pytest.raises(ValueError, match=r"rgb\.png: no mask"):
        run(_args([rgb, paths[1]], cams, tmp_path))
    # ... but an explicit mask file works for the loader
    from avatar.fusion.inputs import load_sparse_views

    mask = tmp_path / "mask.png"
    Image.fromarray((np.asarray(Image.open(paths[0]))[..., 3] > 127).astype(np.uint8) * 255).save(mask)
    views = load_sparse_views([rgb, paths[1]], [mask, mask], cams, 104, 6)
    assert views.images.shape == (2, SIZE, SIZE, 3) and views.masks[0].sum() > 100
    assert torch.equal(views.masks[0], views.masks[1]) and views.poses.rotations.shape == (2, 104, 3)
    torch.testing.assert_close(views.cameras.viewmats, sub.cameras.viewmats)
    with pytest.raises(ValueError, match="1 masks for 2 images"):
        run(_args(paths, cams, tmp_path, masks=(mask,)))
    # camera count mismatch
    with pytest.raises(ValueError, match="2 camera views for 1 images"):
        run(_args(paths[:1], cams, tmp_path))
    # unreadable and missing files
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"junk\.png: unreadable image file"):
        run(_args([paths[0], junk], cams, tmp_path))
    with pytest.raises(ValueError, match=r"nope\.png: image file not found"):
        run(_args([paths[0], tmp_path / "nope.png"], cams, tmp_path))
    # malformed cameras files name the file and the field
    data = json.loads(cams.read_text())
    bad = tmp_path / "bad.json"
    for mutate, msg in ((lambda d: d["views"][1].update(K=[[1, 0], [0, 1]]), r"bad\.json: field views\[1\]\.K"),
                        (lambda d: d["pose"].update(rotations=[[0, 0, 0]]), r"bad\.json: field pose\.rotations must be \[104, 3\]"),
                        (lambda d: d.pop("shape"), r"bad\.json: missing field 'shape'"),
                        (lambda d: d["views"][0].update(width=SIZE + 1), r"view0\.png: image is 96x96 but views\[0\]")):
        d = json.loads(json.dumps(data))
        mutate(d)
        bad.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=msg):
            run(_args(paths, bad, tmp_path))
    bad.write_text("{oops")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        run(_args(paths, bad, tmp_path))
    # mode conflicts
    with pytest.raises(ValueError, match="needs --cameras"):
        run(FitAvatarArgs(images=tuple(paths), out=tmp_path / "o"))
    with pytest.raises(ValueError, match="not several"):
        run(FitAvatarArgs(images=tuple(paths), cameras=cams, demo=True, out=tmp_path / "o"))
    with pytest.raises(ValueError, match="--refine-steps must be >= 1, got 0"):
        run(_args(paths, cams, tmp_path, refine_steps=0))
    assert not (tmp_path / "o").exists()  # nothing written for rejected input


def test_cli_reports_bad_input_on_stderr(tiny_views, tmp_path, monkeypatch, capsys):
    _, paths, cams, _ = tiny_views
    monkeypatch.setattr(sys, "argv", ["fit_avatar", "--images", str(paths[0]), "--cameras", str(cams),
                                      "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "2 camera views for 1 images" in capsys.readouterr().err


def test_failed_refinement_leaves_no_partial_outputs(tiny_views, predictor_path, tmp_path, monkeypatch):
    """A failure after the fusion (here: in the refinement) must not leave the fused files without the rest: --out
    keeps exactly what it held before, and a folder the run created is removed again."""
    import avatar.fit.mesh_refine as mr

    _, paths, cams, _ = tiny_views

    def boom(*a, **k):
        raise RuntimeError("refinement failed")

    monkeypatch.setattr(mr, "refine_mesh", boom)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="refinement failed"):
        run(FitAvatarArgs(images=tuple(paths), cameras=cams, out=fresh, predictor=predictor_path, voxel_size=0.03,
                          refine_steps=2, progress=False))
    assert not fresh.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "summary.json").write_text("{\"earlier\": true}")
    with pytest.raises(RuntimeError, match="refinement failed"):
        run(FitAvatarArgs(images=tuple(paths), cameras=cams, out=kept, predictor=predictor_path, voxel_size=0.03,
                          refine_steps=2, progress=False))
    assert [p.name for p in kept.iterdir()] == ["summary.json"]
    assert json.loads((kept / "summary.json").read_text()) == {"earlier": True}
