"""The training loops (DETR's engine.py): one epoch, the optimizer step with its non-finite guard, evaluation,
the bf16 gradient check, the rule that keeps the best model, and the decoder phase. main.py is the CLI around them.

Boxes: targets carry ``boxes`` (N, 4) cxcywh normalised; metrics take xyxy normalised.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel
from torchvision.ops import box_convert
from tqdm import tqdm

import metrics
import postprocess
import tube_metrics
from dataset import ActionDataset, collate
from config import TrainConfig
from losses import is_tube_output, num_target_boxes
from model import STAR, acting_box_average
from model_setup import init_motion_stem, init_positions, motion_stem_conv, prepare_for_inference
from runtime import UsageError, autocast
from tubes import class_detections, merge_duplicate_queries

log = logging.getLogger("star")

EPOCH_FIELDS = ["epoch", "lr", "seconds", "train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou",
                "train_loss_video", "train_class_error", "train_matched_iou", "skipped_steps", "val_loss", "video_acc", "det_acc_50",
                "mean_iou", "map50", "map50_95", *tube_metrics.TUBE_FIELDS, "score"]


# ----------------------------------------------------------------------------- training state

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as plain lists/tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_ema(model: STAR, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (BatchNorm statistics), or None
    when ``decay`` is 0. The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates
    (n = updates so far), so the average does not drag the random init along for hundreds of steps.

    An option (``--ema_decay``): averaged weights are the usual cure for validation that swings from epoch
    to epoch, but from scratch on the sample data the cosine schedule already ends on steady weights and
    the average scored the same as the raw weights (docs/EXPERIMENTS.md, "Weight average (--ema_decay)")."""
    if not 0.0 <= decay < 1.0:
        raise UsageError(f"--ema_decay must be in [0, 1), got {decay}")
    if decay == 0.0:
        return None

    def ema_update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():      # BatchNorm's num_batches_tracked: keep the current count
            return current
        n = float(num_averaged)
        return torch.lerp(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
    return AveragedModel(model, avg_fn=ema_update, use_buffers=True)


def parameter_groups(model, config: TrainConfig) -> list[dict]:
    """The R(2+1)D trunk at ``config.lr_backbone``, everything else (projection, decoder, queries, heads) at
    ``config.lr``; frozen parameters (``--freeze_trunk``) in neither."""
    trunk, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (trunk if name.startswith("backbone.stem.") else rest).append(param)
    return [{"params": trunk, "lr": config.lr_backbone}, {"params": rest, "lr": config.lr}]


def make_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW on :func:`parameter_groups`, fused: one kernel for every tensor (on a CPU the default per-tensor loop
    took 5 % of the tester's command, bench/README.md)."""
    return torch.optim.AdamW(parameter_groups(model, config), weight_decay=config.weight_decay, fused=True)


def make_scheduler(optimizer, config: TrainConfig):
    """Per epoch: linear warm-up over ``config.warmup_epochs``, then cosine from each group's lr to
    ``config.min_lr``."""
    warmup, total = config.warmup_epochs, max(config.epochs, 1)

    def factor(base_lr):
        floor = min(config.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0

        def at(epoch):
            if epoch < warmup:
                return (epoch + 1) / (warmup + 1)
            progress = (epoch - warmup) / max(total - warmup, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return at
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, criterion, loader, optimizer, scaler, device, precision: "TrainingPrecision",
                    config: TrainConfig, epoch, world, ema=None, run_times: "PhaseTimes | None" = None) -> dict:
    """One pass over the training batches under ``precision.dtype`` autocast (``config``: the epoch count, gradient
    clipping and the stem's motion constraint); ``ema``, if given, follows the weights after each step. Returns mean
    loss terms and the count of skipped steps; the time of each phase is logged and added to ``run_times``."""
    model.train()
    net = getattr(model, "module", model)
    loader.batch_sampler.set_epoch(epoch)   # EpochTaggedBatches: the epoch travels with the indices to the workers
    sums, counts, skipped = {}, {}, 0
    constrain_stem = config.motion_constraint and motion_stem_conv(net).weight.requires_grad   # frozen: left as it is
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=dist.is_initialized() and dist.get_rank() != 0, leave=False, dynamic_ncols=True)

    times = PhaseTimes(device)

    def step(clips, targets):
        with times("forward"), autocast(device, precision.dtype):
            outputs = model(clips)
        with times("matching and losses"):
            losses, loss = checked_losses(criterion, outputs, targets, device, world, epoch)
        return losses, loss, optimizer_step(loss, net.parameters(), optimizer, scaler, config.grad_clip, times)
    batches = iter(bar)
    while True:
        with times("data"):   # decoding, augmentation and targets, or the wait for a loader worker
            batch = next(batches, None)
            if batch is None:
                break
            clips, targets = batch[0].to(device, non_blocking=True), device_targets(batch[1], device)
        losses, loss, applied = step(clips, targets)
        # the same batch again, in fp32: no step is lost (under DDP every rank sees the same all-reduced gradient
        # norm and, since the first-batch check agreed, the same precision, so all ranks redo it together)
        if not applied and precision.may_fall_back:
            precision.fall_back(f"epoch {epoch + 1}: a bf16 step gave non-finite gradients")
            losses, loss, applied = step(clips, targets)
        skipped += not applied
        if constrain_stem:
            init_motion_stem(net)
        if ema is not None:
            ema.update_parameters(net)
        for k, v in [*losses.items(), ("loss", loss)]:
            value = float(v.detach())
            if not k[-1].isdigit() and math.isfinite(value):   # main terms only (aux terms are in the total);
                sums[k] = sums.get(k, 0.0) + value               # matched_iou is NaN for a batch without boxes
                counts[k] = counts.get(k, 0) + 1
        bar.set_postfix(loss=f"{sums['loss'] / counts['loss']:.3f}")
    if skipped and skipped == len(loader) and not scaler.is_enabled():
        # a GradScaler skips steps while it backs off (fp16); without one, no step applied means nothing learnt
        raise FloatingPointError(f"epoch {epoch + 1}: all {skipped} steps had a non-finite gradient norm and were skipped "
                                 f"({precision.dtype or 'fp32'}): the weights did not change")
    stats = {f"train_{k}": v / counts[k] for k, v in sums.items()}
    stats["skipped_steps"] = skipped
    log.info("epoch %d training time: %s", epoch + 1, times.summary())
    if run_times is not None:
        run_times.add(times)
    return stats


class PhaseTimes:
    """Wall seconds spent in named phases of a loop (``with times("forward"): ...``), for the log's time table.
    On CUDA each phase synchronises first and last, so that a phase is not billed for another's queued kernels."""

    def __init__(self, device=None):
        self.seconds: dict[str, float] = {}
        self._sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else None

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self._sync:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, other: "PhaseTimes") -> None:
        for name, seconds in other.seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def summary(self) -> str:
        """``"data 1.2 s, forward 3.4 s, ... (total 9.9 s)"`` in the order the phases first ran."""
        total = sum(self.seconds.values())
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()) + f" (total {total:.1f} s)"


def device_targets(targets: list[dict], device) -> list[dict]:
    """A batch's targets for the criterion: every tensor on ``device``, the video name left out."""
    return [{k: v.to(device) for k, v in t.items() if k != "video"} for t in targets]


def checked_losses(criterion, outputs, targets, device, world, epoch) -> tuple[dict, torch.Tensor]:
    """The criterion's terms and weighted total; a non-finite output or loss stops the run (FloatingPointError)."""
    if not all(torch.isfinite(outputs[k]).all() for k in ("pred_logits", "pred_boxes")):   # NaN crashes the matcher
        raise FloatingPointError(f"epoch {epoch + 1}: the loss became nan (non-finite model outputs)")
    num_boxes = global_num_boxes(targets, device, world, is_tube_output(outputs))
    losses = criterion(outputs, targets, num_boxes=num_boxes)
    loss = criterion.total(losses)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"epoch {epoch + 1}: the loss became {loss.item()} "
                                 f"({', '.join(f'{k}={v.item():.3g}' for k, v in losses.items())})")
    return losses, loss


def optimizer_step(loss, parameters, optimizer, scaler, grad_clip: float, times: "PhaseTimes | None" = None) -> bool:
    """Backward, unscale, clip, step; returns False when the step was skipped for a non-finite gradient norm."""
    times = times or PhaseTimes(None)
    parameters = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    with times("backward"):
        scaler.scale(loss).backward()
    with times("optimizer"):
        return _clipped_step(parameters, optimizer, scaler, grad_clip)


def _clipped_step(parameters, optimizer, scaler, grad_clip: float) -> bool:
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip or float("inf"))
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        scaler.step(optimizer)
    elif not scaler.is_enabled():   # a finite loss can still give inf/NaN gradients under low precision: never apply them
        optimizer.zero_grad(set_to_none=True)
    else:
        scaler.step(optimizer)      # GradScaler sees the inf and skips the step itself
    scaler.update()
    return finite


def global_num_boxes(targets, device, world, tube: bool = False) -> float:
    """Target boxes in the whole (distributed) batch, for DETR's box-loss normalisation (:func:`losses.num_target_boxes`)."""
    n = torch.tensor([float(num_target_boxes(targets, tube))], device=device)
    if world > 1:
        dist.all_reduce(n)
        n /= world
    return float(n.clamp(min=1))


# ----------------------------------------------------------------------------- evaluation

def inference_copy(model: STAR) -> STAR:
    """An eval-mode copy with BatchNorm folded and channels_last_3d, as test.py runs it: the same outputs
    (fp32 rounding), ~1.5x faster on the CPU at 8x112. ``model`` itself is left as it is."""
    return prepare_for_inference(copy.deepcopy(model))


@torch.no_grad()
def evaluate(model, criterion, loader, device, amp_dtype, class_names, threshold) -> tuple[dict, list, list, list]:
    """Validation loss and metrics of ``model`` as test.py runs it (:func:`inference_copy`); also returns
    predictions, targets (xyxy) and video names. Per-frame records (``record.tracks``) add frame-mAP@0.5 and
    video-mAP@0.2/0.5 of the validation windows (:class:`tube_metrics.TubeScorer`)."""
    model = inference_copy(model)
    preds, targets, loss_sum, batches = [], [], 0.0, 0
    for clips, batch_targets in loader:
        with autocast(device, amp_dtype):
            outputs = model(clips.to(device))
        loss_sum += float(criterion.total(criterion(outputs, device_targets(batch_targets, device))))
        batches += 1
        preds += postprocess.outputs_to_predictions(outputs)
        targets += batch_targets
    result = clip_metrics(preds, targets, loader.dataset.records, class_names, threshold)
    result["val_loss"] = loss_sum / max(batches, 1)
    targets_xyxy = [{"labels": t["labels"], "boxes": box_convert(t["boxes"], "cxcywh", "xyxy")} for t in targets]
    return result, preds, targets_xyxy, [t["video"] for t in targets]


def clip_metrics(preds: list[dict], targets: list[dict], records, class_names, threshold) -> dict:
    """Metrics of validation clips, one per record: the clip metrics on ``labels``/``boxes`` (cxcywh), and for
    per-frame records frame-mAP@0.5 and video-mAP@0.2/0.5 at the clips' sampled frames
    (:class:`tube_metrics.TubeScorer`), a tube-mode clip read as test.py reads it: every class of every query for
    frame-mAP, one query per actor for tubes."""
    if not preds:
        return {}
    xyxy = [{"labels": t["labels"].cpu(), "boxes": box_convert(t["boxes"].cpu(), "cxcywh", "xyxy")} for t in targets]
    result = metrics.evaluate(preds, xyxy, class_names, threshold)
    if any(r.per_frame for r in records):
        tubes = tube_metrics.TubeScorer(len(class_names))
        for pred, t, record in zip(preds, targets, records):
            frames = t["frame_indices"].cpu()
            if "step_scores" in pred:
                for view in class_detections(pred, threshold):
                    tubes.add_clip_predictions(record.video, frames, view, record.width, record.height, as_tube=False)
                tubes.add_clip_predictions(record.video, frames, merge_duplicate_queries(pred, threshold), record.width,
                                           record.height, threshold=threshold, as_frames=False)
            else:
                tubes.add_clip_predictions(record.video, frames, pred, record.width, record.height, threshold=threshold)
            tubes.add_clip_truth(record.video, {k: t[k].cpu() for k in ("frame_indices", "track_labels", "track_boxes")},
                                 record.width, record.height)
        result.update(tubes.result(class_names))
    return result


# ----------------------------------------------------------------------------- the best model

class KeepBest:
    """Which evaluation becomes best_model.pth: ``write(result, **extra)`` saves it.

    Epochs: the best validation score, a tie going to the later epoch (on a small validation split many epochs
    tie, and the later one trained longer at a lower rate); without validation videos, the last epoch.
    Decoder phase: only its second half competes, and its best replaces the epochs' best (the phase's decoder
    read unseen videos better in every run measured; docs/EXPERIMENTS.md, "Second-half rule")."""

    def __init__(self, write: Callable[..., None], has_validation: bool, best: float = -math.inf, path=""):
        self.write, self.has_validation, self.best, self.path = write, has_validation, best, path
        self.phase_best = -math.inf

    def after_epoch(self, result: dict, epoch: int, last: bool, exists: bool) -> bool:
        """``exists``: a best model is already on disk. Returns True when ``result`` is the new best."""
        new_best = bool(result) and (result["score"] >= self.best or not exists)
        if new_best or (not self.has_validation and last):
            self.write(result, epoch)
        if new_best:
            self.best = result["score"]
            log.info("new best model (score %.4f) -> %s", self.best, self.path)
        return new_best

    def after_decoder_step(self, step: int, steps: int, result: dict, epoch: int) -> bool:
        if step < steps / 2:
            return False
        if (result and result["score"] >= self.phase_best) or (not self.has_validation and step == steps):
            self.phase_best = result.get("score", self.phase_best)
            self.write(result, epoch, decoder_step=step)
            log.info("new best model (score %.4f, decoder step %d) -> %s", self.phase_best, step, self.path)
            return True
        return False


# ----------------------------------------------------------------------------- precision

def bf16_gradients_finite(model: torch.nn.Module, criterion, clips: torch.Tensor, targets: list[dict],
                          device: torch.device) -> list[str]:
    """One training step's forward and backward of a copy of ``model`` under bf16 autocast on a real batch
    ``clips`` (B, T, 3, S, S); returns the names of the parameters whose gradient is not finite (empty: bf16 is
    safe here). ``model``, its BatchNorm statistics and the RNG streams are left as they were.

    Why: on some CPUs (AMX Xeons always for some shapes, a Zen 4 EPYC now and then) oneDNN (torch 2.14.1) returns
    NaN weight gradients for Conv3d layers of the trunk under bf16 while the forward is fine (tools/check_bf16.py)."""
    probe = copy.deepcopy(getattr(model, "module", model)).train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with autocast(device, torch.bfloat16):
            outputs = probe(clips.to(device))
        losses = criterion(outputs, targets)
        criterion.total(losses).backward()
    return [name for name, p in probe.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]


class TrainingPrecision:
    """The autocast dtype of a training run (None: fp32). Left to ``auto``, a bf16 run falls back to fp32 for good
    at its first bf16 step with non-finite gradients (that step is redone in fp32), a guard against oneDNN bf16
    kernels that give wrong weight gradients (model.TemporalConv3d avoids the one known on AVX512-BF16 CPUs; AMX
    CPUs have another); an explicit ``--precision bf16`` is kept, its bad steps skipped and counted. The checkpoint
    stores :attr:`name`, so that a resumed run continues in the precision the run had reached."""

    NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def __init__(self, dtype: torch.dtype | None, precision: str = "auto"):
        self.dtype, self.auto = dtype, precision == "auto"

    @property
    def name(self) -> str:
        return self.NAMES[self.dtype]

    def resume_from(self, trained_in: str | None) -> None:
        """Continue as the checkpoint's run did: an ``auto`` run that had fallen back to fp32 stays there."""
        if trained_in == "fp32" and self.may_fall_back:
            log.info("precision: fp32, as the resumed run had fallen back to it")
            self.dtype = None

    @property
    def may_fall_back(self) -> bool:
        return self.auto and self.dtype == torch.bfloat16

    def fall_back(self, reason: str) -> None:
        log.warning("precision: fp32 from now on, not bf16: %s (a known oneDNN bf16 bug on some CPUs: "
                    "python tools/check_bf16.py)", reason)
        self.dtype = None


def check_bf16_first_batch(precision: TrainingPrecision, model, criterion, loader, device) -> None:
    """Before the first epoch: a bf16 run checks :func:`bf16_gradients_finite` on its first training batch (the
    run's real shapes); ``auto`` falls back to fp32 there, an explicit ``bf16`` is a UsageError saying how."""
    if precision.dtype != torch.bfloat16:
        return
    indices = next(iter(loader.batch_sampler))
    clips, targets = collate([loader.dataset[i] for i in indices])
    bad = bf16_gradients_finite(model, criterion, clips, device_targets(targets, device), device)
    if dist.is_initialized():   # every rank must train in one precision (the in-loop fallback then agrees too)
        flag = torch.tensor([float(bool(bad))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not bad:
            bad = ["(on another rank)"]
    if not bad:
        log.info("precision check: a bf16 training step on the first batch gives finite gradients")
        return
    reason = (f"a bf16 training step on the first batch gave non-finite gradients in {len(bad)} parameter(s), "
              f"first {bad[0]}")
    if not precision.auto:
        raise UsageError(f"--precision bf16: {reason}; train with --precision fp32 (or auto)")
    precision.fall_back(reason)


# ----------------------------------------------------------------------------- decoder phase

@torch.no_grad()
def cache_tokens(model: STAR, dataset: ActionDataset, epochs, device, amp_dtype, batch_size: int = 8):
    """Trunk tokens ``(N, tokens, D)`` of ``model`` run as :func:`evaluate` runs it (in the dtype it gives them to
    the decoder there, so that :func:`evaluate_tokens` computes what :func:`evaluate` does), for every clip of
    ``dataset`` as augmented at each of ``epochs`` (one pass each), and the targets (``labels``, ``boxes`` cxcywh)."""
    model = inference_copy(model)
    tokens, targets = [], []
    for epoch in epochs:
        for start in range(0, len(dataset), batch_size):
            clips, batch_targets = collate([dataset[(i, epoch)] for i in range(start, min(start + batch_size, len(dataset)))])
            with autocast(device, amp_dtype):
                tokens.append(model.encode(clips.to(device)))   # as produced: bf16 under bf16 autocast
            targets += device_targets(batch_targets, device)
    return torch.cat(tokens), targets


def reset_decoder_side(model: STAR, model_args: dict, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Re-initialise position table, queries, decoder and heads as a new model has them (and the sine
    position table with ``config.position_init``); returns their parameters."""
    fresh = STAR(**model_args)
    if config.position_init:
        init_positions(fresh, config.num_frames, config.img_size)
    parts = [part for part in ("pos_embedding", "queries", "time_queries", "decoder", "head", "locate", "acting",
                                 "actor_class", "actor_size")
             if getattr(model, part, None) is not None]   # time_queries ... actor_size: tube mode only
    for part in parts:
        getattr(model, part).load_state_dict(getattr(fresh, part).state_dict())
    return [p for part in parts for p in getattr(model, part).parameters()]


def decoder_phase(model: STAR, model_args, criterion, train_set, val_set, class_names, device, amp_dtype,
                  config: TrainConfig, on_validation):
    """Train a fresh decoder side on cached trunk tokens (``config.decoder_steps`` steps); calls
    ``on_validation(step, result)`` with the validation metrics every steps/12 and at the last step.

    Why: from scratch a short run's trunk tells the classes apart before its decoder learns to read it, and a
    decoder step on cached tokens costs a fraction of a whole step (docs/EXPERIMENTS.md, "Decoder phase")."""
    start = time.time()
    copies = range(config.epochs, config.epochs + config.decoder_copies)   # augmented as epochs after the last
    train_tokens, train_targets = cache_tokens(model, train_set, copies, device, amp_dtype)
    # validation batches as evaluate's loader makes them: under bf16 another batch size rounds differently
    val_tokens, val_targets = cache_tokens(model, val_set, [0], device, amp_dtype, config.batch_size)
    log.info("decoder phase: trunk tokens of %d training clips (%d copies) and %d validation videos cached in %.0f s",
             len(train_set), config.decoder_copies, len(val_set), time.time() - start)
    torch.manual_seed(config.seed)
    params = reset_decoder_side(model, model_args, config)
    if model.actor_class is not None:   # fitted to convergence on the frozen trunk, then kept
        accuracy = fit_actor_class(model, train_tokens, train_targets)
        log.info("decoder phase: the class under each true box fitted, %.1f %% right on the training clips", 100 * accuracy)
        model.actor_class.requires_grad_(False)
        params = [p for p in params if p.requires_grad]

    def validate(step, loss):
        result = evaluate_tokens(model, criterion, val_tokens, val_targets, val_set.records, class_names,
                                 config.score_threshold, amp_dtype, config.batch_size) if len(val_set) else {}
        log.info("decoder step %d/%d: train_loss=%.4g, %s", step, config.decoder_steps, loss,
                 ", ".join(f"{k}={result[k]:.4g}" for k in EPOCH_FIELDS if isinstance(result.get(k), float)))
        on_validation(step, result)
    fit_decoder(model, params, criterion, train_tokens, train_targets, steps=config.decoder_steps, lr=config.lr,
                weight_decay=config.weight_decay, batch_size=config.batch_size, grad_clip=config.grad_clip,
                seed=config.seed, device=device, on_eval=validate, epoch=config.epochs - 1, amp_dtype=amp_dtype)


@torch.no_grad()
def actor_box_features(model: STAR, tokens: torch.Tensor, targets: list[dict], batch_size: int = 32):
    """The trunk's tokens under every true box of cached clips, as :meth:`model.STAR.box_features` reads them:
    features ``(P, D)`` float32 and classes ``(P,)`` of every (track, step) where a track acts."""
    pairs = []
    for start in range(0, len(tokens), batch_size):
        memory, fine = model.split_tokens(tokens[start:start + batch_size].float())
        grid = model.trunk_grid(model.trunk_tokens(memory, fine))                   # (b, G, D)
        pairs += [acting_box_average(cells, t["track_labels"].to(cells.device), t["track_boxes"].to(cells.device))
                  for cells, t in zip(grid, targets[start:start + batch_size])]
    features, classes = (torch.cat(part) for part in zip(*pairs))
    return features, classes


def fit_actor_class(model: STAR, tokens: torch.Tensor, targets: list[dict], l2: float = 1e-3,
                    max_iter: int = 500) -> float:
    """Fit ``model.actor_class``'s action rows as a logistic regression (L-BFGS to convergence, standardised
    features, ``l2`` on the weights) on :func:`actor_box_features` of cached training clips; its no_object row
    becomes zero. Returns the fit's accuracy on those clips (NaN without an acting track).

    Why: trained by AdamW alongside the decoder, 600 steps from zero at the decoder's rate, it called 10 of 12 wave
    windows of its own training videos jump, where this fit on the same trunk got 6 of 10 and 10 of 12 on two unseen
    sets (docs/EXPERIMENTS.md, "eighth session")."""
    features, classes = actor_box_features(model, tokens, targets)
    num_classes = model.num_classes
    if not len(classes):
        return float("nan")
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std
    probe = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), classes) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        weight = probe.weight / std                                               # the standardisation folded in
        layer = model.actor_class
        layer.weight.zero_()
        layer.bias.zero_()
        layer.weight[:num_classes] = weight.to(layer.weight.dtype)
        layer.bias[:num_classes] = (probe.bias - weight @ mean).to(layer.bias.dtype)
        return float((probe(x).argmax(-1) == classes).float().mean())


def fit_decoder(model: STAR, params, criterion, tokens, targets, *, steps: int, lr: float, weight_decay: float,
                batch_size: int, grad_clip: float, seed: int, device, on_eval, epoch: int = 0,
                evaluations: int = 12, amp_dtype: torch.dtype | None = None) -> None:
    """``steps`` AdamW steps of ``params`` (the decoder side) on random batches of cached trunk ``tokens``
    ``(N, tokens, D)`` and their ``targets``: a 20-step linear warm-up, then cosine to 0. Calls
    ``on_eval(step, train_loss)`` every steps/``evaluations`` and at the last step (the model may be left in
    eval mode).
    A non-finite loss raises FloatingPointError naming ``epoch`` (0-based) as the training loop's does."""
    # fused: the optimizer was a third of a decoder step on the CPU (9 M parameters, the position table included)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    no_scaler = torch.amp.GradScaler(device.type, enabled=False)
    generator = torch.Generator().manual_seed(seed)
    warmup, eval_every, skipped = min(20, steps), max(steps // evaluations, 1), 0
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        model.train()
        picks = torch.randint(0, len(tokens), (batch_size,), generator=generator).tolist()
        with autocast(device, amp_dtype):   # the precision of the epochs' steps
            outputs = model.decode(model.backbone.dropout(tokens[picks].float()))    # the token dropout of training
        _, loss = checked_losses(criterion, outputs, [targets[i] for i in picks], device, 1, epoch)
        skipped += not optimizer_step(loss, params, optimizer, no_scaler, grad_clip)
        if step % eval_every == 0 or step == steps:
            on_eval(step, loss.item())
    if skipped:
        log.warning("decoder phase: %d of %d steps had a non-finite gradient norm and were skipped", skipped, steps)


@torch.no_grad()
def evaluate_tokens(model: STAR, criterion, tokens, targets, records, class_names, threshold, amp_dtype=None,
                    batch_size: int | None = None) -> dict:
    """:func:`evaluate` on cached validation tokens (the same numbers: the trunk's part is the same, and the
    decoder runs under the same autocast ``amp_dtype`` on batches of the same ``batch_size`` as there)."""
    model.eval()
    batch_size = batch_size or len(tokens)
    with autocast(tokens.device, amp_dtype):
        parts = [model.decode(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)]
    outputs = {k: torch.cat([part[k] for part in parts]) for k in ("pred_logits", "pred_boxes")}
    result = clip_metrics(postprocess.outputs_to_predictions(outputs), targets, records, class_names, threshold)
    result["val_loss"] = float(criterion.total(criterion(outputs, targets)))
    result["score"] = metrics.best_score(result)
    return result
