"""Datasets: synthetic subjects with ground truth, ZJU-MoCap and PeopleSnapshot loaders, evaluation protocols.

Everything yields :class:`avatar.data.frames.Frame` objects through :class:`avatar.data.dataset.AvatarDataset`.
"""

from avatar.data.dataset import AvatarDataset, detect_layout
from avatar.data.frames import Frame
from avatar.data.params import BodyModelInfo, easymocap_to_pose, pose_to_easymocap, read_body_model_info
from avatar.data.protocols import PROTOCOLS, FrameRange, Protocol, Split, get_protocol
from avatar.data.synthetic import (
    SyntheticConfig,
    SyntheticFrame,
    SyntheticSubject,
    make_subject,
    posed_vertices,
    render_frame,
    undistort_images,
)
from avatar.data.writers import write_peoplesnapshot, write_zju

__all__ = [
    "AvatarDataset",
    "detect_layout",
    "Frame",
    "BodyModelInfo",
    "easymocap_to_pose",
    "pose_to_easymocap",
    "read_body_model_info",
    "PROTOCOLS",
    "FrameRange",
    "Protocol",
    "Split",
    "get_protocol",
    "SyntheticConfig",
    "SyntheticFrame",
    "SyntheticSubject",
    "make_subject",
    "posed_vertices",
    "render_frame",
    "undistort_images",
    "write_peoplesnapshot",
    "write_zju",
]
