"""Training recipes: the defaults that depend on how the trunk starts, one visible table.

main.py's flags left at None take their value from the chosen recipe (``--recipe``; ``auto``: ``published``
with a pretrained trunk or ``--init_from``, ``scratch`` without) when config.resolve_config resolves the run's
settings. The published recipe is the original project's, for a Kinetics-400 trunk; the from-scratch one was
measured on the sample data with the CPU's 15-minute budget (docs/EXPERIMENTS.md, "From-scratch recipe", says what
each entry did).
"""
from __future__ import annotations

import types
from typing import Mapping

from losses import PUBLISHED_WEIGHTS

#                        published                       scratch
_TABLE = {
    "lr":               (5e-5,                           2e-4),
    "lr_backbone":      (5e-5,                           5e-4),
    "warmup_epochs":    (0,                              2),
    "still_prob":       (0.0,                            0.2),
    "video_loss_coef":  (0.0,                            2.0),
    "motion_init":      (False,                          True),
    "motion_constraint": (False,                         True),
    "position_init":    (False,                          True),
    "ce_loss_coef":     (PUBLISHED_WEIGHTS["loss_ce"],   6.0),
    "freeze_trunk":     (0,                              2),
    "decoder_steps":    (0,                              2000),
}
RECIPES = types.MappingProxyType({
    name: types.MappingProxyType({key: values[column] for key, values in _TABLE.items()})
    for column, name in enumerate(("published", "scratch"))})
PUBLISHED_RECIPE, SCRATCH_RECIPE = RECIPES["published"], RECIPES["scratch"]
# Short runs get a short decoder phase: at most this many decoder steps per epoch (the 14- and 30-epoch
# commands keep the measured 2000; a 1-epoch smoke test runs 150, about 10 s on 2 cores).
DECODER_STEPS_PER_EPOCH = 150
# Per-frame datasets: a clip's window spans this many video frames per sampled frame when --window_sec is not
# given (8 frames at 25 fps: 1.28 s). The whole 6-s sample video at 8 frames samples every ~21 frames, less than
# one per motion cycle (28-40 frames), so the motion is not seen (docs/EXPERIMENTS.md, "Tube mode").
WINDOW_STRIDE = 4
# Tube mode's decoder phase peaks at steps 500-700 and then overfits its cached clips: 600 steps there (2026-12-01,
# per-frame sample data, unseen frame-mAP@0.5 0.37 / video-mAP@0.5 0.15 against 0.33 / 0.10 with 2000, and 10 min
# less; docs/EXPERIMENTS.md, "Tube mode").
TUBE_DECODER_STEPS = 600
# Per-frame datasets draw this many training windows from each video per epoch (main.py --clips_per_video): the field
# trains on every annotated frame of a video, not one clip of it; with one, 30 epochs were 300 steps (docs/EXPERIMENTS.md).
WINDOWS_PER_VIDEO = 2
# Per-frame datasets show this share of training windows beside another video's window (main.py --pair_prob,
# augment.side_by_side): two-actor scenes were 5 of 39 training videos, and the decoder missed the second actor.
PAIR_PROB = 0.5


def recipe_name(flags: Mapping) -> str:
    """The recipe main.py's ``flags`` (a dict of them) ask for, ``auto`` resolved from the trunk's start."""
    if flags["recipe"] != "auto":
        return flags["recipe"]
    pretrained = flags["pretrained"] != "none" or flags["backbone_weights"] or flags["init_from"]
    return "published" if pretrained else "scratch"


def resolve_recipe(flags: Mapping, tube: bool = False) -> tuple[str, dict]:
    """The recipe's name and the value of each flag it sets: the flag's own where given, else the recipe's
    (``decoder_steps`` capped per epoch and, ``tube``, at the tube mode's). ``flags`` is left as it is."""
    name = recipe_name(flags)
    values = {}
    for key, value in RECIPES[name].items():
        if flags[key] is not None:
            value = flags[key]
        elif key == "decoder_steps":
            value = min(value, DECODER_STEPS_PER_EPOCH * flags["epochs"], *([TUBE_DECODER_STEPS] if tube else []))
        values[key] = value
    return name, values


def add_recipe_defaults_to_help(parser) -> None:
    """Append each recipe's default to the help of the flags the recipes set."""
    for action in parser._actions:
        if action.dest in _TABLE:
            published, scratch = _TABLE[action.dest]
            action.help = f"{action.help} [default: published {published}, scratch {scratch}]"
