"""Golden outputs (issue 37, "Proof that behaviour did not change"): what the code computed, with fixed seeds, when
``tests/golden/`` was recorded. A restructure that changes no behaviour gives the same numbers and the same files.

Covered, all on the CPU in fp32 at tiny sizes:

1. training: 3 steps of a clip-mode and of a tube-mode model on fixed batches (targets made by ``targets.clip_target``,
   batched by ``dataset.collate``) through ``losses.build_criterion``, ``engine.checked_losses`` and
   ``engine.optimizer_step`` (AdamW on ``engine.parameter_groups``, clipping at 0.5; clip mode: the published
   criterion, tube mode: the from-scratch recipe's): every loss term, the total, the matcher's assignments, the
   gradient norm before clipping (global and per module) at each step, and the parameter norms after the last;
2. evaluation: raw outputs (with the auxiliary ones) of a clip-mode and a tube-mode model on fixed clips, their
   post-processing (``postprocess.outputs_to_predictions``, the clip mode's detections, the tube mode's
   ``merge_duplicate_queries``, ``class_detections`` and ``tubes.clip_tubes``) and ``engine.evaluate`` (validation loss
   and metrics, frame-mAP and video-mAP included);
3. ``test.py``: predictions.csv, predictions_frames.csv and the ``--labels`` report (JSON and text) of two generated
   videos for a clip checkpoint (``conftest.tiny_checkpoint(confident=True)``'s configuration) and a tube checkpoint
   (``conftest.tube_checkpoint``'s), the latter also in windows;
4. frame-mAP and video-mAP of a hand-made prediction set against hand-made ground truth
   (``tube_metrics.TubeScorer``, ``tube_metrics.frame_map`` / ``video_map`` with their options,
   ``scoring.score_tubes`` as ``test.py --labels`` runs it);
5. ``stream.py --tube_events`` on a generated video with the tube checkpoint: every column but ``wall_time`` and
   ``latency_sec`` (no clip may be skipped, no frame dropped);
6. ONNX export parity: ``export.py``'s export of the evaluation's clip-mode model, run by onnxruntime, against the
   golden PyTorch outputs of item 2 (within 1e-4; skipped without onnx/onnxruntime).

Weights do not come from torch's global generator in construction order: every tensor of a state dict gets values
from a generator seeded with its key (:func:`keyed_state`). State-dict keys are fixed (the published checkpoint loads
strict), so the models here stay the same however the modules are built. Training runs without dropout, so no step
draws random numbers either. Torch runs on ``THREADS`` thread(s) (restored afterwards): with 2 the logits move by
up to 5e-6, the training figures by up to 1e-3 and a few CSV digits flip, run after run the same; with the count
fixed every figure here is the same from run to run.

Comparison: integers, strings and CSV text exactly (line endings normalised), floats within ``ATOL`` (absolute).

Re-recording: ``python tools/record_golden.py [NAME ...]`` (it runs this file with ``STAR_RECORD_GOLDEN=1``, which
makes these tests write the files instead of comparing, then checks them once more). Only when a change of behaviour
is intended, or before any change on a machine where the files do not reproduce (another CPU or torch: see
``tests/golden/meta.json``); the commit says why.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import pathlib
import platform
import time
import types
import zlib

import av
import numpy as np
import pytest
import torch

import checkpoint
import dataset
import detections
import engine
import inference
import metrics
import model as star_model
import model_setup
import postprocess
import scoring
import stream
import tube_metrics
import tubes
import video
from conftest import ROOT, TINY_PREP, TUBE_CKPT_ARGS, tiny_checkpoint, tube_checkpoint, write_video
from losses import build_criterion
from records import Track, VideoRecord
from targets import clip_target

import test as test_cli  # noqa: E402  (the repository's test.py: the root is first on the path, see conftest)

assert test_cli.__file__ == str(ROOT / "test.py"), test_cli.__file__

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
RECORD = os.environ.get("STAR_RECORD_GOLDEN") == "1"
ATOL = 1e-6            # floats (fp32) compared within this, absolute
EXPORT_ATOL = 1e-4     # onnxruntime against PyTorch
THREADS = 1            # torch threads while these tests run: one partition of every reduction, on any machine
CPU = torch.device("cpu")

# --------------------------------------------------------------------------- the models

NAMES = ["wave", "jump", "fall"]
IMG = 64
CLIP_ARGS = {"num_classes": 3, "num_queries": 5, "dim_feedforward": 64, "num_decoder_layers": 2, "max_positions": 600,
             "dropout": 0.0}
CLIP_T = 4
TUBE_ARGS = {"num_classes": 3, "num_queries": 4, "tube_steps": 8, "dim_feedforward": 64, "num_decoder_layers": 2,
             "max_positions": 1000, "dropout": 0.0}
TUBE_T = 8
# tube mode: the from-scratch recipe's loss weights (recipes.SCRATCH_RECIPE: ce 6, video loss 2; the rest as published);
# clip mode: build_criterion's defaults (the published recipe)
TUBE_LOSS_WEIGHTS = {"loss_ce": 6.0, "loss_bbox": 5.0, "loss_giou": 2.0}
TUBE_VIDEO_LOSS = 2.0
LR, LR_BACKBONE, WEIGHT_DECAY, GRAD_CLIP = 2e-4, 5e-4, 1e-4, 0.5
# score thresholds of the evaluation: each leaves some queries out, and lies at least 5e-4 from every score and step
# probability there (a threshold at a score would turn on its last bit)
CLIP_THRESHOLD = 0.52
TUBE_THRESHOLD = 0.12


def keyed_state(net: torch.nn.Module) -> dict:
    """Values for every tensor of ``net``'s state dict, each from a generator seeded with its key: He-uniform
    weights, N(0, 1) embeddings and queries, norms' scales in [0.75, 1.25], biases and BatchNorm means in
    [-0.1, 0.1], variances in [0.5, 1.5], locator anchors in [0.1, 0.9]; integer buffers as they are."""
    state = {}
    for key, value in net.state_dict().items():
        if not value.is_floating_point():
            state[key] = value.clone()
            continue
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        shape, leaf = tuple(value.shape), key.rsplit(".", 1)[-1]
        if leaf == "running_mean":
            x = rng.uniform(-0.1, 0.1, shape)
        elif leaf == "running_var":
            x = rng.uniform(0.5, 1.5, shape)
        elif leaf == "anchors":
            x = rng.uniform(0.1, 0.9, shape)
        elif key.endswith(("embedding.weight", "queries.weight")):
            x = rng.standard_normal(shape)
        elif value.dim() >= 2:
            bound = math.sqrt(6.0 / math.prod(shape[1:]))
            x = rng.uniform(-bound, bound, shape)
        elif "weight" in leaf:
            x = rng.uniform(0.75, 1.25, shape)
        else:
            x = rng.uniform(-0.1, 0.1, shape)
        state[key] = torch.from_numpy(np.asarray(x, np.float32).reshape(shape))
    return state


def keyed_model(args: dict) -> star_model.STAR:
    net = star_model.STAR(**checkpoint.model_args_from(**args))
    net.load_state_dict(keyed_state(net))
    return net


def weights_sum(net: torch.nn.Module) -> float:
    """A fingerprint of the weights this file made (a change here is this file's, not the code under test's)."""
    return float(sum(v.double().sum() for v in net.state_dict().values() if v.is_floating_point()))


# --------------------------------------------------------------------------- a small world: videos and their labels

W, H = 96, 72
COLOURS = np.array([[230, 70, 60], [70, 220, 90], [80, 90, 235]], np.uint8)


def _track(track_id, frames, labels, start, velocity, size=(24, 30), max_gap=12) -> Track:
    """An actor moving at ``velocity`` pixels a frame, annotated at ``frames`` (normalised xyxy, as loaded)."""
    frames = np.asarray(list(frames), np.int64)
    x, y = start[0] + velocity[0] * frames, start[1] + velocity[1] * frames
    boxes = np.stack([x, y, x + size[0], y + size[1]], 1) / [W, H, W, H]
    labels = labels if isinstance(labels, list) else [labels] * len(frames)
    return Track(track_id, frames, boxes.astype(np.float32), labels, max_gap)


def _record(name, tracks, labels=None, boxes=None, num_frames=48, fps=12.0) -> VideoRecord:
    """A record as records.load_dataset makes it (per-frame records: one entry per track and class, its enclosing box)."""
    if tracks is not None:
        pairs = {}
        for t in tracks:
            for c in sorted({c for ids in t.labels for c in ids}):
                b = t.boxes[[i for i, ids in enumerate(t.labels) if c in ids]]
                pairs[(t.track_id, c)] = [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]
        labels = [c for _, c in pairs]
        boxes = np.array(list(pairs.values()), np.float32).reshape(-1, 4)
    return VideoRecord(name, name, list(labels), np.asarray(boxes, np.float32), W, H, num_frames, fps, tracks)


def world() -> dict[str, VideoRecord]:
    """a: two actors (wave, jump); b: one actor switching wave -> fall, one doing jump and fall at once, one with a
    gap longer than max_gap; c: a 5-field (per-video) record, fall; d: per-frame labels, no action."""
    switch = [(0,)] * 6 + [(2,)] * 5
    return {
        "a": _record("a.avi", [_track(1, range(0, 45, 4), (0,), (6, 10), (1.0, 0.3)),
                               _track(2, range(8, 41, 4), (1,), (66, 30), (-0.8, 0.1))]),
        "b": _record("b.avi", [_track(1, range(0, 41, 4), switch, (10, 8), (0.9, 0.2)),
                               _track(2, range(10, 31, 4), (1, 2), (60, 26), (-0.5, 0.0)),
                               _track(3, [0, 4, 8, 30, 34, 38], (1,), (40, 4), (0.2, 0.5))]),
        "c": _record("c.avi", None, labels=[2], boxes=np.array([[20, 12, 50, 60]], np.float32) / [W, H, W, H]),
        "d": _record("d.avi", []),
    }


def render(record: VideoRecord, frames) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 frames of ``record``: a textured background that changes over time and each acting
    actor's box filled with its class's colour."""
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for f in np.asarray(list(frames), np.int64).tolist():
        img = np.stack([(xx * 2 + f * 3) % 90 + 30, (yy * 3 + xx) % 70 + 40, np.full_like(xx, 60 + (f * 7) % 40)],
                       -1).astype(np.uint8)
        if record.tracks is None:
            shown = list(zip(record.labels, record.boxes))
        else:
            shown = []
            for t in record.tracks:
                present, boxes, labels = t.at([f])
                if present[0]:
                    shown.append((labels[0][0], boxes[0]))
        for c, (x1, y1, x2, y2) in shown:
            img[int(y1 * H):int(y2 * H), int(x1 * W):int(x2 * W)] = COLOURS[c]
        out.append(img)
    return np.stack(out)


def batch(records, starts, T: int, window: int = 24):
    """``dataset.collate`` of clips (rendered, ``video.preprocess``) and their ``targets.clip_target``: a window of
    ``window`` frames from each start (None: the whole video, the published sampling)."""
    items = []
    for record, start in zip(records, starts):
        if start is None:
            idx = video.sample_indices(record.num_frames, T)
        else:
            idx = np.linspace(start, start + window - 1, T).astype(np.int64)
        clip = video.preprocess(render(record, idx), IMG, video.IMAGENET_MEAN, video.IMAGENET_STD)
        items.append((clip, clip_target(record, idx)))
    return dataset.collate(items)


def criterion_for(args: dict, tube: bool):
    """Clip mode: the published criterion (build_criterion's defaults); tube mode: the from-scratch recipe's."""
    if not tube:
        return build_criterion(args["num_classes"], args["num_decoder_layers"])
    return build_criterion(args["num_classes"], args["num_decoder_layers"], True, weights=TUBE_LOSS_WEIGHTS,
                           video_loss_coef=TUBE_VIDEO_LOSS, tube=True)


# --------------------------------------------------------------------------- golden files

def plain(x):
    """``x`` as JSON values (tensors and arrays as nested lists)."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return plain(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def differences(got, want, path="") -> list[str]:
    """Where ``got`` differs from ``want`` (JSON values): floats beyond ATOL, anything else not equal."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}: keys {sorted(set(got) ^ set(want))} only on one side"] if set(got) != set(want) else []
        return out + [d for k in sorted(set(got) & set(want)) for d in differences(got[k], want[k], f"{path}/{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: length {len(got)}, golden {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{path}[{i}]")]
    if type(got) is float and type(want) is float:
        if (math.isnan(got) and math.isnan(want)) or abs(got - want) <= ATOL:
            return []
        return [f"{path}: {got!r}, golden {want!r} (diff {abs(got - want):.3g})"]
    if type(got) is not type(want) or got != want:
        return [f"{path}: {got!r}, golden {want!r}"]
    return []


def environment() -> dict:
    """What the figures may depend on besides the code: versions, the CPU and its vector units, threads."""
    cpu, flags = platform.processor(), set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "numpy": np.__version__, "av": av.__version__, "cpu": cpu,
            "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}), "threads": THREADS}


_META_WRITTEN = []


def _record_meta() -> None:
    if not _META_WRITTEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        (GOLDEN / "meta.json").write_text(json.dumps(environment(), indent=1, sort_keys=True) + "\n")
        _META_WRITTEN.append(True)


def _fail(name: str, problems: list[str]) -> None:
    """Fail naming the first differences, and the environment when it is not the recorded one."""
    lines = [f"{name}: {len(problems)} difference(s) from tests/golden (first {min(len(problems), 25)}):",
             *problems[:25]]
    try:
        then = json.loads((GOLDEN / "meta.json").read_text())
    except (OSError, ValueError):
        then = None
    now = environment()
    if then != now:
        lines.append(f"note: recorded with {then}, running with {now}: another CPU or library can change the last "
                     "bits; to compare a change here, re-record at the commit before it (tools/record_golden.py)")
    pytest.fail("\n".join(lines), pytrace=False)


def check_json(name: str, value) -> None:
    path = GOLDEN / f"{name}.json"
    value = plain(value)
    if RECORD:
        _record_meta()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
        return
    problems = differences(value, json.loads(path.read_text()))
    if problems:
        _fail(name, problems)


def check_tensors(name: str, tensors: dict) -> None:
    """Tensors: dtype and shape equal; integers and booleans equal; floats within ATOL (NaN where golden NaN)."""
    path = GOLDEN / f"{name}.pt"
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if RECORD:
        _record_meta()
        torch.save(tensors, path)
        return
    want = torch.load(path, map_location="cpu", weights_only=True)
    problems = [f"{k}: only {'here' if k in tensors else 'in the golden file'}" for k in sorted(set(tensors) ^ set(want))]
    for k in sorted(set(tensors) & set(want)):
        g, w = tensors[k], want[k]
        if g.dtype != w.dtype or g.shape != w.shape:
            problems.append(f"{k}: {g.dtype} {tuple(g.shape)}, golden {w.dtype} {tuple(w.shape)}")
        elif not g.is_floating_point():
            if not torch.equal(g, w):
                problems.append(f"{k}: {(g != w).sum().item()} of {g.numel()} values differ")
        elif not torch.equal(g.isnan(), w.isnan()):
            problems.append(f"{k}: NaN at other places")
        else:
            diff = (g - w).abs().nan_to_num(0.0)
            if diff.numel() and diff.max() > ATOL:
                where = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), g.shape))
                problems.append(f"{k}: max |diff| {diff.max().item():.3g} at {where}")
    if problems:
        _fail(name, problems)


def check_text(name: str, text: str) -> None:
    """Text compared exactly, line endings normalised."""
    path = GOLDEN / name
    text = text.replace("\r\n", "\n")
    if RECORD:
        _record_meta()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        return
    want = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    if text != want:
        diff = list(difflib.unified_diff(want.splitlines(), text.splitlines(), "golden", "now", lineterm="", n=1))
        _fail(name, diff[:60])


# What the last bits of fp32 kernels depend on; the files compare only on a machine and torch like the recording's.
SAME_BITS_KEYS = ("torch", "cpu", "isa")


@pytest.fixture(autouse=True)
def recorded_environment():
    """Skip, saying why, where the environment differs from the recording's: another CPU or torch changes the last
    bits of fp32 kernels, and a comparison there says nothing about the code (re-record at the base commit there)."""
    if RECORD:
        return
    then = json.loads((GOLDEN / "meta.json").read_text())
    now = environment()
    changed = {k: (then.get(k), now.get(k)) for k in SAME_BITS_KEYS if then.get(k) != now.get(k)}
    if changed:
        pytest.skip(f"golden outputs recorded with other {', '.join(changed)} ({changed}): re-record at the commit "
                    "before a change on this machine (python tools/record_golden.py) to compare it")


@pytest.fixture(autouse=True)
def fixed_threads_and_seed():
    """THREADS torch threads and a seeded global generator for the test; both restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- 1. training steps

def module_of(name: str) -> str:
    """The module a parameter belongs to for the per-module figures (``backbone.stem``, ``decoder``, ``head``...)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "backbone" else parts[0]


def train_steps(args: dict, batches, tube: bool) -> dict:
    net = keyed_model(args)
    T = TUBE_T if tube else CLIP_T
    model_setup.init_positions(net, T, IMG)      # the from-scratch recipe's inits (main.build_training_state)
    model_setup.init_motion_stem(net)
    out = {"weights_sum": weights_sum(net)}
    net.use_channels_last()                      # as main.py trains on a CPU
    net.train()
    criterion = criterion_for(args, tube)
    optimizer = torch.optim.AdamW(engine.parameter_groups(net, types.SimpleNamespace(lr=LR, lr_backbone=LR_BACKBONE)),
                                  weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    squares, matches = {}, []
    handles = [p.register_post_accumulate_grad_hook(
        lambda p, name=name: squares.__setitem__(name, float(p.grad.double().pow(2).sum())))   # before clipping
        for name, p in net.named_parameters() if p.requires_grad]
    handles.append(criterion.matcher.register_forward_hook(
        lambda _m, _args, result: matches.append([[rows.tolist(), cols.tolist()] for rows, cols in result])))
    steps = []
    try:
        for clips, targets in batches:
            squares.clear()
            matches.clear()
            outputs = net(clips)
            losses, loss = engine.checked_losses(criterion, outputs, engine.device_targets(targets, CPU), CPU, 1, 0)
            applied = engine.optimizer_step(loss, net.parameters(), optimizer, scaler, GRAD_CLIP)
            by_module = {}
            for name, value in squares.items():
                by_module[module_of(name)] = by_module.get(module_of(name), 0.0) + value
            steps.append({"terms": {k: float(v.detach()) for k, v in losses.items()}, "loss": float(loss.detach()),
                          "applied": applied,
                          "grad_norm": math.sqrt(sum(squares.values())),
                          "grad_norm_by_module": {k: math.sqrt(v) for k, v in by_module.items()},
                          "grads": sorted(squares), "matches": list(matches)})
    finally:
        for handle in handles:
            handle.remove()
    out["steps"] = [{k: v for k, v in s.items() if k != "grads"} for s in steps]
    out["parameters_with_gradients"] = steps[0]["grads"]
    norms: dict[str, float] = {}
    for name, p in net.named_parameters():
        norms[module_of(name)] = norms.get(module_of(name), 0.0) + float(p.detach().double().pow(2).sum())
    buffers: dict[str, float] = {}
    for name, b in net.named_buffers():
        if b.is_floating_point():
            buffers[module_of(name)] = buffers.get(module_of(name), 0.0) + float(b.double().sum())
    out["parameter_norm_by_module"] = {k: math.sqrt(v) for k, v in norms.items()}
    out["buffer_sum_by_module"] = buffers
    return out


def test_training_steps_clip_mode():
    w = world()
    a, b, c, d = w["a"], w["b"], w["c"], w["d"]
    batches = [batch([a, b, c], [0, 4, None], CLIP_T), batch([b, d, a], [16, 8, 20], CLIP_T),
               batch([c, a, b], [None, 10, 22], CLIP_T)]
    result = train_steps(CLIP_ARGS, batches, tube=False)
    assert all(s["applied"] for s in result["steps"])
    check_json("train_clip", result)


def test_training_steps_tube_mode():
    w = world()
    a, b, c, d = w["a"], w["b"], w["c"], w["d"]
    batches = [batch([a, b], [0, 12], TUBE_T), batch([b, d], [0, 4], TUBE_T), batch([a, c], [22, None], TUBE_T)]
    result = train_steps(TUBE_ARGS, batches, tube=True)
    assert all(s["applied"] for s in result["steps"])
    terms = set(result["steps"][0]["terms"])
    assert {"loss_locate", "loss_acting", "loss_presence", "loss_actor_class", "loss_video"} <= terms
    check_json("train_tube", result)


# --------------------------------------------------------------------------- 2. evaluation outputs

def eval_inputs(T: int):
    w = world()
    records = [w["a"], w["b"], w["c"], w["d"]]
    clips, targets = batch(records, [12, 8, None, 0], T)
    return records, clips, targets


class _Loader(list):
    """What engine.evaluate reads from a DataLoader: its batches and ``dataset.records``."""

    def __init__(self, batches, records):
        super().__init__(batches)
        self.dataset = types.SimpleNamespace(records=records)


def raw_outputs(out: dict) -> dict:
    tensors = {f"raw/{k}": out[k] for k in ("pred_logits", "pred_boxes")}
    for i, aux in enumerate(out.get("aux_outputs", [])):
        tensors.update({f"raw/aux{i}/{k}": aux[k] for k in ("pred_logits", "pred_boxes")})
    return tensors


def prediction_tensors(prefix: str, preds: list[dict]) -> dict:
    return {f"{prefix}{i}/{k}": v for i, pred in enumerate(preds) for k, v in pred.items()}


def tube_fields(t: tubes.PredTube) -> dict:
    return {"tube_id": t.tube_id, "class_id": t.class_id, "class_name": t.class_name, "score": t.score,
            "frames": t.frames, "boxes": t.boxes, "frame_scores": t.frame_scores, "step_frames": t.step_frames,
            "step_scores": t.step_scores, "step_probs": t.step_probs, "frame_probs": t.frame_probs,
            "class_names": list(t.class_names)}


def run_evaluate(net, args, records, clips, targets, tube: bool, threshold: float):
    loader = _Loader([(clips, targets)], records)
    result, preds, _, videos = engine.evaluate(net, criterion_for(args, tube), loader, CPU, None, NAMES, threshold)
    result["score"] = metrics.best_score(result)
    assert videos == [r.video for r in records]
    return result, preds


def evaluated_outputs(T: int, args: dict):
    """The key-seeded model of ``args`` in eval mode on :func:`eval_inputs`: records, clips, targets, the network, its
    raw outputs (aux included) and their predictions."""
    records, clips, targets = eval_inputs(T)
    net = keyed_model(args).eval()
    with torch.no_grad():
        out = net(clips, return_aux=True)
    return records, clips, targets, net, out, postprocess.outputs_to_predictions(out)


def test_evaluation_outputs_clip_mode():
    records, clips, targets, net, out, preds = evaluated_outputs(CLIP_T, CLIP_ARGS)
    dets = [[vars(d) for d in detections.detections_from_prediction(p, NAMES, CLIP_THRESHOLD, 0.5, 2.5)] for p in preds]
    assert any(dets) and not all(len(d) == CLIP_ARGS["num_queries"] for d in dets)   # the threshold bites
    result, evaluated = run_evaluate(net, CLIP_ARGS, records, clips, targets, False, CLIP_THRESHOLD)
    check_tensors("eval_clip", {**raw_outputs(out), **prediction_tensors("pred", preds),
                                **prediction_tensors("evaluate/pred", evaluated)})
    check_json("eval_clip", {"weights_sum": weights_sum(net), "detections": dets,
                             "video_prediction": [list(postprocess.video_prediction(p, CLIP_THRESHOLD)) for p in preds],
                             "evaluate": result})


def test_evaluation_outputs_tube_mode():
    records, clips, targets, net, out, preds = evaluated_outputs(TUBE_T, TUBE_ARGS)
    merged = [tubes.merge_duplicate_queries(p, TUBE_THRESHOLD) for p in preds]
    views = [tubes.class_detections(p, TUBE_THRESHOLD) for p in preds]
    spans = [(int(t["frame_indices"][0]), int(t["frame_indices"][-1]) + 1) for t in targets]
    clip_tubes = [tubes.clip_tubes(m, t["frame_indices"].numpy(), span, TUBE_THRESHOLD, NAMES)
                  for m, t, span in zip(merged, targets, spans)]
    assert any(clip_tubes) and sum(len(m["labels"]) for m in merged) < sum(len(p["labels"]) for p in preds)
    result, evaluated = run_evaluate(net, TUBE_ARGS, records, clips, targets, True, TUBE_THRESHOLD)
    tensors = {**raw_outputs(out), **prediction_tensors("pred", preds), **prediction_tensors("merged", merged),
               **prediction_tensors("evaluate/pred", evaluated)}
    for i, clip_views in enumerate(views):
        tensors.update(prediction_tensors(f"class{i}_", clip_views))
    check_tensors("eval_tube", tensors)
    check_json("eval_tube", {"weights_sum": weights_sum(net), "evaluate": result,
                             "clip_tubes": [[tube_fields(t) for t in c] for c in clip_tubes]})


# --------------------------------------------------------------------------- 3. test.py's CSVs

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """conftest's confident clip and acting tube checkpoints, their weights from :func:`keyed_state`."""
    folder = tmp_path_factory.mktemp("golden_ckpt")
    with torch.random.fork_rng():
        return {"clip": tiny_checkpoint(folder / "clip.pth", confident=True, net=keyed_model({"num_classes": 2})),
                "tube": tube_checkpoint(folder / "tube.pth", net=keyed_model({"num_classes": 2, **TUBE_CKPT_ARGS}))}


@pytest.fixture(scope="module")
def labelled_videos(tmp_path_factory):
    """Two rawvideo AVIs (exact pixels whatever the codec library) of the world's videos a (12 fps) and b (10 fps) and
    per-frame labels of their fight (0) and collapse (1) actors: the --labels dataset."""
    folder = tmp_path_factory.mktemp("golden_videos")
    w = world()
    rows = ["video_file,label_file"]
    for key, fps in (("a", 12), ("b", 10)):
        record = w[key]
        write_video(folder / f"{key}.avi", render(record, range(record.num_frames)), fps=fps, codec="rawvideo")
        lines = []
        for t in record.tracks:
            for f, box, ids in zip(t.frames.tolist(), t.boxes.tolist(), t.labels):
                for c in ids:
                    if c < 2:
                        x1, y1, x2, y2 = (round(v * s, 2) for v, s in zip(box, (W, H, W, H)))
                        lines.append(f"{f} {t.track_id} {c} {x1} {y1} {x2} {y2}")
        (folder / f"{key}.txt").write_text("\n".join(lines) + "\n")
        rows.append(f"{key}.avi,{key}.txt")
    (folder / "action_challenge.csv").write_text("\n".join(rows) + "\n")
    (folder / "classes.txt").write_text("fight\ncollapse\n")
    return folder


def run_test_py(tmp_path, videos, ckpt, name: str, *extra) -> None:
    out = tmp_path / name / "predictions.csv"
    rc = test_cli.cli(["--input_dir", str(videos), "--output_file", str(out), "--model_path", str(ckpt),
                       "--no_annotate", "--workers", "0", "--device", "cpu", "--precision", "fp32",
                       "--labels", str(videos), *extra])
    assert rc == 0
    for file in ("predictions.csv", "predictions_frames.csv", "predictions_metrics.txt"):
        check_text(f"test_py/{name}/{file}", (out.parent / file).read_text(encoding="utf-8"))
    check_json(f"test_py/{name}/predictions_metrics", json.loads((out.parent / "predictions_metrics.json").read_text()))


def test_test_py_csvs_clip_checkpoint(tmp_path, checkpoints, labelled_videos):
    run_test_py(tmp_path, labelled_videos, checkpoints["clip"], "clip")


def test_test_py_csvs_tube_checkpoint(tmp_path, checkpoints, labelled_videos):
    run_test_py(tmp_path, labelled_videos, checkpoints["tube"], "tube")


def test_test_py_csvs_tube_checkpoint_in_windows(tmp_path, checkpoints, labelled_videos):
    run_test_py(tmp_path, labelled_videos, checkpoints["tube"], "tube_windows", "--window_sec", "1", "--stride_sec", "0.5")


# --------------------------------------------------------------------------- 4. frame-mAP and video-mAP

def _boxes(x1, y1, size, frames, dx=0.0, dy=0.0) -> np.ndarray:
    """Normalised xyxy boxes of a square of ``size`` moving ``dx, dy`` a frame."""
    f = np.asarray(list(frames), float)
    return np.stack([x1 + dx * f, y1 + dy * f, x1 + dx * f + size, y1 + dy * f + size], 1)


def hand_made_scorer() -> tube_metrics.TubeScorer:
    """Ground truth of 3 classes in 3 videos (one tube with a gap, two actors of one class in a frame) and predictions of
    every kind the scorer takes: clip-mode queries, tube-mode clips, frame detections and tubes, hits and misses,
    ties in score."""
    s = tube_metrics.TubeScorer(3)
    s.add_truth("v1", 0, [*range(0, 10), *range(14, 20)], _boxes(0.1, 0.2, 0.3, [*range(0, 10), *range(14, 20)], 0.01),
                100, 50)
    s.add_truth("v1", 1, range(5, 15), _boxes(0.5, 0.4, 0.25, range(5, 15)), 100, 50)
    s.add_truth("v2", 1, range(0, 8), _boxes(0.0, 0.0, 0.4, range(0, 8)), 80, 60)
    s.add_truth("v2", 1, range(0, 8), _boxes(0.45, 0.5, 0.4, range(0, 8)), 80, 60)
    target = {"frame_indices": torch.tensor([0, 3, 6, 9]), "track_labels": torch.tensor([[2, 2, -1, 2], [0, -1, -1, 0]]),
              "track_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.3]] * 4, [[0.2, 0.3, 0.1, 0.1]] * 4])}
    s.add_clip_truth("v3", target, 120, 90)
    # clip-mode queries over frames 0-9 of v1 (one right, one wrong class, one elsewhere)
    clip_pred = {"scores": torch.tensor([0.9, 0.6, 0.6]), "labels": torch.tensor([0, 1, 2]),
                 "boxes": torch.tensor([[0.12, 0.2, 0.42, 0.5], [0.1, 0.2, 0.4, 0.5], [0.6, 0.0, 0.9, 0.3]])}
    s.add_clip_predictions("v1", range(0, 10), clip_pred, 100, 50)
    # a tube-mode clip of v1 frames 10-17 (K = 4 steps): an actor of class 1 acting at 3 steps, one idle
    probs = torch.tensor([[[0.1, 0.7, 0.1], [0.1, 0.8, 0.05], [0.2, 0.6, 0.1], [0.05, 0.1, 0.05]],
                          [[0.3, 0.1, 0.1], [0.2, 0.2, 0.1], [0.1, 0.1, 0.1], [0.1, 0.1, 0.2]]])
    step_boxes = torch.tensor(np.stack([_boxes(0.5, 0.4, 0.25, range(4)), _boxes(0.1, 0.3, 0.3, range(4), 0.02)]),
                              dtype=torch.float32)
    tube_pred = postprocess.tube_prediction(probs, torch.tensor([1, 0]), step_boxes)
    s.add_clip_predictions("v1", [10, 12, 14, 16], tube_pred, 100, 50, threshold=0.5)
    # v2: two detections a frame for the two actors, scores tied between frames; one tube covering both actors' span
    s.add_frame_detections("v2", 1, range(0, 8), [0.8] * 8, _boxes(0.02, 0.0, 0.4, range(0, 8)), 80, 60)
    s.add_frame_detections("v2", 1, range(0, 8), [0.7, 0.8, 0.7, 0.8, 0.7, 0.8, 0.7, 0.8],
                           _boxes(0.3, 0.5, 0.4, range(0, 8)), 80, 60)
    s.add_tube("v2", 1, 0.75, range(1, 8), _boxes(0.02, 0.02, 0.4, range(1, 8)), 80, 60)
    s.add_tube("v2", 1, 0.7, [0, 2, 4, 7], _boxes(0.45, 0.5, 0.4, [0, 2, 4, 7]), 80, 60)   # gaps: filled
    # v3: one query per class at its own frames, one constant-box prediction for frames and tube
    s.add_prediction("v3", [0, 3, 9], 2, 0.65, [0.4, 0.35, 0.6, 0.65], 120, 90)
    s.add_prediction("v3", range(0, 10), 0, 0.3, [0.15, 0.25, 0.25, 0.35], 120, 90, as_tube=False)
    s.add_prediction("v3", range(0, 4), 0, 0.4, [0.15, 0.25, 0.25, 0.35], 120, 90, as_frames=False)
    return s


def score_tubes_of_results() -> dict:
    """``scoring.score_tubes`` (test.py --labels) on hand-made results: video a in tube mode (two windows of hand-made
    tube predictions, joined by ``detections.finish_video``), video b in clip mode (two windows, joined detections)."""
    w = world()
    a, b = w["a"], w["b"]
    steps = [np.linspace(0, 23, TUBE_T).astype(np.int64), np.linspace(24, 47, TUBE_T).astype(np.int64)]
    spans = [(0, 24), (24, 48)]
    info_a = video.VideoInfo(W, H, 48, 12.0, 4.0)
    queries = []
    for k, idx in enumerate(steps):
        boxes, probs = [], []
        actors = ((a.tracks[0], 0, 0.8), (a.tracks[1], 1, 0.55 + 0.1 * k), (a.tracks[0], 2, 0.35))
        for q, (track, c, p) in enumerate(actors):
            present, xyxy, _ = track.at(idx)
            last = xyxy[present][-1] if present.any() else np.array([0.4, 0.4, 0.6, 0.6], np.float32)
            xyxy = np.where(present[:, None], xyxy, last) + 0.01 * q
            boxes.append(xyxy)
            step = np.full((TUBE_T, 3), (1 - p) / 4)
            step[:, c] = np.where(present, p, 0.1)
            probs.append(step)
        queries.append(postprocess.tube_prediction(torch.tensor(np.stack(probs), dtype=torch.float32),
                                               torch.tensor([0, 1, 2]), torch.tensor(np.stack(boxes), dtype=torch.float32)))
    settings = inference.Settings(0.5, 2.0, 2.0)
    res_a = detections.VideoResult(0, "a.avi", a.path, info_a, queries=queries, frame_indices=steps, frame_spans=spans,
                                   spans=[(0.0, 2.0), (2.0, 4.0)], tube_mode=True,
                                   clip_tubes=[tubes.clip_tubes(tubes.merge_duplicate_queries(p, 0.5), i, s, 0.5, NAMES)
                                               for p, i, s in zip(queries, steps, spans)])
    detections.finish_video(res_a, settings)
    info_b = video.VideoInfo(W, H, 48, 12.0, 4.0)
    clip_queries = [{"scores": torch.tensor([0.9, 0.55, 0.3]), "labels": torch.tensor([0, 1, 2]),
                     "boxes": torch.tensor([[0.15, 0.12, 0.4, 0.55], [0.55, 0.35, 0.8, 0.8], [0.0, 0.0, 0.2, 0.2]])},
                    {"scores": torch.tensor([0.7, 0.8, 0.6]), "labels": torch.tensor([2, 1, 2]),
                     "boxes": torch.tensor([[0.4, 0.2, 0.7, 0.65], [0.5, 0.35, 0.75, 0.8], [0.5, 0.1, 0.7, 0.5]])}]
    res_b = detections.VideoResult(1, "b.avi", b.path, info_b, queries=clip_queries, spans=[(0.0, 2.0), (2.0, 4.0)])
    for pred, (start, end) in zip(clip_queries, res_b.spans):
        res_b.detections += detections.detections_from_prediction(pred, NAMES, 0.5, start, end)
    detections.finish_video(res_b, settings)
    by_path = {os.path.realpath(r.path): r for r in (a, b)}
    return {"tubes_a": [tube_fields(t) for t in res_a.tubes], "detections_b": [vars(d) for d in res_b.detections],
            "score_tubes": scoring.score_tubes([res_a, res_b], by_path, [0, 1, 2], NAMES, 0.5)}


def test_frame_and_video_map_of_a_fixed_prediction_set():
    s = hand_made_scorer()
    figures = {"result": s.result(NAMES),
               "frame_map_trapezoid": tube_metrics.frame_map(s.detections, s.ground_truth, 3, 0.5, "trapezoid"),
               "frame_map_75": tube_metrics.frame_map(s.detections, s.ground_truth, 3, 0.75),
               "video_map_no_nms": tube_metrics.video_map(s.pred_tubes, s.gt_tubes, 3, 0.2, None),
               "video_map_trapezoid": tube_metrics.video_map(s.pred_tubes, s.gt_tubes, 3, 0.5, 0.3, "trapezoid"),
               **score_tubes_of_results()}
    assert 0 < figures["result"]["frame_map50"] < 1 and 0 < figures["score_tubes"]["video_map20"] <= 1
    check_json("tube_metrics", figures)


# --------------------------------------------------------------------------- 6. export parity

def test_export_parity_with_the_golden_pytorch_outputs(tmp_path):
    """export.py's graph of the evaluation's clip-mode model (BatchNorm folded, as exported), run by onnxruntime on the
    evaluation's clips, gives the golden PyTorch outputs within EXPORT_ATOL."""
    onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install -r requirements-deploy.txt)")
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -r requirements-deploy.txt)")
    import backend
    import export
    _, clips, _ = eval_inputs(CLIP_T)
    ck = tmp_path / "clip.pth"
    prep = {**TINY_PREP, "num_frames": CLIP_T, "img_size": IMG}
    checkpoint.save_checkpoint(checkpoint.make_checkpoint(keyed_model(CLIP_ARGS), checkpoint.model_args_from(**CLIP_ARGS),
                                                          NAMES, prep), ck)
    path = tmp_path / "star.onnx"
    args = export.get_args_parser().parse_args(["--model_path", str(ck), "--output", str(path)])
    started = time.perf_counter()
    net, desc = export.load_network(args)
    proto = export.export_graph(net, desc, args.opset, str(ck))
    export.set_metadata(proto, export.metadata(desc, "fp32", ck.name))
    onnx.save(proto, str(path))
    seconds = time.perf_counter() - started
    got = backend.OnnxModel(path)(clips)
    want = torch.load(GOLDEN / "eval_clip.pt", map_location="cpu", weights_only=True)
    diffs = {key: (got[key] - want[f"raw/{key}"]).abs().max().item() for key in ("pred_logits", "pred_boxes")}
    print(f"export in {seconds:.1f} s; onnxruntime against the golden PyTorch outputs: max |diff| {diffs}")
    for key, diff in diffs.items():
        assert diff <= EXPORT_ATOL, f"{key}: onnxruntime differs from the golden PyTorch output by {diff:.3g}"


# --------------------------------------------------------------------------- 5. stream events

EVENT_IGNORED = ("wall_time", "latency_sec")   # wall-clock facts of the run


def test_stream_tube_events(tmp_path, checkpoints):
    """stream.py --tube_events on a 6-s video (8 fps, 48 frames) played at 1.5x with a prediction every 8 frames (one
    every 0.67 s; about 0.35 s each on 2 cores at 1 thread): every clip predicted, none skipped, no frame dropped;
    the events file equal to the golden one but for wall_time and latency_sec."""
    w = world()
    src = write_video(tmp_path / "live.avi", render(w["b"], range(48)), fps=8, codec="rawvideo")
    events, stats_path = tmp_path / "tube_events.csv", tmp_path / "stats.json"
    rc = stream.cli(["--source", str(src), "--model_path", str(checkpoints["tube"]), "--tube_events", str(events),
                     "--stride", "8", "--speed", "1.5", "--device", "cpu", "--precision", "fp32",
                     "--stats_json", str(stats_path)])
    assert rc == 0
    stats = json.loads(stats_path.read_text())
    print(f"stream: {stats['predictions']} predictions, latency median {stats['latency_median_sec']:.3f} s, "
          f"p95 {stats['latency_p95_sec']:.3f} s (a clip every {8 / 8 / 1.5:.2f} s)")
    assert stats["skipped"] == 0 and stats["dropped_frames"] == 0, (
        f"the machine could not keep up with --speed 1.5 (a skipped clip or dropped frame changes the events; not a "
        f"change of behaviour): {stats}")
    assert stats["frames"] == 48 and stats["predictions"] == stats["clips"] == 6, stats
    with open(events, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    ignored = [header.index(k) for k in EVENT_IGNORED]
    assert all(r[i] for r in rows[1:] for i in ignored)   # present, just not compared
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if i in ignored else v for i, v in enumerate(r)] for r in rows[1:]])
    assert len(rows) > 1
    check_text("stream_tube_events.csv", text.getvalue())
