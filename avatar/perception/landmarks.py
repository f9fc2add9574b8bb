"""Person masks and body landmarks per frame, with MediaPipe's pose model (the only offline route we found).

Why MediaPipe 0.10.21: it is the last wheel that carries its models (the BlazePose landmark model with 33 landmarks
in image and metric world coordinates, and the selfie/pose segmentation) inside the package, so it runs with no
download, on the CPU (about 20 ms per 512x512 frame with ``model_complexity=1``). Newer wheels fetch their models at
run time. It needs numpy<2 and protobuf<5, so it lives in the ``video`` extra (``pip install -e .[video]``) and the
rest of the environment agrees with those pins. It is imported lazily: ``import avatar`` never loads it.

The 33 BlazePose landmarks are mapped onto the body models' 23 keypoints (COCO-17 + 6 foot points, the order of
``BodyModel.keypoints``): nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles, big toes ("foot index")
and heels; the two small toes have no BlazePose counterpart (confidence 0). "Left" is the person's left in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Detections", "detect_landmarks", "MP_TO_KEYPOINT", "KEYPOINT_NAMES", "LEFT_RIGHT_PAIRS", "require_mediapipe"]

KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle", "left_big_toe", "right_big_toe", "left_small_toe", "right_small_toe", "left_heel", "right_heel",
)
# keypoint index -> BlazePose landmark index
MP_TO_KEYPOINT = {0: 0, 1: 2, 2: 5, 3: 7, 4: 8, 5: 11, 6: 12, 7: 13, 8: 14, 9: 15, 10: 16, 11: 23, 12: 24, 13: 25,
                  14: 26, 15: 27, 16: 28, 17: 31, 18: 32, 21: 29, 22: 30}
LEFT_RIGHT_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16), (17, 18), (19, 20), (21, 22))
TORSO = (5, 6, 11, 12)


def require_mediapipe():
    """Import MediaPipe or raise an ImportError that says how to install it."""
    try:
        import mediapipe as mp  # noqa: PLC0415 - optional, heavy
    except ImportError as err:
        raise ImportError(
            "fit_avatar --video needs MediaPipe 0.10.21 (its wheel carries the pose and segmentation models): "
            "install the 'video' extra, e.g. `bash tools/install.sh --extras video` or `pip install -e .[video]`"
        ) from err
    if not hasattr(mp, "solutions"):
        raise ImportError(f"MediaPipe {getattr(mp, '__version__', '?')} has no legacy solutions API with bundled "
                          "models; install mediapipe==0.10.21 (the 'video' extra)")
    return mp


@dataclass
class Detections:
    """Per-frame detections for F frames of H x W pixels.

    keypoints:  float32 [F, 23, 2] pixel coordinates (x right, y down; pixel centres at +0.5) in keypoint order.
    confidence: float32 [F, 23] in [0, 1] (BlazePose visibility, 0 outside the image; 0 for keypoints it lacks or missed frames).
    world:      float32 [F, 23, 3] BlazePose world landmarks: metres, origin between the hips, camera-aligned axes
                (x right, y down, z away from the camera).
    masks:      float32 [F, H, W] person probability in [0, 1].
    found:      bool [F]: a person was detected (enough torso landmarks and a mask of plausible size).
    """

    keypoints: np.ndarray
    confidence: np.ndarray
    world: np.ndarray
    masks: np.ndarray
    found: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.found.shape[0])

    def subset(self, keep: np.ndarray) -> "Detections":
        return Detections(self.keypoints[keep], self.confidence[keep], self.world[keep], self.masks[keep], self.found[keep])


def detect_landmarks(
    images: np.ndarray,  # uint8 [F, H, W, 3] RGB, consecutive (subsampled) frames of one video
    model_complexity: int = 1,
    min_detection_confidence: float = 0.5,
    min_torso_confidence: float = 0.5,
    min_mask_fraction: float = 0.002,
    progress: bool = True,
) -> Detections:
    """Run BlazePose (tracking mode, segmentation on) over the frames; frames without a person get ``found=False``."""
    from tqdm import tqdm

    mp = require_mediapipe()
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"detect_landmarks: images must be uint8 [F, H, W, 3], got {images.dtype} {images.shape}")
    F, H, W, _ = images.shape
    kp = np.zeros((F, 23, 2), np.float32)
    conf = np.zeros((F, 23), np.float32)
    world = np.zeros((F, 23, 3), np.float32)
    masks = np.zeros((F, H, W), np.float32)
    found = np.zeros(F, bool)
    kp_idx = np.array(list(MP_TO_KEYPOINT.keys()))
    mp_idx = np.array(list(MP_TO_KEYPOINT.values()))
    with mp.solutions.pose.Pose(static_image_mode=False, model_complexity=model_complexity, smooth_landmarks=True,
                                enable_segmentation=True, smooth_segmentation=True,
                                min_detection_confidence=min_detection_confidence,
                                min_tracking_confidence=0.5) as pose:
        for f in tqdm(range(F), desc="video: landmarks", unit="frame", disable=not progress):
            res = pose.process(np.ascontiguousarray(images[f]))
            if res.pose_landmarks is None:
                continue
            lm = np.array([(p.x, p.y, p.visibility) for p in res.pose_landmarks.landmark], np.float32)
            kp[f, kp_idx, 0] = lm[mp_idx, 0] * W
            kp[f, kp_idx, 1] = lm[mp_idx, 1] * H
            c = np.clip(lm[mp_idx, 2], 0, 1)
            inside = (lm[mp_idx, 0] > -0.05) & (lm[mp_idx, 0] < 1.05) & (lm[mp_idx, 1] > -0.05) & (lm[mp_idx, 1] < 1.05)
            conf[f, kp_idx] = c * inside
            if res.pose_world_landmarks is not None:
                wl = np.array([(p.x, p.y, p.z) for p in res.pose_world_landmarks.landmark], np.float32)
                world[f, kp_idx] = wl[mp_idx]
            if res.segmentation_mask is not None:
                masks[f] = np.clip(res.segmentation_mask, 0, 1)
            torso_ok = conf[f, list(TORSO)].min() >= min_torso_confidence
            found[f] = bool(torso_ok and (masks[f] > 0.5).mean() >= min_mask_fraction)
    conf[~found] = 0.0
    return Detections(kp, conf, world, masks, found)
