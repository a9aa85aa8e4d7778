"""What the inference side knows about a loaded model, typed: :class:`ModelDescription`.

A PyTorch checkpoint (``checkpoint.load_checkpoint``) and an ONNX export (``backend.read_metadata``) both come with an
``info`` dict; :meth:`ModelDescription.from_info` is the one place that reads it. test.py, stream.py, app.py and
export.py then use the description's fields: the classes, the preprocessing (frames per clip, size, mean, std), clip or
tube mode, and the windows the model was trained on.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

CLIP, TUBE = "clip", "tube"


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """A loaded model's classes, preprocessing, mode and training windows.

    ``class_names``: foreground classes, index = the model's class id; ``raw_class_ids``: the dataset's raw id of each
    (a project checkpoint stores them; None otherwise). Preprocessing: ``num_frames`` (T) sampled per clip, each
    resized to ``img_size`` (S) px, normalised with ``mean`` and ``std``. ``mode``: ``"clip"`` (one box per query) or
    ``"tube"`` (a box per sampled frame). ``window_sec``: the windows the model was trained on (None: whole videos);
    :attr:`stride_sec` the stride that goes with them. ``source``: ``project``, ``raw_state_dict`` or ``onnx``;
    ``model_args``: the network's constructor arguments (``checkpoint.model_args_from``). ``records_window``: the file
    records its training window (``window_sec``, None included): export.py carries that record into the ONNX
    metadata, and only then.
    """

    class_names: tuple[str, ...]
    num_frames: int
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = CLIP
    window_sec: float | None = None
    source: str = "project"
    model_args: dict = dataclasses.field(default_factory=dict, hash=False)
    raw_class_ids: tuple[int, ...] | None = None
    records_window: bool = False

    @classmethod
    def from_info(cls, info: Mapping) -> "ModelDescription":
        """The description of a loaded model from its ``info`` dict (``backend.load_model``,
        ``checkpoint.load_checkpoint``): ``class_names``, ``num_frames``, ``img_size``, ``mean``, ``std``,
        ``model_args``, ``source``, and where stored ``window_sec`` and the checkpoint's ``raw_class_ids``. The
        loaded checkpoint dict itself is not kept."""
        model_args = dict(info.get("model_args") or {})
        window = info.get("window_sec")
        raw_ids = (info.get("checkpoint") or {}).get("raw_class_ids")
        return cls(class_names=tuple(info["class_names"]), num_frames=info["num_frames"], img_size=info["img_size"],
                   mean=tuple(info["mean"]), std=tuple(info["std"]),
                   mode=TUBE if model_args.get("tube_steps", 0) > 0 else CLIP,
                   window_sec=float(window) if window else None, source=info["source"], model_args=model_args,
                   raw_class_ids=tuple(raw_ids) if raw_ids else None, records_window="window_sec" in info)

    @property
    def tube_mode(self) -> bool:
        """The network predicts a box per sampled frame (``model_args["tube_steps"] > 0``)."""
        return self.mode == TUBE

    @property
    def stride_sec(self) -> float | None:
        """The stride of the trained windows (None without them): a window in clip mode, half a window in tube mode,
        where each frame is then scored from a window it lies near the middle of, its steps seeing motion on both sides
        (docs/EXPERIMENTS.md, "Tube mode", third session)."""
        if self.window_sec is None:
            return None
        return self.window_sec / 2 if self.tube_mode else self.window_sec

    def with_clip(self, num_frames: int | None = None, img_size: int | None = None) -> "ModelDescription":
        """This description with the clip size of ``--num_frames`` / ``--img_size`` where given."""
        changes = {key: value for key, value in (("num_frames", num_frames), ("img_size", img_size)) if value}
        return dataclasses.replace(self, **changes) if changes else self
