"""The training configuration, resolved once.

main.py's flags, the recipe they choose (recipes.py) and what the dataset decides (clip or tube mode and how its
videos are cut into clips) become one frozen :class:`TrainConfig` in :func:`resolve_config`, before training starts.
It is logged, handed to engine.py's functions as ``config`` and stored in every checkpoint as a plain dict
(:meth:`TrainConfig.to_dict`, under the key ``"args"``). Nothing changes it afterwards: ``dataclasses.replace`` makes
a changed copy where one is needed.

Checkpoints written before this module stored main.py's namespace there: other keys (``recipe`` ``"auto"``, a
``no_amp`` key) and None where the matcher or the network chose (``set_cost_class``, ``time_tokens``), or keys missing
in older ones. Readers take it as a dict and default what is missing or None, as :func:`stored_setting` does.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from recipes import PAIR_PROB, RECIPES, WINDOW_STRIDE, WINDOWS_PER_VIDEO, resolve_recipe

log = logging.getLogger("star")

# The settings that stay None in a resolved config, and what None means there.
MAY_BE_NONE = {
    "class_names": "names from classes.txt, else action_<raw id>",
    "max_gap": "one second of each video (records.default_max_gap)",
    "window_sec": "whole videos, one clip each",
    "backbone_weights": "--pretrained decides the trunk's weights",
    "init_from": "no checkpoint to fine-tune from",
}
MODES = ("clip", "tube")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every setting of a training run, resolved: no recipe default or data-dependent choice left open (the flags of
    main.py's ``--help`` say what each one does). Built by :func:`resolve_config`."""
    # the data
    input_dir: str
    output_dir: str
    class_names: tuple[str, ...] | None
    fps: float                     # frame rate of videos given as folders of frames
    max_gap: int | None            # frames a track's gap may span and be interpolated
    val_split: float
    seed: int
    # clips: the cutting (per-frame labels decide the defaults) and augmentation
    mode: str                      # "clip" or "tube"
    window_sec: float | None
    clips_per_video: int
    pair_prob: float
    negative_prob: float
    num_frames: int
    img_size: int
    no_aug: bool
    still_prob: float
    # the network and how it starts
    recipe: str                    # the recipe that filled the flags left open: "published" or "scratch"
    num_queries: int
    dropout: float
    time_tokens: bool
    no_aux_loss: bool
    pretrained: str
    backbone_weights: str | None
    init_from: str | None
    motion_init: bool
    motion_constraint: bool
    position_init: bool
    freeze_trunk: int
    # losses and matching
    ce_loss_coef: float
    bbox_loss_coef: float
    giou_loss_coef: float
    set_cost_class: float          # the class cost of the Hungarian matching
    eos_coef: float
    video_loss_coef: float
    # optimisation
    epochs: int
    batch_size: int
    lr: float
    lr_backbone: float
    warmup_epochs: int
    min_lr: float
    weight_decay: float
    grad_clip: float
    ema_decay: float
    precision: str                 # "auto", "fp32", "bf16" or "fp16" (autocast; --no_amp is fp32)
    decoder_steps: int
    decoder_copies: int
    # the run
    eval_every: int
    score_threshold: float
    workers: int
    device: str
    resume: bool
    overwrite: bool

    def __post_init__(self):
        unset = [f.name for f in dataclasses.fields(self)
                 if getattr(self, f.name) is None and f.name not in MAY_BE_NONE]
        if unset:
            raise TypeError(f"TrainConfig: {', '.join(unset)} not resolved (None)")
        for name, value, allowed in (("mode", self.mode, MODES), ("precision", self.precision, PRECISIONS),
                                     ("recipe", self.recipe, tuple(RECIPES))):
            if value not in allowed:
                raise ValueError(f"TrainConfig: {name} {value!r}, not one of {', '.join(allowed)}")

    @property
    def tube(self) -> bool:
        return self.mode == "tube"

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, not tuples), for a checkpoint loaded with ``weights_only=True``."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def summary(self) -> str:
        """``name=value`` of every setting, for the log."""
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items())


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def resolve_config(args, records: Sequence) -> TrainConfig:
    """The run's :class:`TrainConfig` from main.py's parsed flags ``args`` (left unchanged) and the dataset's
    ``records`` (records.VideoRecord: ``per_frame``, ``fps``): ``--no_amp`` is ``precision fp32``; the cutting
    (:func:`cutting`); the flags left at None from the recipe (recipes.resolve_recipe, the tube mode's decoder phase
    when the mode is tube); the matching's class cost from the class loss weight unless ``--set_cost_class``; time
    tokens on in tube mode unless ``--time_tokens`` says. Logs the cutting and every setting."""
    flags = dict(vars(args))
    if flags.pop("no_amp"):
        flags["precision"] = "fp32"
    flags.update(cutting(flags, records))
    flags["recipe"], from_recipe = resolve_recipe(flags, tube=flags["mode"] == "tube")
    flags.update(from_recipe)
    if flags["set_cost_class"] is None:
        flags["set_cost_class"] = flags["ce_loss_coef"]
    if flags["time_tokens"] is None:
        flags["time_tokens"] = flags["mode"] == "tube"
    if flags["class_names"] is not None:
        flags["class_names"] = tuple(flags["class_names"])
    config = TrainConfig(**flags)
    log.info("mode %s; clips span %s; %d per video and epoch; %g side by side", config.mode,
             f"{config.window_sec:g} s windows" if config.window_sec else "whole videos", config.clips_per_video,
             config.pair_prob)
    log.info("config: %s", config.summary())
    return config


def cutting(flags: Mapping, records: Sequence) -> dict:
    """``mode``, ``window_sec``, ``clips_per_video`` and ``pair_prob`` for the dataset ``records``: those the flags
    leave open (``--mode auto``, None) follow whether any record has per-frame labels (tube mode, windows of
    ``WINDOW_STRIDE`` video frames per sampled frame at the records' median frame rate, ``WINDOWS_PER_VIDEO`` clips,
    ``PAIR_PROB`` side by side) or none has (clip mode, whole videos, one clip, never paired)."""
    per_frame = [r for r in records if r.per_frame]
    window = flags["window_sec"]
    if per_frame and window is None:   # the whole video at 8 frames would skip whole motion cycles
        window = round(WINDOW_STRIDE * flags["num_frames"] / float(np.median([r.fps for r in per_frame])), 4)
    return {"mode": flags["mode"] if flags["mode"] != "auto" else "tube" if per_frame else "clip",
            "window_sec": window,
            "clips_per_video": _given(flags["clips_per_video"], WINDOWS_PER_VIDEO if per_frame else 1),
            "pair_prob": _given(flags["pair_prob"], PAIR_PROB if per_frame else 0.0)}


def _given(value, default):
    return default if value is None else value


def stored_setting(ckpt: Mapping, name: str, default=None):
    """Setting ``name`` of the run that wrote checkpoint ``ckpt`` (its ``"args"`` dict), ``default`` where the
    checkpoint has none or holds None there (an older checkpoint, or one not written by main.py)."""
    value = (ckpt.get("args") or {}).get(name)
    return default if value is None else value
