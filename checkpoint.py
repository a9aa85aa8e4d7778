"""Checkpoint files of the STAR network: this project's self-describing checkpoints (:func:`make_checkpoint`,
:func:`save_checkpoint`) and the published raw ``state_dict``, both read by :func:`load_checkpoint` with
``torch.load(weights_only=True)``; an unusable file raises a one-line :class:`CheckpointError`.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn

from files import atomic_write
from model import STAR
from video import IMAGENET_MEAN, IMAGENET_STD

# What the published raw state_dict was trained with; it does not store any of it.
PUBLISHED_CLASS_NAMES = ("fight", "collapse")
PUBLISHED_PREPROCESSING = {"num_frames": 16, "img_size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
CLASS_LAYER = "head.class_head.3"


class CheckpointError(Exception):
    """A checkpoint or weights file that cannot be used; the message is one line naming the file."""


def model_args_from(num_classes: int, **overrides) -> dict:
    """The full constructor arguments of ``STAR`` (defaults filled in), as stored in checkpoints."""
    args = {"num_classes": num_classes, "num_queries": 12, "hidden_dim": 256, "num_decoder_layers": 4,
            "nheads": 8, "dim_feedforward": 2048, "dropout": 0.1, "max_positions": 10000, "aux_loss": True,
            "tube_steps": 0, "time_tokens": None, "time_grid": 2}
    unknown = set(overrides) - set(args)
    if unknown:
        raise TypeError(f"unknown model arguments: {sorted(unknown)}")
    args.update(overrides)
    return args


def _torch_load(path: Path) -> dict:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = lines[0] if lines else "unpickling failed"
        if "GLOBAL" in str(err):   # it names a Python callable/class: code, refused (garbage fails otherwise)
            raise CheckpointError(
                f"{path}: refused: the file carries pickled Python objects, not only tensors; STAR loads "
                "checkpoints with weights_only=True and runs no code from them (re-save it as a state_dict)") from None
        detail = next((line for line in lines if line.startswith("Unsupported operand")), first)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({detail})") from None
    except Exception as err:  # noqa: BLE001 -- the weights-only unpickler raises KeyError, IndexError, ... on garbage
        detail = type(err).__name__ + (f": {str(err).strip().splitlines()[0]}" if str(err).strip() else "")
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({detail})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a STAR checkpoint or state_dict")
    return obj


def _raw_model_args(state: dict, path: Path) -> dict:
    """Read the network's size from the tensor shapes of a raw (published) state_dict."""
    try:
        class_weight = state[f"{CLASS_LAYER}.weight"]
        layers = {k.split(".")[3] for k in state if k.startswith("decoder.decoder.layers.")}
        return model_args_from(
            class_weight.shape[0] - 1, num_queries=state["queries.weight"].shape[0],
            hidden_dim=state["queries.weight"].shape[1], num_decoder_layers=len(layers),
            dim_feedforward=state["decoder.decoder.layers.0.linear1.weight"].shape[0],
            max_positions=state["pos_embedding.embedding.weight"].shape[0])
    except (KeyError, AttributeError, IndexError) as err:
        raise CheckpointError(f"{path}: not a STAR checkpoint (missing {err})") from None


def load_checkpoint(path, device="cpu", class_names=None) -> tuple[STAR, dict]:
    """Load a STAR checkpoint (this project's, or the published raw ``state_dict``) for inference.

    Returns ``(model, info)``: the model in eval mode on ``device``; ``info`` has ``class_names`` (foreground,
    index = contiguous class id), ``num_frames``, ``img_size``, ``mean``, ``std``, ``model_args``, ``source``
    (``"project"`` or ``"raw_state_dict"``) and ``checkpoint`` (the loaded dict of a project checkpoint, else
    None). ``class_names`` overrides stored names. An unusable file: a one-line :class:`CheckpointError`.
    """
    path = Path(path)
    obj = _torch_load(path)
    if obj.get("format") == "star":
        try:
            state, model_args = obj["model"], model_args_from(**obj["model_args"])
            names, prep, source = list(obj["class_names"]), dict(obj["preprocessing"]), "project"
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: incomplete STAR checkpoint ({type(err).__name__}: {err})") from None
    else:
        state, model_args, source = obj, _raw_model_args(obj, path), "raw_state_dict"
        prep = dict(PUBLISHED_PREPROCESSING)
        n = model_args["num_classes"]
        names = list(PUBLISHED_CLASS_NAMES) if n == len(PUBLISHED_CLASS_NAMES) else [f"class_{i}" for i in range(n)]
    names = checked_class_names(class_names, model_args["num_classes"], path) or names
    model = STAR(**model_args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the STAR network ({str(err).splitlines()[0]})") from None
    info = {"class_names": names, "model_args": model_args, "source": source,
            "checkpoint": obj if source == "project" else None, **prep}
    return model.to(device).eval(), info


def checked_class_names(class_names, num_classes: int, path) -> list[str] | None:
    """``--class_names`` for a model of ``num_classes`` read from ``path``: a list, None when not given, or a
    one-line CheckpointError when the count differs."""
    if not class_names:
        return None
    if len(class_names) != num_classes:
        raise CheckpointError(f"{path}: has {num_classes} classes but {len(class_names)} "
                              f"class names were given ({', '.join(class_names)})")
    return list(class_names)


def make_checkpoint(model: nn.Module, model_args: dict, class_names, preprocessing: dict, **extra) -> dict:
    """A self-describing checkpoint dict, loadable with ``torch.load(weights_only=True)`` (so ``extra`` holds no
    numpy objects: lists and tensors only).

    Keys: ``format="star"``, ``version=1``, ``model`` (state_dict), ``model_args`` (:func:`model_args_from`),
    ``class_names`` (foreground, index = contiguous class id), ``preprocessing`` {``num_frames``, ``img_size``,
    ``mean``, ``std``, ``window_sec``}, plus ``extra`` (main.py: ``raw_class_ids``, ``args``, ``epoch``,
    ``metrics``; in checkpoint.pth also ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``best_score``,
    ``precision``, ``ema``)."""
    model = getattr(model, "module", model)   # unwrap DistributedDataParallel
    return {"format": "star", "version": 1, "model": model.state_dict(), "model_args": dict(model_args),
            "class_names": list(class_names), "preprocessing": dict(preprocessing), **extra}


def save_checkpoint(obj: dict, path) -> None:
    """Write atomically (:func:`files.atomic_write`, flushed to the disk): never a half-written file."""
    try:
        with atomic_write(path, "wb", fsync=True) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:
        # a full disk surfaces as OSError, or as torch's RuntimeError from its zip writer: one line, the old file kept
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointError(f"{path}: cannot write the checkpoint ({reason}); the previous file is unchanged") from None
