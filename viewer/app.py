"""``avatar-viewer PATH``: a web viewer (viser) that poses a fitted avatar bundle in real time.

The server only poses: every pose update skins the Gaussians on the CPU (``viewer.posing``, a few ms for 50k) and
sends one packed buffer; the browser sorts and draws the splats (WebGL), so no server GPU is needed. The server binds
127.0.0.1 unless ``--host`` says otherwise.

UI: pose sliders for the major joints (added on top of the preset or the motion frame), a preset dropdown (A-pose,
T-pose, walking frames), a timeline (motion dropdown, play/pause, speed, frame), show/hide for splats, the body mesh
(the body model's surface for the bundle's shape) and the skeleton, an export button (posed ``.ply`` and a PNG
screenshot, written atomically into ``--out``) and an FPS / update-time readout.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from avatar.geometry.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from avatar.types import BodyPose


@dataclass(frozen=True)
class ViewerArgs:
    """Command-line options of ``avatar-viewer``."""

    path: Path
    """The avatar bundle folder (``avatar.json`` + ``avatar.safetensors``)."""
    port: int = 8080
    """Port to serve on (the next free one if taken)."""
    host: str = "127.0.0.1"
    """Interface to bind; the default keeps the viewer on this machine."""
    motion: Path | None = None
    """A motion to play: our ``.npz``, a SMPL/AMASS ``.npz`` (with ``--smpl-dir``) or a dataset folder."""
    smpl_dir: Path | None = None
    """SMPL model folder, needed to retarget SMPL/AMASS motions or SMPL datasets."""
    out: Path = Path("viewer_exports")
    """Folder the export button writes into."""


def parse_args(argv: Sequence[str] | None = None) -> ViewerArgs:
    p = argparse.ArgumentParser(prog="avatar-viewer", description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="avatar bundle folder")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; the next free one if taken)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--motion", type=Path, default=None, help="motion .npz (ours or SMPL/AMASS) or dataset folder")
    p.add_argument("--smpl-dir", type=Path, default=None, help="SMPL model folder for SMPL/AMASS motions")
    p.add_argument("--out", type=Path, default=Path("viewer_exports"), help="export folder")
    a = p.parse_args(argv)
    return ViewerArgs(a.path, a.port, a.host, a.motion, a.smpl_dir, a.out)


@dataclass(frozen=True)
class JointControl:
    """A slider: rotate ``bone`` about ``axis [3]`` (world-aligned rest axes) by the slider's degrees."""

    label: str
    bone: str
    axis: tuple[float, float, float]
    limits: tuple[float, float]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def joint_controls(body, rest_heads: torch.Tensor) -> list[JointControl]:
    """Sliders for the major joints of anny (z up, facing -y), axes from the rest bones: shoulders raise the arm,
    elbows and hips flex forward, knees bend back, spine and neck bend forward, the root turns about the vertical."""
    h = rest_heads.detach().cpu().double()
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    front = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)

    def d(a: str, b: str) -> torch.Tensor:
        return _unit(h[body.bone_index(b)] - h[body.bone_index(a)])

    def ax(v: torch.Tensor, towards: torch.Tensor) -> tuple[float, float, float]:
        return tuple(float(x) for x in _unit(torch.linalg.cross(v, towards)))

    out = [JointControl("Root turn", "root", (0.0, 0.0, 1.0), (-180, 180))]
    for side, name in (("L", "Left"), ("R", "Right")):
        out += [
            JointControl(f"{name} shoulder", f"upperarm01.{side}", ax(d(f"upperarm01.{side}", f"lowerarm01.{side}"), up), (-60, 120)),
            JointControl(f"{name} elbow", f"lowerarm01.{side}", ax(d(f"lowerarm01.{side}", f"wrist.{side}"), front), (-10, 150)),
            JointControl(f"{name} hip", f"upperleg01.{side}", ax(d(f"upperleg01.{side}", f"lowerleg01.{side}"), front), (-60, 120)),
            JointControl(f"{name} knee", f"lowerleg01.{side}", ax(d(f"lowerleg01.{side}", f"foot.{side}"), -front), (-5, 150)),
        ]
    out += [JointControl("Spine", "spine03", ax(up, front), (-45, 90)),
            JointControl("Neck", "neck01", ax(up, front), (-45, 60))]
    return out


def apply_controls(base: BodyPose, controls: Sequence[JointControl], degrees: Sequence[float], bone_names) -> BodyPose:
    """``base`` with each control's rotation composed on top (``R(angle axis) @ R(base)`` per bone)."""
    rot = base.rotations.clone()
    names = list(bone_names)
    for c, deg in zip(controls, degrees):
        if deg == 0:
            continue
        j = names.index(c.bone)
        extra = torch.tensor(c.axis, dtype=rot.dtype) * math.radians(deg)
        rot[j] = matrix_to_axis_angle(axis_angle_to_matrix(extra) @ axis_angle_to_matrix(rot[j]))
    return BodyPose(rot, base.translation.clone())


class ViewerApp:
    """The viser scene and GUI around an ``AvatarPoser``; pose updates run in one thread (``run``)."""

    def __init__(self, server, poser, motions: dict, presets: dict[str, BodyPose], out_dir: Path,
                 follow_motion: bool = False) -> None:
        self.server, self.poser, self.motions, self.presets, self.out_dir = server, poser, motions, presets, out_dir
        self.lock = threading.RLock()
        self.dirty = True
        self.playing = False
        self.frame = 0.0
        self.last_tick = time.perf_counter()
        self.update_ms: list[float] = []
        self.update_times: list[float] = []
        self.stop = threading.Event()
        body = poser.body
        rest_heads = poser.rest.bone_heads[0]
        self.controls = joint_controls(body, rest_heads)
        center = rest_heads.mean(0).tolist()

        scene, gui = server.scene, server.gui
        scene.set_up_direction("+z")
        server.initial_camera.position = (center[0] + 1.9, center[1] - 2.6, center[2] + 0.4)  # front-left 3/4 view
        server.initial_camera.look_at = tuple(center)
        T = poser.transforms(BodyPose.zeros(body.num_bones))
        s = poser.splats(T)
        self.splats = scene.add_gaussian_splats("/avatar", s.centers, s.covariances, s.rgbs, s.opacities)
        self.skeleton = scene.add_line_segments("/skeleton", poser.skeleton(T), (255, 80, 40), thickness=0.006,
                                                visible=False)
        v, f = poser.mesh(T)
        self.mesh = scene.add_mesh_simple("/mesh", v, f, color=(200, 200, 210), opacity=0.5, visible=False)

        self.readout = gui.add_markdown("starting ...")
        with gui.add_folder("Pose"):
            self.preset = gui.add_dropdown("Preset", tuple(presets), initial_value=next(iter(presets)))
            self.sliders = [gui.add_slider(c.label, min=c.limits[0], max=c.limits[1], step=1, initial_value=0)
                            for c in self.controls]
            reset = gui.add_button("Reset sliders")
        with gui.add_folder("Motion"):
            names = tuple(motions) or ("(none)",)
            self.motion = gui.add_dropdown("Motion", names, initial_value=names[0])
            self.use_motion = gui.add_checkbox("Follow motion", initial_value=follow_motion and bool(motions))
            self.play = gui.add_button("Play")
            self.speed = gui.add_slider("Speed", min=0.1, max=3.0, step=0.1, initial_value=1.0)
            n = max((m.num_frames for m in motions.values()), default=1)
            self.frame_slider = gui.add_slider("Frame", min=0, max=max(n - 1, 1), step=1, initial_value=0)
        with gui.add_folder("Display"):
            self.show_splats = gui.add_checkbox("Show splats", initial_value=True)
            self.show_mesh = gui.add_checkbox("Show body mesh", initial_value=False)
            self.show_skeleton = gui.add_checkbox("Show skeleton", initial_value=False)
        with gui.add_folder("Export"):
            export = gui.add_button("Export pose (.ply + .png)")
            self.export_status = gui.add_markdown(f"writes into `{out_dir}`")

        def mark(_=None) -> None:
            with self.lock:
                self.dirty = True

        for h in (*self.sliders, self.preset, self.motion, self.use_motion, self.show_mesh, self.show_skeleton):
            h.on_update(mark)

        @self.show_splats.on_update
        def _(_) -> None:
            self.splats.visible = self.show_splats.value

        @self.frame_slider.on_update
        def _(_) -> None:
            with self.lock:
                if not self.playing:
                    self.frame = float(self.frame_slider.value)
                    self.dirty = True

        @reset.on_click
        def _(_) -> None:
            for sl in self.sliders:
                sl.value = 0
            mark()

        @self.play.on_click
        def _(_) -> None:
            with self.lock:
                self.playing = not self.playing and bool(motions)
                self.last_tick = time.perf_counter()
                self.dirty = True
            if self.playing:
                self.use_motion.value = True
            self.play.label = "Pause" if self.playing else "Play"

        @export.on_click
        def _(event) -> None:
            try:
                paths = self.export(event.client)
                self.export_status.content = "wrote " + ", ".join(f"`{p.name}`" for p in paths)
            except Exception as err:  # report in the page: a failed export must not stop the viewer
                self.export_status.content = f"export failed: {type(err).__name__}: {err}"

    # --- state -> pose ------------------------------------------------------------------------------------------

    def current_motion(self):
        return self.motions.get(self.motion.value)

    def current_pose(self) -> tuple[BodyPose, str]:
        m = self.current_motion()
        if self.use_motion.value and m is not None:
            i = int(self.frame) % m.num_frames
            base, label = m.pose(i), f"{self.motion.value} frame {i + 1} / {m.num_frames}"
        else:
            base, label = self.presets[self.preset.value], f"preset {self.preset.value}"
        return apply_controls(base, self.controls, [s.value for s in self.sliders], self.poser.body.bone_names), label

    def update(self) -> float:
        """Pose, pack and send; returns the update time in ms (posing + packing + handing to viser)."""
        from viewer.posing import pack_viser_buffer

        t0 = time.perf_counter()
        pose, label = self.current_pose()
        T = self.poser.transforms(pose)
        self.splats.buffer = pack_viser_buffer(self.poser.splats(T))
        if self.show_skeleton.value:
            self.skeleton.points = self.poser.skeleton(T)
        if self.skeleton.visible != self.show_skeleton.value:
            self.skeleton.visible = self.show_skeleton.value
        if self.show_mesh.value:
            self.mesh.vertices = self.poser.mesh(T)[0]
        if self.mesh.visible != self.show_mesh.value:
            self.mesh.visible = self.show_mesh.value
        ms = (time.perf_counter() - t0) * 1000.0
        now = time.perf_counter()
        self.update_ms = (self.update_ms + [ms])[-30:]
        self.update_times = [t for t in self.update_times + [now] if now - t < 1.0]
        fps = len(self.update_times)
        self.readout.content = (f"**{label}** · pose updates: {fps} /s · update {np.median(self.update_ms):.1f} ms "
                                f"({len(self.poser.gaussians)} splats)")
        return ms

    def step(self) -> bool:
        """Advance playback and update when needed; returns whether an update ran."""
        with self.lock:
            now = time.perf_counter()
            m = self.current_motion()
            if self.playing and m is not None:
                self.frame = (self.frame + (now - self.last_tick) * m.fps * float(self.speed.value)) % m.num_frames
                self.dirty = True
            self.last_tick = now
            if not self.dirty:
                return False
            self.dirty = False
        self.update()
        if self.playing:
            self.frame_slider.value = int(self.frame)
        return True

    def run(self, max_rate: float = 60.0) -> None:
        while not self.stop.is_set():
            if not self.step():
                time.sleep(1.0 / max_rate)
            else:
                time.sleep(0.002)

    # --- export -------------------------------------------------------------------------------------------------

    def export(self, client=None) -> list[Path]:
        """Write the current pose's posed ``.ply`` (and a PNG screenshot from ``client``, if one is connected)
        atomically into ``out_dir``; returns the written paths."""
        from PIL import Image

        from avatar.io import atomic_write_bytes

        pose, _ = self.current_pose()
        T = self.poser.transforms(pose)
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}"
        paths = [self.poser.export_ply(self.out_dir / f"pose-{stamp}.ply", T)]
        if client is None:
            clients = list(self.server.get_clients().values())
            client = clients[0] if clients else None
        if client is not None:
            image = client.get_render(height=720, width=960, transport_format="png", timeout=10.0)
            buf = io.BytesIO()
            Image.fromarray(np.asarray(image)).save(buf, format="PNG")
            paths.append(atomic_write_bytes(self.out_dir / f"pose-{stamp}.png", buf.getvalue()))
        return paths


def load_viewer_inputs(args: ViewerArgs):
    """Bundle, body model, poser, motions and presets; raises FileNotFoundError / ValueError with the file named."""
    from avatar.body import AnnyBody, load_body_model
    from avatar.export.bundle import load_bundle
    from viewer.motions import DEFAULT_WALK, load_any_motion, load_motion, preset_poses
    from viewer.posing import AvatarPoser

    bundle = load_bundle(args.path)
    if bundle.gaussians.skin_weights is None:
        raise ValueError(f"{args.path}: the bundle has no skin weights (gaussians.skin_weights); it cannot be posed")
    if bundle.body_model_name == "anny":
        body = AnnyBody()
    else:
        if args.smpl_dir is None:
            raise ValueError(f"{args.path}: the avatar was fitted on {bundle.body_model_name}; pass --smpl-dir")
        body = load_body_model(bundle.body_model_name, model_path=str(args.smpl_dir))
    poser = AvatarPoser(bundle, body)
    motions = {}
    if body.name == "anny":
        motions["walk (shipped)"] = load_motion(DEFAULT_WALK).on_rig(body.bone_names)
    if args.motion is not None:
        m = load_any_motion(args.motion, body.bone_names, args.smpl_dir, body=body if body.name == "anny" else None)
        motions = {m.name: m, **motions}
    presets = preset_poses(body, poser.rest.bone_heads[0]) if body.name == "anny" else \
        {"rest": BodyPose.zeros(body.num_bones)}
    return poser, motions, presets


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        poser, motions, presets = load_viewer_inputs(args)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"avatar-viewer: error: {err}", file=sys.stderr)
        return 2
    try:
        import viser
    except ImportError:
        print("avatar-viewer: error: the viewer needs viser (pip install 'avatar[viewer]')", file=sys.stderr)
        return 2
    server = viser.ViserServer(host=args.host, port=args.port, verbose=False)
    app = ViewerApp(server, poser, motions, presets, args.out, follow_motion=args.motion is not None)
    print(f"avatar-viewer: serving {args.path} ({len(poser.gaussians)} Gaussians) on "
          f"http://{args.host}:{server.get_port()}", flush=True)
    try:
        app.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
