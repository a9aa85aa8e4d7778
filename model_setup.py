"""Setting up a STAR network for a job: building it with its trunk's starting weights (Kinetics-400, a file or
random), the from-scratch inits (motion stem, sine position table), fine-tuning from a checkpoint, freezing trunk
stages for training, and BatchNorm folding and channels_last for inference.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.models.video import R2Plus1D_18_Weights, r2plus1d_18

from checkpoint import CLASS_LAYER, CheckpointError, _torch_load, model_args_from
from model import STAR, token_grid

log = logging.getLogger("star")

PRETRAINED_CHOICES = ("kinetics400", "none")


def build_model(num_classes: int, pretrained: str | os.PathLike = "none", **model_kwargs) -> STAR:
    """A new STAR network with its trunk initialised as ``pretrained`` says (see ``load_trunk_weights``)."""
    model = STAR(**model_args_from(num_classes, **model_kwargs))
    load_trunk_weights(model, pretrained)
    return model


def load_trunk_weights(model: STAR, pretrained: str | os.PathLike) -> None:
    """Initialise the R(2+1)D-18 trunk: ``"kinetics400"`` (torchvision weights API: hub cache or
    download), ``"none"`` (random), or a path to an ``r2plus1d_18`` state_dict file."""
    if pretrained in (None, "none"):
        return
    if pretrained == "kinetics400":
        weights = R2Plus1D_18_Weights.KINETICS400_V1
        try:
            state = weights.get_state_dict(progress=False)
        except (OSError, RuntimeError, ValueError) as err:   # URLError is an OSError
            raise CheckpointError(
                f"could not get the Kinetics-400 R(2+1)D-18 weights ({weights.url}): {str(err).splitlines()[0]}. "
                "Without internet: train from scratch with --pretrained none, or download that file elsewhere and "
                f"pass --backbone_weights PATH (or put it in {torch.hub.get_dir()}/checkpoints/)") from None
        source = weights.url
    else:
        state = _torch_load(Path(pretrained))
        source = str(pretrained)
    trunk = r2plus1d_18(weights=None)
    try:
        trunk.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: not an r2plus1d_18 state_dict ({str(err).splitlines()[0]})") from None
    model.backbone.stem.load_state_dict(
        nn.Sequential(trunk.stem, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4).state_dict())
    log.info("trunk initialised from %s", source)


def load_for_finetuning(model: STAR, path) -> list[str]:
    """Copy a checkpoint's weights into ``model``; the last class layer is skipped when the number of
    classes differs. Returns the keys that were not loaded (and logs them)."""
    path = Path(path)
    obj = _torch_load(path)
    state = obj["model"] if obj.get("format") == "star" else obj
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k.startswith(CLASS_LAYER) and k in own and own[k].shape != v.shape]
    kept = {k: v for k, v in state.items() if k not in skipped}
    try:
        model.load_state_dict(kept, strict=False)
        missing = [k for k in own if k not in kept]
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit this STAR network ({str(err).splitlines()[0]})") from None
    if sorted(missing) != sorted(skipped):
        raise CheckpointError(f"{path}: not a STAR checkpoint (missing keys such as {missing[:3]})")
    if skipped:
        log.info("fine-tuning from %s: class layer %s re-initialised (%d classes there, %d here)", path,
                 CLASS_LAYER, state[f"{CLASS_LAYER}.weight"].shape[0] - 1, model.num_classes)
    else:
        log.info("initialised all weights from %s", path)
    return skipped


def motion_stem_conv(model: STAR) -> nn.Conv3d:
    """The trunk's first conv that mixes frames (R(2+1)D-18: the stem's (3, 1, 1) conv after its (1, 7, 7)
    spatial conv): the one :func:`init_motion_stem` acts on."""
    return next(m for m in model.backbone.stem.modules() if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1)


def init_motion_stem(model: STAR) -> None:
    """Make every temporal kernel of the trunk's stem sum to zero over time (a from-scratch init, and
    the projection main.py applies after every step with ``--motion_constraint``).

    Why: such a kernel answers only to change, so from its first step the trunk sees the actor's motion rather than
    the look of the scene, which a few dozen videos otherwise teach it to memorise (docs/EXPERIMENTS.md, "Motion init
    and motion constraint"). Without the constraint training may move the kernels afterwards."""
    temporal = motion_stem_conv(model)
    with torch.no_grad():
        temporal.weight -= temporal.weight.mean(dim=2, keepdim=True)


def freeze_trunk_stages(model: STAR, num_stages: int) -> None:
    """Keep the first ``num_stages`` of the trunk's five stages (stem, layer1..layer4) at their weights.

    Why: the backward pass through the early, high-resolution stages is most of a CPU step (bench/README.md).
    Their BatchNorm statistics still follow the data in training."""
    for stage in list(model.backbone.stem)[:num_stages]:
        for param in stage.parameters():
            param.requires_grad_(False)


def init_positions(model: STAR, num_frames: int, img_size: int) -> None:
    """:func:`init_position_table` for every token the model makes of ``num_frames`` x ``img_size`` clips: the
    trunk's grid, and in tube mode, in the rows after it, the decoder's time tokens ``(T, h, w)`` and then the
    locator's ``(T, g*h, g*w)`` (:meth:`STAR.split_tokens`, :meth:`STAR.frame_memory`)."""
    grid = token_grid(model, num_frames, img_size)
    init_position_table(model, grid)
    if model.backbone.time_proj is not None:
        K, g = model.tube_steps, model.backbone.time_grid
        init_position_table(model, (K, *grid[1:]), offset=math.prod(grid))                    # the memory's
        init_position_table(model, (K, grid[1] * g, grid[2] * g), offset=math.prod(grid) + K * grid[1] * grid[2])


def init_position_table(model: STAR, grid: tuple[int, int, int], temperature: float = 10000.0, offset: int = 0) -> None:
    """Write a sine encoding of each token's ``(t, y, x)`` place on ``grid`` into the first rows of the
    position table (a from-scratch init; the rows stay trainable, later rows keep their random init).

    The table is indexed by token number, so at random init it says nothing about where a token lies,
    and a box regressor must learn that from a few hundred steps. With DETR's sine encoding (y and x
    get half the channels each; with more than one time step, time gets a quarter and y and x
    three eighths each) the decoder can read places from its first step. The encoding holds for the grid it is written for: the checkpoint's stored
    preprocessing (``num_frames``, ``img_size``) gives the same grid at inference."""
    t, h, w = grid
    table = model.pos_embedding.embedding.weight[offset:]
    dim = table.shape[1]
    if t * h * w > table.shape[0]:
        raise ValueError(f"{offset + t * h * w} tokens exceed the position table ({offset + table.shape[0]})")
    time_dim = dim // 4 if t > 1 else 0
    space_dim = (dim - time_dim) // 2
    coords = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij"), -1)
    coords = (coords.reshape(-1, 3) + 0.5) / torch.tensor(grid, dtype=torch.float32) * 2 * math.pi   # (N, 3)

    def encode(values: torch.Tensor, channels: int) -> torch.Tensor:   # (N,) -> (N, channels), sin/cos pairs
        freqs = temperature ** (torch.arange(channels // 2, dtype=torch.float32) * 2 / channels)
        angles = values[:, None] / freqs
        return torch.stack([angles.sin(), angles.cos()], -1).flatten(1)

    parts = [encode(coords[:, 1], space_dim), encode(coords[:, 2], space_dim)]
    if time_dim:
        parts.append(encode(coords[:, 0], dim - 2 * space_dim))
    encoding = torch.cat(parts, 1)
    with torch.no_grad():
        table[:encoding.shape[0], :encoding.shape[1]] = encoding
        table[:encoding.shape[0], encoding.shape[1]:] = 0


def fold_batchnorm(module: torch.nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm3d`` that directly follows a ``Conv3d`` (also the last conv
    of a ``Conv2Plus1D`` block) into that conv's weights; the BN becomes ``Identity``. Same outputs
    (fp32 rounding), faster on a CPU (bench/README.md). Returns how many were folded. Inference only."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    folded = sum(fold_batchnorm(child) for child in module.children())
    if not isinstance(module, torch.nn.Sequential):
        return folded
    for i in range(len(module) - 1):
        bn, prev = module[i + 1], module[i]
        if not isinstance(bn, torch.nn.BatchNorm3d) or bn.training:
            continue
        if isinstance(prev, torch.nn.Sequential) and len(prev) and isinstance(prev[-1], torch.nn.Conv3d):
            prev, index = prev[-1], (prev, len(prev) - 1)
        elif isinstance(prev, torch.nn.Conv3d):
            index = (module, i)
        else:
            continue
        index[0][index[1]] = fuse_conv_bn_eval(prev, bn)
        module[i + 1] = torch.nn.Identity()
        folded += 1
    return folded


def prepare_for_inference(model: STAR) -> STAR:
    """Eval mode, BatchNorm folded into the convs and channels_last_3d weights and input: the same
    outputs (fp32 rounding), the fastest CPU path (bench/README.md, bench/bench_network.py). Inference only."""
    model.eval()
    fold_batchnorm(model)
    return model.use_channels_last()
