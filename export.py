#!/usr/bin/env python
"""Export a STAR checkpoint to ONNX (fp32, optionally int8) and check it against PyTorch.

    python export.py --model_path best_model.pth --output star.onnx [--int8] [--check_videos DIR]

The whole network (trunk, decoder, heads) becomes one ONNX graph: input ``clips`` ``(B, T, 3, S, S)``
float32 (preprocessed as for PyTorch: RGB, /255, mean/std), outputs ``pred_logits`` ``(B, Q, C+1)`` and
``pred_boxes`` ``(B, Q, 4)``. The batch axis is free; T and S are fixed at export (the checkpoint's, or
``--num_frames``/``--img_size``). Class names and preprocessing go into the model's metadata, so
``test.py --model_path star.onnx`` (backend.py) needs nothing else.

Parity: PyTorch and onnxruntime run the same check clips (real ones from ``--check_videos``, else random)
and the largest differences of logits, probabilities and boxes and the top-class agreement are printed.
fp32 must agree within ``--tolerance`` on probabilities and boxes. ``--int8`` quantises statically
(QDQ, per-channel int8 weights, uint8 activations; calibration clips from ``--calibration_dir``) into
``<output>.int8.onnx``, which is kept only when it says the same top class as PyTorch on every check clip
and, unless ``--force_int8``, runs faster than the fp32 export here. A checkpoint that cannot be exported
or a model that fails its bound: one line, exit code 2, and no file is left behind.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

import backend
import checkpoint
import model as star_model
import model_setup
import video
from cutting import choose_cut
from model_description import ModelDescription
from runtime import UsageError, one_line, writable_dir

EXIT_ERROR = 2
DEFAULT_OPSET = 17          # LayerNormalization is one op from 17 on; onnxruntime >= 1.14 runs it
TRACE_BATCH = 2             # traced with 2 clips so no shape is specialised to a batch of 1
FP32_TOLERANCE = 1e-3       # on probabilities and boxes: the CSV's scores and boxes
DEPLOY_HINT = "pip install onnx onnxruntime (or pip install -r requirements-deploy.txt)"


class ExportError(Exception):
    """The network cannot be exported, or the export fails its parity bound; one line, exit code 2."""


# --------------------------------------------------------------------------- command line


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a STAR checkpoint to ONNX (fp32, optionally int8) "
                                     "with a parity check against PyTorch", add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", default="best_model.pth",
                        help="STAR checkpoint (this project's, or the published raw state_dict)")
    parser.add_argument("--output", default="star.onnx", help="the fp32 ONNX file to write (.onnx)")
    parser.add_argument("--class_names", nargs="+", default=None,
                        help="class names in class-id order (for a raw state_dict, which stores none)")
    parser.add_argument("--num_frames", type=_positive_int, default=None,
                        help="frames per clip T fixed in the graph (default: the checkpoint's)")
    parser.add_argument("--img_size", type=_positive_int, default=None,
                        help="frame size S fixed in the graph (default: the checkpoint's)")
    parser.add_argument("--opset", type=_positive_int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--check_videos", default=None, metavar="DIR",
                        help="folder of videos whose clips check the parity (default: random clips)")
    parser.add_argument("--check_clips", type=_positive_int, default=8,
                        help="how many clips check the parity (spread over the videos' windows)")
    parser.add_argument("--tolerance", type=float, default=FP32_TOLERANCE,
                        help="fp32 bound: largest allowed difference of probabilities and boxes")
    parser.add_argument("--int8", action="store_true",
                        help="also write an int8 model (static QDQ quantisation) as <output stem>.int8.onnx")
    parser.add_argument("--int8_output", default=None, help="where the int8 model goes (default: <output stem>.int8.onnx)")
    parser.add_argument("--calibration_dir", default=None, metavar="DIR",
                        help="folder of videos for the int8 calibration (default: the check videos, else random clips)")
    parser.add_argument("--calibration_clips", type=_positive_int, default=16,
                        help="how many clips calibrate the int8 activation ranges")
    parser.add_argument("--force_int8", action="store_true",
                        help="keep the int8 model even when it is not faster here (e.g. to deploy on another CPU); "
                             "it must still say the same top class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random check/calibration clips")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def validate_args(args) -> None:
    """Cross-flag checks argparse cannot do (UsageError)."""
    if not backend.is_onnx(args.output):
        raise UsageError(f"--output {args.output}: must end in .onnx (that is how --model_path tells an ONNX file)")
    if args.int8_output and not backend.is_onnx(args.int8_output):
        raise UsageError(f"--int8_output {args.int8_output}: must end in .onnx")
    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise UsageError(f"--tolerance must be a positive number, got {args.tolerance}")
    for flag in ("check_videos", "calibration_dir"):
        folder = getattr(args, flag)
        if folder is not None and not Path(folder).is_dir():
            raise UsageError(f"--{flag} {folder}: not a folder")


def int8_path(args) -> Path:
    """``--int8_output``, else ``star.onnx`` -> ``star.int8.onnx``."""
    if args.int8_output:
        return Path(args.int8_output)
    out = Path(args.output)
    return out.with_name(out.stem + ".int8" + out.suffix)


def require_deploy_packages() -> None:
    """onnx (writing, metadata) and onnxruntime (parity, quantisation), or a one-line UsageError."""
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise UsageError(f"export needs the {name} package: {DEPLOY_HINT}") from None


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def temp_beside(path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (so ``os.replace`` onto ``path`` is atomic); whatever is
    still there when the block ends (an error, or a result not kept) is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def commit(tmp: Path, path: Path) -> None:
    """Move a finished temporary file onto ``path`` with the permissions of an ordinary new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp made it private
    os.replace(tmp, path)


def size_mb(path) -> float:
    return os.path.getsize(path) / 1e6


# --------------------------------------------------------------------------- the network


def load_network(args) -> tuple[star_model.STAR, ModelDescription]:
    """The checkpoint as the graph will hold it: eval, BatchNorm folded (prepare_for_inference), and its description
    with ``num_frames``/``img_size`` replaced by the flags when given."""
    net, info = checkpoint.load_checkpoint(args.model_path, device="cpu", class_names=args.class_names)
    desc = ModelDescription.from_info(info)   # the loaded dict (optimizer state...) is not kept
    for key in ("num_frames", "img_size"):
        wanted, own = getattr(args, key), getattr(desc, key)
        if wanted is not None and wanted != own:
            print(f"note: --{key} {wanted}, the checkpoint's is {own}: predictions at another clip size differ")
    desc = desc.with_clip(args.num_frames, args.img_size)
    tokens = token_count(desc.num_frames, desc.img_size, net.backbone.time_proj is not None, net.backbone.time_grid)
    table = desc.model_args["max_positions"]
    if tokens > table:
        raise ExportError(f"{args.model_path}: {desc.num_frames} frames x {desc.img_size} px make {tokens} tokens, "
                          f"more than its position table holds ({table}); use fewer frames or a smaller size")
    model_setup.prepare_for_inference(net)
    return net, desc


def token_count(num_frames: int, img_size: int, time_tokens: bool = False, time_grid: int = 2) -> int:
    """Trunk tokens of a ``T x S x S`` clip: R(2+1)D-18 halves time 3 times and space 4 times (each
    stride-2 conv rounds up), as ``model.token_grid`` measures, without running the trunk; with the tube
    mode's ``time_tokens``, the position rows of its memory and locator tokens (``T * (1 + time_grid**2)`` per place)."""
    def halve(n: int, times: int) -> int:
        for _ in range(times):
            n = (n + 1) // 2
        return n
    return (halve(num_frames, 3) + (num_frames * (1 + time_grid ** 2) if time_tokens else 0)) * halve(img_size, 4) ** 2


class GraphModule(torch.nn.Module):
    """What is traced: STAR's forward as the tuple ``(pred_logits, pred_boxes)`` (no aux outputs)."""

    def __init__(self, net: star_model.STAR):
        super().__init__()
        self.net = net

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(clips, return_aux=False)
        return out["pred_logits"], out["pred_boxes"]


@contextlib.contextmanager
def exportable(net: star_model.STAR) -> Iterator[GraphModule]:
    """``net`` wrapped for the TorchScript exporter, restored afterwards.

    - MultiheadAttention's inference fast path is an op (``_native_multi_head_attention``) ONNX lacks:
      off, so the decoder traces as MatMul/Softmax (same arithmetic);
    - channels_last_3d: ONNX has no memory formats (the exporter refuses ``contiguous(memory_format)``);
      the runtime picks its own layout, so the input conversion is skipped;
    - the wrapper is put in eval mode: the exporter restores the wrapper's mode afterwards, and a fresh
      module is in training mode, which would switch dropout on in ``net``."""
    fastpath, channels_last = torch.backends.mha.get_fastpath_enabled(), net.channels_last
    torch.backends.mha.set_fastpath_enabled(False)
    net.channels_last = False
    try:
        yield GraphModule(net).eval()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        net.channels_last = channels_last
        net.eval()


def export_graph(net: star_model.STAR, desc: ModelDescription, opset: int, name: str):
    """Trace ``net`` into an ONNX ``ModelProto``: input ``clips`` ``(batch, T, 3, S, S)``, outputs
    ``pred_logits``, ``pred_boxes``. In memory, so the metadata is added before the one write to disk.
    ``name`` (the checkpoint) is for the error message."""
    import onnx
    size = desc.img_size
    example = torch.zeros(TRACE_BATCH, desc.num_frames, 3, size, size)
    axes = {key: {0: "batch"} for key in (backend.INPUT_NAME, *backend.OUTPUT_NAMES)}
    buffer = io.BytesIO()
    with exportable(net) as graph, torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter's deprecation note and the position table's size check (a constant here)
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[backend.INPUT_NAME], output_names=list(backend.OUTPUT_NAMES),
                              dynamic_axes=axes, do_constant_folding=True)
        except (RuntimeError, ValueError, TypeError) as err:   # OnnxExporterError is a RuntimeError
            raise ExportError(f"{name}: the network cannot be exported to ONNX opset {opset} "
                              f"({type(err).__name__}: {one_line(err)})") from None
    return onnx.load_from_string(buffer.getvalue())


def metadata(desc: ModelDescription, precision: str, source: str) -> dict[str, str]:
    """metadata_props of a STAR export: JSON values (backend.read_metadata reads them back): ``backend.META_KEYS``,
    the training window where the checkpoint records one (``backend.OPTIONAL_META_KEYS``), the format, precision and
    source."""
    meta = {key: getattr(desc, key) for key in backend.META_KEYS}   # tuples: JSON lists
    if desc.records_window:
        meta.update({key: getattr(desc, key) for key in backend.OPTIONAL_META_KEYS})
    meta.update({backend.FORMAT_KEY: backend.FORMAT_VERSION, "precision": precision, "source_checkpoint": source})
    return {key: json.dumps(value) for key, value in meta.items()}


def set_metadata(proto, meta: dict[str, str]) -> None:
    """Set ``meta`` in an ONNX ``ModelProto`` (replacing keys already there)."""
    kept = {p.key: p.value for p in proto.metadata_props if p.key not in meta}
    del proto.metadata_props[:]
    for key, value in {**kept, **meta}.items():
        proto.metadata_props.add(key=key, value=value)


def write_metadata(path, meta: dict[str, str]) -> None:
    """Set ``meta`` in the ONNX file at ``path``."""
    import onnx
    proto = onnx.load(os.fspath(path))
    set_metadata(proto, meta)
    onnx.save(proto, os.fspath(path))


# --------------------------------------------------------------------------- clips


def video_files(folder) -> list[Path]:
    """The video files in ``folder`` (not recursive), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and video.is_video_file(p.name))


def clips_from_videos(folder, count: int, desc: ModelDescription) -> list[torch.Tensor]:
    """Up to ``count`` preprocessed clips ``(T, 3, S, S)``, spread over the videos of ``folder``: a whole
    video sampled uniformly (as test.py does) when one clip per video is enough, else windows of it.
    A video that cannot be read is skipped with a note; none readable is a UsageError."""
    videos = video_files(folder)
    if not videos:
        raise UsageError(f"{folder}: no videos ({' '.join(video.VIDEO_EXTENSIONS)})")
    per_video = math.ceil(count / len(videos))
    clips = []
    for path in videos:
        try:
            clips += [prep(frames, desc) for frames in video_windows(path, desc.num_frames, per_video)]
        except video.VideoError as err:
            print(f"note: {path.name} skipped: {one_line(err, path)}")
    if not clips:
        raise UsageError(f"{folder}: none of its videos could be read")
    return clips[:count]


def video_windows(path, num_frames: int, count: int) -> list[np.ndarray]:
    """``count`` clips of ``path`` as ``(T, H, W, 3)`` uint8: the uniformly sampled whole video, or
    ``count`` back-to-back windows (:func:`cutting.choose_cut`'s windows of a given length)."""
    if count == 1:
        return [video.sample_clip(path, num_frames)[0]]
    cut = choose_cut(window_sec=video.probe_video(path).duration_sec / count)
    return [frames for frames, _, _ in video.iter_windows(path, num_frames, cut.window_sec, cut.stride_sec)][:count]


def prep(frames: np.ndarray, desc: ModelDescription) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, S, S)`` float32, the one preprocessing (video.preprocess)."""
    return video.preprocess(frames, desc.img_size, desc.mean, desc.std)


def random_clips(count: int, desc: ModelDescription, seed: int) -> list[torch.Tensor]:
    """``count`` clips ``(T, 3, S, S)`` of N(0, 1) noise: the range of normalised pixels."""
    gen = torch.Generator().manual_seed(seed)
    size = desc.img_size
    return [torch.randn(desc.num_frames, 3, size, size, generator=gen) for _ in range(count)]


def check_clips(args, desc: ModelDescription) -> tuple[list[torch.Tensor], str]:
    """The parity clips and where they come from (for the report)."""
    if args.check_videos:
        clips = clips_from_videos(args.check_videos, args.check_clips, desc)
        return clips, f"{len(clips)} clips from {args.check_videos}"
    return random_clips(args.check_clips, desc, args.seed), f"{args.check_clips} random clips"


# --------------------------------------------------------------------------- running and comparing


def run_torch(net: star_model.STAR, clips: Sequence[torch.Tensor]) -> tuple[list[dict], list[float]]:
    """PyTorch fp32 outputs (numpy ``pred_logits`` (Q, C+1), ``pred_boxes`` (Q, 4)) of each clip, one at a
    time, and the seconds of each call (after one untimed call: the first one allocates)."""
    outs, seconds = [], []
    with torch.inference_mode():
        net(clips[0][None])
        for clip in clips:
            start = time.perf_counter()
            out = net(clip[None])
            seconds.append(time.perf_counter() - start)
            outs.append({k: out[k][0].float().numpy() for k in backend.OUTPUT_NAMES})
    return outs, seconds


def run_onnx(model: backend.OnnxModel, clips: Sequence[torch.Tensor]) -> tuple[list[dict], list[float]]:
    """As :func:`run_torch` for an ONNX model; one untimed call first (the session's first run allocates)."""
    model(clips[0][None])
    outs, seconds = [], []
    for clip in clips:
        start = time.perf_counter()
        out = model(clip[None])
        seconds.append(time.perf_counter() - start)
        outs.append({k: out[k][0].numpy() for k in backend.OUTPUT_NAMES})
    return outs, seconds


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (class probabilities of each query)."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def top_class(logits: np.ndarray) -> int:
    """The clip's top class: the foreground class of the query with the highest foreground probability
    (what the published rule reports first). ``logits`` ``(Q, C+1)`` or, tube mode, ``(Q, K, C+1)``."""
    foreground = softmax(logits)[..., :-1].reshape(-1, logits.shape[-1] - 1)   # tube mode: every (query, step)
    return int(foreground[foreground.max(-1).argmax()].argmax())


def parity(ref: Sequence[dict], out: Sequence[dict]) -> dict:
    """Largest absolute differences over all clips (logits, probabilities, boxes), the share of clips
    with the same top class and the share of queries with the same arg-max class (incl. no_object)."""
    def worst(fn) -> float:
        return float(max(np.abs(fn(a) - fn(b)).max() for a, b in zip(ref, out)))
    same_top = [top_class(a["pred_logits"]) == top_class(b["pred_logits"]) for a, b in zip(ref, out)]
    same_query = [np.mean(a["pred_logits"].argmax(-1) == b["pred_logits"].argmax(-1)) for a, b in zip(ref, out)]
    return {"logits": worst(lambda o: o["pred_logits"]), "probs": worst(lambda o: softmax(o["pred_logits"])),
            "boxes": worst(lambda o: o["pred_boxes"]), "top_same": int(sum(same_top)), "clips": len(same_top),
            "query_agreement": float(np.mean(same_query))}


def parity_line(name: str, p: dict) -> str:
    """One report line of a :func:`parity` dict."""
    return (f"{name}: max |diff| logits {p['logits']:.2e}, probabilities {p['probs']:.2e}, boxes {p['boxes']:.2e}; "
            f"same top class on {p['top_same']}/{p['clips']} clips, query classes {100 * p['query_agreement']:.1f}%")


def check_batch(model: backend.OnnxModel, clips: Sequence[torch.Tensor], singles: Sequence[dict], tolerance: float) -> None:
    """The dynamic batch axis works: two clips in one call give what they give one by one."""
    if len(clips) < 2:
        return
    out = model(torch.stack(list(clips[:2])))
    batched = [{k: out[k][i].numpy() for k in backend.OUTPUT_NAMES} for i in range(2)]
    p = parity(singles[:2], batched)
    if max(p["probs"], p["boxes"]) > tolerance:
        raise ExportError(f"a batch of 2 clips differs from the same clips one by one ({parity_line('batch', p)})")


# --------------------------------------------------------------------------- fp32


def export_fp32(args, net, desc, clips, ref) -> tuple[backend.OnnxModel, list[float]]:
    """Export, check against ``ref`` (PyTorch's outputs on ``clips``), then write ``--output``.
    Returns the fp32 model and its seconds per clip (the int8 model is timed against it)."""
    import onnx
    out_path = Path(args.output)
    start = time.perf_counter()
    with temp_beside(out_path) as tmp:
        proto = export_graph(net, desc, args.opset, args.model_path)
        set_metadata(proto, metadata(desc, "fp32", Path(args.model_path).name))
        onnx.save(proto, os.fspath(tmp))
        del proto   # ~4 bytes a parameter: not kept while onnxruntime holds its own copy
        model = backend.OnnxModel(tmp)
        seconds_export = time.perf_counter() - start
        outs, seconds = run_onnx(model, clips)
        p = parity(ref, outs)
        print(parity_line("onnxruntime fp32 vs PyTorch fp32", p))
        if max(p["probs"], p["boxes"]) > args.tolerance:
            raise ExportError(f"{out_path}: not written: onnxruntime fp32 differs from PyTorch by "
                              f"{max(p['probs'], p['boxes']):.2e} (bound {args.tolerance:g} on probabilities and boxes)")
        check_batch(model, clips, outs, args.tolerance)
        commit(tmp, out_path)
    print(f"wrote {out_path} ({size_mb(out_path):.1f} MB, opset {args.opset}, exported in {seconds_export:.1f} s; "
          f"parity within {args.tolerance:g}: OK)")
    return model, seconds


# --------------------------------------------------------------------------- int8


def calibration_reader(clips: Sequence[torch.Tensor]):
    """An onnxruntime ``CalibrationDataReader`` over ``clips``, one ``(1, T, 3, S, S)`` clip per batch.
    ``set_range``/``__len__`` let ``CalibStridedMinMax`` merge ranges clip by clip, so memory holds one
    clip's activations (``CalibMaxIntermediateOutputs`` drops data in onnxruntime 1.32: it clears
    without merging)."""
    from onnxruntime.quantization import CalibrationDataReader

    class ClipReader(CalibrationDataReader):
        def __init__(self):
            self.feeds = [{backend.INPUT_NAME: clip[None].numpy()} for clip in clips]
            self.pending = iter(self.feeds)

        def __len__(self) -> int:
            return len(self.feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(self.feeds[start_index:end_index])

        def get_next(self):
            return next(self.pending, None)

        def rewind(self) -> None:
            self.pending = iter(self.feeds)

    return ClipReader()


def quantize_int8(fp32_path, out_path, calib: Sequence[torch.Tensor]) -> None:
    """Static int8 quantisation of ``fp32_path`` into ``out_path``: the Conv layers (the trunk: nearly all
    of the FLOPs) in QDQ format, per-channel int8 weights, uint8 activations with min-max ranges from
    ``calib``; the decoder and heads stay fp32. Why: quantising the decoder too gains no time and loses accuracy,
    and dynamic quantisation (ConvInteger) is slower than fp32 (docs/EXPERIMENTS.md, "Speed")."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with temp_beside(out_path) as pre:
        try:
            # shapes and constant folding first, as onnxruntime's quantisation guide advises
            quant_pre_process(os.fspath(fp32_path), os.fspath(pre), skip_symbolic_shape=True)
            quantize_static(os.fspath(pre), os.fspath(out_path), calibration_reader(calib),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"], per_channel=True,
                            activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, extra_options={"CalibStridedMinMax": 1})
        except (RuntimeError, ValueError, TypeError, OSError) as err:
            raise ExportError(f"int8 quantisation failed ({type(err).__name__}: {one_line(err)})") from None


def calibration_clips(args, desc, check: Sequence[torch.Tensor], check_source: str) -> tuple[list, str]:
    """Clips that set the int8 ranges: ``--calibration_dir``, else the check clips (then the parity is
    measured on the calibration data, which flatters it: said in the report)."""
    if args.calibration_dir:
        clips = clips_from_videos(args.calibration_dir, args.calibration_clips, desc)
        return clips, f"{len(clips)} clips from {args.calibration_dir}"
    return list(check), f"the check clips ({check_source}; no --calibration_dir: parity is on calibration data)"


def keep_int8(p: dict, fp32_seconds: float, int8_seconds: float, force: bool, out_path) -> bool:
    """Whether the int8 model is worth writing: it must say PyTorch's top class on every check clip (else
    an ExportError: exit 2) and be faster than the fp32 export here, unless ``force``."""
    if p["top_same"] < p["clips"]:
        raise ExportError(f"{out_path}: not written: the int8 model says another top class than PyTorch on "
                          f"{p['clips'] - p['top_same']} of {p['clips']} check clips (the fp32 model is written)")
    return force or int8_seconds < fp32_seconds


def best_seconds(models: dict, clip: torch.Tensor, rounds: int = 3) -> dict[str, float]:
    """The fastest of ``rounds`` calls of each model on ``clip`` ``(T, 3, S, S)``; the models take turns, so
    that load from other processes slows them alike (the speed decision must not hinge on it)."""
    seconds = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(clip[None])
            seconds[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in seconds.items()}


def export_int8(args, desc, clips, ref, check_source, fp32_model: backend.OnnxModel) -> bool:
    """Quantise ``--output``, check it and write it where it passes. Returns True when written."""
    out_path = int8_path(args)
    calib, calib_source = calibration_clips(args, desc, clips, check_source)
    start = time.perf_counter()
    with temp_beside(out_path) as tmp:
        quantize_int8(args.output, tmp, calib)
        write_metadata(tmp, metadata(desc, "int8", Path(args.model_path).name))
        print(f"int8: calibrated on {calib_source} in {time.perf_counter() - start:.1f} s")
        int8_model = backend.OnnxModel(tmp)
        outs, _ = run_onnx(int8_model, clips)
        p = parity(ref, outs)
        print(parity_line("onnxruntime int8 vs PyTorch fp32", p))
        best = best_seconds({"fp32": fp32_model, "int8": int8_model}, clips[0])
        fp32_s, int8_s = best["fp32"], best["int8"]
        print(f"speed (best of 3, taking turns): onnxruntime fp32 {fp32_s:.3g} s/clip, int8 {int8_s:.3g} s/clip "
              f"({fp32_s / int8_s:.2f}x)")
        if not keep_int8(p, fp32_s, int8_s, args.force_int8, out_path):
            print(f"int8 not kept: no faster than fp32 on this CPU; use {args.output} "
                  "(--force_int8 keeps it, e.g. for another CPU)")
            return False
        commit(tmp, out_path)
    print(f"wrote {out_path} ({size_mb(out_path):.1f} MB; same top class on every check clip)")
    return True


# --------------------------------------------------------------------------- main


def describe(args, desc: ModelDescription) -> str:
    """One line: what is exported."""
    return (f"{args.model_path} ({desc.source}, {len(desc.class_names)} classes: {', '.join(desc.class_names)}; "
            f"{desc.num_frames} frames x {desc.img_size} px)")


def main(args) -> int:
    validate_args(args)
    require_deploy_packages()
    out_path = Path(args.output)
    writable_dir(out_path.parent, "--output")   # before the model is loaded: a bad folder costs no export
    if args.int8:
        writable_dir(int8_path(args).parent, "--int8_output")
    net, desc = load_network(args)
    print(f"exporting {describe(args, desc)} -> {out_path}")
    clips, source = check_clips(args, desc)
    print(f"checking on {source}")
    try:
        ref, torch_seconds = run_torch(net, clips)
    except (RuntimeError, ValueError) as err:   # e.g. out of memory at a large --img_size
        raise ExportError(f"{args.model_path}: PyTorch cannot run it on these clips ({one_line(err)})") from None
    fp32_model, fp32_seconds = export_fp32(args, net, desc, clips, ref)
    print(f"speed: PyTorch fp32 {np.median(torch_seconds):.3g} s/clip, onnxruntime fp32 {np.median(fp32_seconds):.3g} s/clip")
    if args.int8:
        export_int8(args, desc, clips, ref, source, fp32_model)
    return 0


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except (UsageError, checkpoint.CheckpointError, ExportError, video.VideoError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:   # a full disk or an unwritable folder while writing
        print(f"error: {args.output}: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
