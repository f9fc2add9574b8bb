"""Body models behind one interface (:class:`BodyModel`): anny (default, bundled) and SMPL / SMPL-X (user files)."""

from avatar.body.base import BodyModel
from avatar.body.anny_body import AnnyBody, ensure_anny_export
from avatar.body.smpl_body import SMPLBody, SMPL_DOWNLOAD_HELP


def load_body_model(name: str = "anny", model_path: str | None = None, **kwargs) -> BodyModel:
    """Build a body model by name: ``"anny"`` (bundled) or ``"smpl"`` / ``"smplx"`` (needs ``model_path``)."""
    if name == "anny":
        return AnnyBody(**kwargs)
    if name in ("smpl", "smplx"):
        if model_path is None:
            raise ValueError(f"body model {name!r} needs model_path (a folder or model file).\n{SMPL_DOWNLOAD_HELP}")
        return SMPLBody(model_path, model_type=name, **kwargs)
    raise ValueError(f"unknown body model {name!r}; expected 'anny', 'smpl' or 'smplx'")


__all__ = ["BodyModel", "AnnyBody", "SMPLBody", "ensure_anny_export", "load_body_model", "SMPL_DOWNLOAD_HELP"]
