"""One place that turns a ``--model_path`` into the network the inference pipeline calls.

    net, info = backend.load_model("best_model.pth")   # PyTorch STAR, BN folded, channels_last_3d
    net, info = backend.load_model("star.onnx")        # onnxruntime session behind the same call
    out = net(x)   # x (B, T, 3, S, S) float32 -> {"pred_logits": (B, Q, C+1), "pred_boxes": (B, Q, 4)}

``info`` has the same keys for both: ``class_names``, ``num_frames``, ``img_size``, ``mean``, ``std``,
``model_args``, ``source`` (``project``, ``raw_state_dict`` or ``onnx``), ``checkpoint`` (the loaded
dict of a project checkpoint, else None) and, where the checkpoint stores it, ``window_sec``. An ONNX file carries them in its metadata (export.py writes
them). onnxruntime is optional: only ``.onnx`` files need it.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

import checkpoint
import model_setup
from runtime import one_line

log = logging.getLogger("star.backend")

ONNX_SUFFIX = ".onnx"
INPUT_NAME = "clips"
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
# metadata_props keys export.py writes (values are JSON); FORMAT_KEY marks a STAR export.
FORMAT_KEY = "star_format"
FORMAT_VERSION = 1
META_KEYS = ("class_names", "num_frames", "img_size", "mean", "std", "model_args")
# carried when the checkpoint has them (main.py stores the training windows; older checkpoints do not)
OPTIONAL_META_KEYS = ("window_sec",)
INSTALL_HINT = "pip install onnxruntime (or pip install -r requirements-deploy.txt)"


def is_onnx(path) -> bool:
    """True when ``path`` names an ONNX file (by its suffix, any letter case)."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


def load_model(path, device="cpu", class_names=None):
    """``(net, info)`` for a ``.pth`` checkpoint (this project's or the published raw state_dict) or a
    ``.onnx`` export. A ``.pth`` network is in eval mode, prepared for inference (BatchNorm folded,
    channels_last_3d: same outputs, faster); an ONNX one is an :class:`OnnxModel`. ``class_names``
    overrides the stored names (same count). Any unusable file: a one-line ``checkpoint.CheckpointError``."""
    if is_onnx(path):
        net = OnnxModel(path, device)
        return net, net.info_with_names(class_names)
    net, info = checkpoint.load_checkpoint(path, device=device, class_names=class_names)
    return model_setup.prepare_for_inference(net), info


def import_onnxruntime(path=None):
    """The ``onnxruntime`` module, or a one-line ``CheckpointError`` saying what to install."""
    try:
        import onnxruntime
    except ImportError:
        where = f"{path}: " if path is not None else ""
        raise checkpoint.CheckpointError(f"{where}running an ONNX model needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def onnxruntime_errors(ort) -> tuple[type[BaseException], ...]:
    """What an onnxruntime call raises on a bad file or input: its own exception classes, which are
    plain ``Exception`` subclasses (not RuntimeError), and the usual built-in ones."""
    state = getattr(getattr(ort, "capi", None), "onnxruntime_pybind11_state", None)
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    own = tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
    return own + (RuntimeError, OSError, ValueError)


def providers_for(ort, device) -> list[str]:
    """onnxruntime execution providers for ``device``: CUDA first when asked for and present, then CPU."""
    wanted_cuda = torch.device(device).type == "cuda"
    if wanted_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if wanted_cuda:
        log.warning("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu): running on the CPU")
    return ["CPUExecutionProvider"]


def read_metadata(meta: dict, path) -> dict:
    """The ``info`` dict from an ONNX file's metadata_props (JSON values), or a one-line error."""
    if FORMAT_KEY not in meta:
        raise checkpoint.CheckpointError(
            f"{path}: not a STAR export (no '{FORMAT_KEY}' in its metadata); make it with export.py")
    try:
        info = {key: json.loads(meta[key]) for key in META_KEYS}
        info["model_args"] = checkpoint.model_args_from(**info["model_args"])
    except (KeyError, ValueError, TypeError) as err:
        raise checkpoint.CheckpointError(f"{path}: incomplete STAR metadata ({type(err).__name__}: {err})") from None
    problems = metadata_problems(info)
    if problems:
        raise checkpoint.CheckpointError(f"{path}: impossible STAR metadata: {'; '.join(problems)}")
    info["class_names"] = [str(n) for n in info["class_names"]]
    for key in OPTIONAL_META_KEYS:
        if key in meta:
            info[key] = json.loads(meta[key])
    return {**info, "source": "onnx", "checkpoint": None}


def _whole(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _finite_triple(value) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def metadata_problems(info: dict) -> list[str]:
    """What in an export's metadata no STAR graph can have (a hand-edited or foreign file): sizes that are not whole
    numbers >= 1, a mean or std that is not 3 finite numbers (std above 0), class names that do not match the class
    count. Caught at load time, so the pipeline never builds a clip the graph cannot take."""
    problems = [f"{key} {info[key]!r} (must be a whole number >= 1)" for key in ("num_frames", "img_size")
                if not _whole(info[key])]
    for key in ("mean", "std"):
        if not _finite_triple(info[key]) or (key == "std" and min(info[key]) <= 0):
            problems.append(f"{key} {info[key]!r} (must be 3 finite numbers{', above 0' if key == 'std' else ''})")
    classes = info["model_args"].get("num_classes")
    if not _whole(classes):
        problems.append(f"num_classes {classes!r} (must be a whole number >= 1)")
    elif not isinstance(info["class_names"], list) or len(info["class_names"]) != classes:
        problems.append(f"class_names {info['class_names']!r} (must be {classes} names)")
    return problems


class OnnxModel:
    """A STAR ONNX export behind the PyTorch model's call: ``net(x)`` with ``x`` ``(B, T, 3, S, S)``
    float32 (any device) -> ``{"pred_logits": (B, Q, C+1), "pred_boxes": (B, Q, 4)}`` float32 tensors
    on ``x``'s device. ``T`` and ``S`` are fixed at export (``info``); the batch size is free.

    ``eval()``, ``train(False)`` and ``to(...)`` are no-ops so the pipeline can treat it as a module.
    Attributes: ``path``, ``info``, ``precision`` (``fp32`` or ``int8``), ``providers``.
    """

    training = False

    def __init__(self, path, device="cpu", threads: int | None = None):
        self.path = Path(path)
        ort = import_onnxruntime(self.path)
        self._errors = onnxruntime_errors(ort)
        if not self.path.is_file():
            raise checkpoint.CheckpointError(f"{self.path}: no such file")
        options = ort.SessionOptions()
        # torch's thread count, so OMP_NUM_THREADS / torch.set_num_threads govern both backends alike
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3   # errors only: the optimiser's notes are not the user's business
        try:
            self.session = ort.InferenceSession(os.fspath(self.path), options, providers=providers_for(ort, device))
        except self._errors as err:
            raise checkpoint.CheckpointError(
                f"{self.path}: not a readable ONNX model, truncated or corrupt ({_ort_message(err)})") from None
        self.providers = self.session.get_providers()
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = read_metadata(meta, self.path)
        self.precision = json.loads(meta.get("precision", '"fp32"'))
        self._check_signature()

    def _check_signature(self) -> None:
        """The graph must take ``clips`` and give ``pred_logits`` and ``pred_boxes`` (export.py's names)."""
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(outputs):
            raise checkpoint.CheckpointError(
                f"{self.path}: not a STAR graph (inputs {inputs}, outputs {outputs}; expected {INPUT_NAME!r} -> "
                f"{', '.join(OUTPUT_NAMES)})")
        self._check_shapes()

    def _check_shapes(self) -> None:
        """The graph's fixed input sizes must be the metadata's ``(T, 3, S, S)`` and its class logits ``C+1`` wide:
        a file that disagrees with itself is refused here, not at its first clip."""
        dims = list(self.session.get_inputs()[0].shape)
        if len(dims) != 5 or any(_fixed(d) and d != want for d, want in zip(dims[1:], self.input_shape)):
            raise checkpoint.CheckpointError(
                f"{self.path}: the graph takes clips of shape {_shape_text(dims)} but its metadata says "
                f"(B, {', '.join(map(str, self.input_shape))}) (num_frames, 3, img_size, img_size)")
        logits = {o.name: list(o.shape) for o in self.session.get_outputs()}[OUTPUT_NAMES[0]]
        width = self.info["model_args"]["num_classes"] + 1
        if logits and _fixed(logits[-1]) and logits[-1] != width:
            raise checkpoint.CheckpointError(
                f"{self.path}: the graph gives {logits[-1]} class logits but its metadata names "
                f"{width - 1} classes (+ no_object)")

    def info_with_names(self, class_names=None) -> dict:
        """A copy of ``info``, with ``class_names`` overriding the stored ones (same count, else an error)."""
        info = dict(self.info)
        names = checkpoint.checked_class_names(class_names, info["model_args"]["num_classes"], self.path)
        info["class_names"] = names or info["class_names"]
        return info

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(T, 3, S, S)``: one clip as the graph takes it."""
        size = self.info["img_size"]
        return (self.info["num_frames"], 3, size, size)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` ``(B, T, 3, S, S)`` -> ``{"pred_logits": (B, Q, C+1), "pred_boxes": (B, Q, 4)}``."""
        if x.dim() != 5 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.path.name} takes clips of shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        clips = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        try:
            logits, boxes = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: clips})
        except self._errors as err:
            raise RuntimeError(f"{self.path.name}: onnxruntime failed: {_ort_message(err)}") from None
        return {"pred_logits": torch.from_numpy(logits).to(x.device), "pred_boxes": torch.from_numpy(boxes).to(x.device)}

    forward = __call__

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise RuntimeError(f"{self.path.name}: an ONNX model cannot be trained")
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":
        """No-op: the session's provider was chosen at load time."""
        return self

    def __repr__(self) -> str:
        return f"OnnxModel({os.fspath(self.path)!r}, precision={self.precision}, providers={self.providers})"


def _fixed(dim) -> bool:
    """A graph dimension of fixed size (a free one is a name or None)."""
    return isinstance(dim, int) and dim > 0


def _shape_text(dims) -> str:
    return "(" + ", ".join(str(d) if _fixed(d) else "B" if k == 0 else str(d) for k, d in enumerate(dims)) + ")"


def _ort_message(err: BaseException) -> str:
    """onnxruntime's message without its ``[ONNXRuntimeError] : N : CODE :`` prefix, on one line."""
    text = one_line(err)
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    if text.startswith("Load model from") and "failed:" in text:   # it names the file again
        text = text.split("failed:", 1)[1].strip()
    return text
