"""Perception for raw videos: person masks and landmarks (MediaPipe, optional extra 'video'), the body fit to them,
and the video-to-subject pipeline behind ``fit_avatar --video``. MediaPipe is imported lazily."""

from avatar.perception.bodyfit import BodyFit, BodyFitConfig, fit_body
from avatar.perception.pipeline import VideoConfig, VideoSubject, intrinsics, video_protocol, video_to_subject

__all__ = ["BodyFit", "BodyFitConfig", "fit_body", "VideoConfig", "VideoSubject", "intrinsics", "video_protocol",
           "video_to_subject"]
