"""Train STAR on a CSV-listed dataset.

    python main.py --input_dir DATASET --output_dir OUT [--pretrained none]
    torchrun --nproc_per_node=2 main.py --input_dir DATASET --output_dir OUT

Writes to OUT: best_model.pth, checkpoint.pth (for --resume), split.json, training_results.csv,
test_predictions.csv, val_metrics.json, plots (*.png), train.log, dataset_problems.txt (when the dataset check
found problems). A folder holding another run's outputs is refused unless --resume continues that run or
--overwrite replaces it. The flags, the recipe (recipes.py) and the data resolve into one config (config.py)
before training; the loops (engine.py) take it.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import engine
import metrics
import plots
from checkpoint import CheckpointError, make_checkpoint, model_args_from, save_checkpoint
from config import TrainConfig, resolve_config, stored_setting
from dataset import ActionDataset, BalancedBatchSampler, EpochTaggedBatches, collate
from detections import VideoResult, detections_from_prediction
from files import atomic_write, write_text
from losses import PUBLISHED_WEIGHTS, build_criterion
from model import STAR, count_parameters
from model_setup import (PRETRAINED_CHOICES, build_model, freeze_trunk_stages, init_motion_stem, init_positions,
                         load_for_finetuning)
from predictions_io import csv_rows, write_predictions
from problems import DatasetError, format_problems
from recipes import DECODER_STEPS_PER_EPOCH, PAIR_PROB, WINDOWS_PER_VIDEO, WINDOW_STRIDE, add_recipe_defaults_to_help
from records import load_dataset, split_dataset
from run_folder import PROBLEMS_NAME, disk_full, prepare_output_dir, writing
from runtime import (UsageError, autocast_settings, init_distributed, number, one_line, resolve_device, setup_logging,
                     writable_dir)
from video import DEFAULT_FOLDER_FPS, IMAGENET_MEAN, IMAGENET_STD, VideoInfo

log = logging.getLogger("star")

PROBLEMS_SHOWN = 5   # problems of each kind in the log; all of them go to dataset_problems.txt


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("STAR training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", required=True, help="dataset folder with action_challenge.csv")
    p.add_argument("--output_dir", required=True, help="where checkpoints, logs, tables and plots go")
    p.add_argument("--recipe", choices=("auto", "published", "scratch"), default="auto",
                   help="defaults of the flags marked [default: ...] (recipes.py); auto: published with a pretrained "
                        "trunk or --init_from, scratch without")
    p.add_argument("--epochs", type=int, default=50, help="number of training epochs")
    p.add_argument("--batch_size", type=int, default=2, help="clips per batch (per process)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate of the decoder, queries and heads")
    p.add_argument("--lr_backbone", type=float, default=None, help="learning rate of the R(2+1)D trunk")
    p.add_argument("--warmup_epochs", type=int, default=None,
                   help="epochs of linear learning-rate warm-up before the cosine")
    p.add_argument("--video_loss_coef", type=float, default=None,
                   help="weight of the video-level class loss on the mean trunk token (0 = off)")
    p.add_argument("--ce_loss_coef", type=float, default=None,
                   help="weight of the class loss of the matched queries (and of the class cost in matching unless "
                        "--set_cost_class)")
    p.add_argument("--bbox_loss_coef", type=float, default=PUBLISHED_WEIGHTS["loss_bbox"],
                   help="weight of the L1 box loss of the matched queries (and of the L1 cost in matching)")
    p.add_argument("--giou_loss_coef", type=float, default=PUBLISHED_WEIGHTS["loss_giou"],
                   help="weight of the GIoU loss of the matched queries (and of the GIoU cost in matching)")
    p.add_argument("--set_cost_class", type=float, default=None,
                   help="class cost of the Hungarian matching (default: the class loss weight, --ce_loss_coef)")
    p.add_argument("--eos_coef", type=float, default=0.1,
                   help="weight of the no_object class in the class loss of the unmatched queries (published 0.1)")
    p.add_argument("--ema_decay", type=float, default=0.0,
                   help="validate and keep as best_model.pth an exponential moving average of the weights with this "
                        "decay per step (default 0 = off, the raw weights)")
    p.add_argument("--motion_init", action=argparse.BooleanOptionalAction, default=None,
                   help="start the stem's temporal kernels at zero sum over time, so the new trunk sees motion")
    p.add_argument("--motion_constraint", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the stem's temporal kernels at zero sum over time after every step")
    p.add_argument("--position_init", action=argparse.BooleanOptionalAction, default=None,
                   help="start the position table at a sine encoding of each token's place in the clip")
    p.add_argument("--still_prob", type=float, default=None,
                   help="probability that a training video with an action is shown as a still clip without one")
    p.add_argument("--freeze_trunk", type=int, default=None, choices=range(0, 6), metavar="{0..5}",
                   help="keep the first N trunk stages (1 = the stem, 2 = stem and layer1, ... 5 = all) at their "
                        "initial weights: no gradients there, so each step is cheaper")
    p.add_argument("--decoder_steps", type=int, default=None,
                   help="after the last epoch, train a fresh decoder side (position table, queries, decoder, heads) for "
                        "this many steps on trunk tokens cached from the training clips, validating every steps/12; the "
                        "best evaluation of its second half becomes best_model.pth (0 = off; the recipe's default is "
                        f"capped at {DECODER_STEPS_PER_EPOCH} per epoch, so short runs stay short)")
    p.add_argument("--decoder_copies", type=int, default=4,
                   help="augmented copies of each training clip whose trunk tokens the decoder phase trains on")
    p.add_argument("--min_lr", type=float, default=1e-6, help="final learning rate of the cosine schedule")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--num_frames", type=int, default=16, help="frames sampled per clip")
    p.add_argument("--img_size", type=int, default=224, help="frames are resized to img_size x img_size")
    p.add_argument("--num_queries", type=int, default=12, help="learned decoder queries (detections per clip)")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout of the trunk tokens, the decoder and the heads in training (0.1 = the published network's)")
    p.add_argument("--window_sec", type=number(float, 0, strict=True), default=None,
                   help="seconds a clip spans in videos with per-frame labels (training windows are drawn where actors "
                        "act, validation takes the middle one; stored in the checkpoint, test.py cuts its windows so); "
                        f"default: {WINDOW_STRIDE} frames per sampled frame (8 frames at 25 fps: 1.28 s)")
    p.add_argument("--time_tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="tube mode: layer1's tokens of every frame, for the decoder's memory and the box locator "
                        "(model.Backbone, model.Locator; default on)")
    p.add_argument("--mode", choices=("auto", "clip", "tube"), default="auto",
                   help="clip: one box per query per clip (the published network); tube: a class and a box per query "
                        "at every sampled frame (model.STAR's tube mode); auto: tube when the labels are per-frame")
    p.add_argument("--clips_per_video", type=number(int, 1), default=None,
                   help="training clips drawn from each video per epoch, each its own window and augmentation "
                        f"(default: {WINDOWS_PER_VIDEO} with per-frame labels, whose clips are windows of a longer video; else 1)")
    p.add_argument("--pair_prob", type=number(float, 0, maximum=1), default=None,
                   help="probability that a training window of a video with per-frame labels is shown beside another "
                        "video's window, each in a half of the frame with its actors (several-actor scenes are rare "
                        f"in most datasets; default: {PAIR_PROB} with per-frame labels, else 0)")
    p.add_argument("--negative_prob", type=float, default=0.2,
                   help="share of training windows placed away from every labelled actor (per-frame labels)")
    p.add_argument("--max_gap", type=number(int, 0), default=None,
                   help="largest gap in frames between two labelled frames of a track that is interpolated "
                        "(per-frame labels; default: one second of the video)")
    p.add_argument("--fps", type=number(float, 0, strict=True), default=DEFAULT_FOLDER_FPS,
                   help="frame rate of videos given as folders of numbered frames")
    p.add_argument("--val_split", type=float, default=0.2, help="fraction of videos held out for validation")
    p.add_argument("--eval_every", type=int, default=2, help="validate every N epochs (and after the last)")
    p.add_argument("--grad_clip", type=float, default=0.5, help="max gradient norm (0 = no clipping)")
    p.add_argument("--seed", type=int, default=42, help="seed for split, sampling, augmentation and init")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    p.add_argument("--pretrained", choices=PRETRAINED_CHOICES, default="kinetics400",
                   help="trunk initialisation: Kinetics-400 weights (torchvision; needs them cached or internet) or none")
    p.add_argument("--backbone_weights", default=None, help="local r2plus1d_18 weights file (overrides --pretrained)")
    p.add_argument("--init_from", default=None, help="STAR checkpoint to fine-tune from (the published one included)")
    p.add_argument("--class_names", nargs="+", default=None, help="names for the sorted raw class ids")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast: auto = fp16 on cuda, bf16 on a CPU with native bf16 when a bf16 step on the first "
                        "batch gives finite gradients (else fp32, said in the log), fp32 otherwise")
    p.add_argument("--no_amp", action="store_true", help="train in float32 (the same as --precision fp32)")
    p.add_argument("--no_aug", action="store_true", help="turn training augmentation off")
    p.add_argument("--no_aux_loss", action="store_true", help="no auxiliary losses on earlier decoder layers")
    p.add_argument("--score_threshold", type=float, default=0.5, help="score threshold for metrics and test_predictions.csv")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth")
    again.add_argument("--overwrite", action="store_true",
                       help="OUTPUT_DIR holds a previous run: remove that run's outputs (checkpoints, tables, plots, "
                            "log, split; no other file) and train from scratch")
    add_recipe_defaults_to_help(p)
    return p


# ----------------------------------------------------------------------------- set-up

def load_data(args, rank: int, output_dir: Path):
    """Validate the dataset, split it (split.json), return (train_records, val_records, class_map)."""
    try:
        records, class_map, problems = load_dataset(args.input_dir, class_names=args.class_names,
                                                    max_gap=args.max_gap, fps=args.fps)
    except DatasetError as err:
        if rank == 0:
            report_problems(err.problems, output_dir, log.error)
        raise DatasetError(str(err)) from None   # its problems are reported
    if rank == 0:
        report_problems(problems, output_dir, log.warning)
    train, val, note = split_dataset(records, args.val_split, args.seed, output_dir / "split.json")
    if note:
        log.info("%s", note)
    if not train:
        raise DatasetError(f"{args.input_dir}: no usable training video after the split")
    log.info("%d videos: %d train, %d validation; classes %s", len(records), len(train), len(val),
             ", ".join(class_map.names))
    return train, val, class_map


def report_problems(problems, output_dir: Path, say) -> None:
    """The dataset check's problems: the first few of each kind to the log (``say``), all of them to
    dataset_problems.txt (named in the log), so that 100,000 missing videos do not make a 100,000-line log. No
    problems: an older dataset_problems.txt is removed (it described other data)."""
    path = output_dir / PROBLEMS_NAME
    if not problems:
        path.unlink(missing_ok=True)
        return
    with writing(path):
        write_text(path, format_problems(problems) + "\n")
    say("dataset problems (all of them in %s):\n%s", path, format_problems(problems, per_kind=PROBLEMS_SHOWN))


def make_loaders(config: TrainConfig, train, val, rank: int, world: int):
    train_set = ActionDataset(train, config.num_frames, config.img_size, augment=not config.no_aug, seed=config.seed,
                              still_prob=config.still_prob, window_sec=config.window_sec,
                              negative_prob=config.negative_prob, clips_per_video=config.clips_per_video,
                              pair_prob=config.pair_prob)
    sampler = EpochTaggedBatches(BalancedBatchSampler(train_set.has_action, config.batch_size, config.seed, world, rank))
    # workers live for the whole run (starting them costs seconds every epoch); the batches carry the epoch
    kwargs = {"num_workers": config.workers, "collate_fn": collate, "persistent_workers": config.workers > 0}
    train_loader = DataLoader(train_set, batch_sampler=sampler, **kwargs)
    val_set = ActionDataset(val, config.num_frames, config.img_size, augment=False, window_sec=config.window_sec)
    val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False, **kwargs)
    return train_loader, val_loader


def build_training_state(config: TrainConfig, class_map, device, world):
    """Model (maybe DDP), criterion, optimizer, scheduler, scaler, amp dtype, model args."""
    model_args = model_args_from(len(class_map), num_queries=config.num_queries, dropout=config.dropout,
                                 aux_loss=not config.no_aux_loss, tube_steps=config.num_frames if config.tube else 0,
                                 time_tokens=config.time_tokens)
    model = build_model(pretrained=config.backbone_weights or config.pretrained, **model_args)
    if config.motion_init:
        init_motion_stem(model)
    if config.position_init:
        init_positions(model, config.num_frames, config.img_size)
    if config.init_from:
        load_for_finetuning(model, config.init_from)
    freeze_trunk_stages(model, config.freeze_trunk)
    model.to(device)
    if device.type == "cpu":   # oneDNN's 3-D convs are faster on NDHWC, in training too (bench/README.md)
        model.use_channels_last()
    log.info("STAR: %.2f M parameters", count_parameters(model) / 1e6)
    criterion = build_criterion(len(class_map), model_args["num_decoder_layers"], model_args["aux_loss"],
                                weights={"loss_ce": config.ce_loss_coef, "loss_bbox": config.bbox_loss_coef,
                                         "loss_giou": config.giou_loss_coef},
                                eos_coef=config.eos_coef, video_loss_coef=config.video_loss_coef,
                                cost_class=config.set_cost_class, tube=config.tube).to(device)
    optimizer = engine.make_optimizer(model, config)
    scheduler = engine.make_scheduler(optimizer, config)
    amp_dtype, amp_note = autocast_settings(device, config.precision)
    log.info("precision: %s", amp_note)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, criterion, optimizer, scheduler, scaler, amp_dtype, model_args


def resume(path: Path, model, optimizer, scheduler, scaler, ema, freeze_trunk: int, results_csv: Path):
    """Restore everything from checkpoint.pth and drop rows of training_results.csv past its epoch (a kill
    between the row and the checkpoint); returns (next epoch, best score so far, the precision it trained in last)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # the optimizer's parameter groups hold only the trained stages: another count cannot take its state
    frozen_then = stored_setting(ckpt, "freeze_trunk", 0)   # absent or None in older checkpoints: 0
    if frozen_then != freeze_trunk:
        raise UsageError(f"{path}: was trained with --freeze_trunk {frozen_then}; resume with --freeze_trunk {frozen_then}")
    getattr(model, "module", model).load_state_dict(ckpt["model"])
    if ema is not None:
        if "ema" not in ckpt:
            raise UsageError(f"{path}: was written without --ema_decay; resume with --ema_decay 0")
        ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    engine.set_rng_state(ckpt["rng"])
    truncate_results(results_csv, ckpt["epoch"] + 1)
    log.info("resumed from %s: epoch %d done, continuing at epoch %d", path, ckpt["epoch"] + 1, ckpt["epoch"] + 2)
    return ckpt["epoch"] + 1, ckpt.get("best_score", -math.inf), ckpt.get("precision")


# ----------------------------------------------------------------------------- outputs

def append_results(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=engine.EPOCH_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def truncate_results(path: Path, epochs_done: int) -> None:
    """Keep the rows of the first ``epochs_done`` epochs (one each) in training_results.csv."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [row for row in rows if int(row["epoch"]) <= epochs_done]
    if len(kept) < len(rows):
        log.info("training_results.csv: dropped %d row(s) past the checkpoint's epoch %d", len(rows) - len(kept),
                 epochs_done)
        with atomic_write(path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=engine.EPOCH_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)


def validation_rows(preds, records, class_names, threshold) -> list[dict]:
    """test_predictions.csv rows: each validation video as test.py writes it (the whole video, one span)."""
    rows = []
    for k, (pred, record) in enumerate(zip(preds, records)):
        duration = record.num_frames / record.fps if record.fps else 0.0
        info = VideoInfo(record.width, record.height, record.num_frames, record.fps, duration)
        result = VideoResult(k, record.video, record.path, info,
                             detections_from_prediction(pred, class_names, threshold, 0.0, duration),
                             best_score=float(pred["scores"].max()) if pred["scores"].numel() else 0.0)
        rows += csv_rows(result)
    return rows


def final_report(model_args, best_path: Path, val_loader, criterion, device, amp_dtype, class_names,
                 config: TrainConfig, output_dir):
    """Best model on the validation split: report, confusion matrix PNG, test_predictions.csv."""
    ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
    model = STAR(**model_args).to(device)
    model.load_state_dict(ckpt["model"])
    result, preds, _, _ = engine.evaluate(model, criterion, val_loader, device, amp_dtype, class_names,
                                          config.score_threshold)
    phase = f", decoder step {ckpt['decoder_step']}" if "decoder_step" in ckpt else ""
    log.info("best model (epoch %d%s) on the validation split:\n%s", ckpt["epoch"] + 1, phase,
             metrics.format_report(result, class_names))
    write_predictions(validation_rows(preds, val_loader.dataset.records, class_names, config.score_threshold),
                                output_dir / "test_predictions.csv")
    write_text(output_dir / "val_metrics.json", json.dumps(result, indent=2, default=float))
    plot(plots.plot_confusion_matrix, np.array(result["confusion_matrix"]), class_names,
         output_dir / "confusion_matrix.png")
    return result


def plot(function, *args) -> None:
    """Draw a figure; without matplotlib, one warning line (the run's other outputs are already written)."""
    try:
        function(*args)
    except ImportError as err:
        log.warning("plots skipped: %s (pip install matplotlib)", err)


# ----------------------------------------------------------------------------- the run

def train(args) -> dict:
    rank, world, local_rank = init_distributed(args.device)
    device = resolve_device(args.device, local_rank)
    output_dir = writable_dir(args.output_dir, "--output_dir")
    notes = prepare_output_dir(output_dir, args, rank)
    setup_logging(output_dir / "train.log", rank)
    for note in notes:
        log.info("%s", note)
    engine.seed_everything(args.seed + rank)
    train_records, val_records, class_map = load_data(args, rank, output_dir)
    config = resolve_config(args, train_records + val_records)   # every setting, resolved once: nothing changes it
    train_loader, val_loader = make_loaders(config, train_records, val_records, rank, world)
    model, criterion, optimizer, scheduler, scaler, amp_dtype, model_args = build_training_state(config, class_map, device,
                                                                                                 world)
    precision = engine.TrainingPrecision(amp_dtype, config.precision)
    engine.check_bf16_first_batch(precision, model, criterion, train_loader, device)
    on_off = {True: "on", False: "off"}
    log.info("device %s, autocast %s; recipe %s: lr %g (trunk %g), warm-up %d epochs, still clips %g, loss weights "
             "class %g / L1 %g / GIoU %g / video %g, dropout %g, motion init %s, motion constraint %s, position init %s, "
             "weight average %s, frozen trunk stages %d, decoder steps %d; %d steps per epoch", device, precision.dtype,
             config.recipe, config.lr, config.lr_backbone, config.warmup_epochs, config.still_prob, config.ce_loss_coef,
             config.bbox_loss_coef, config.giou_loss_coef, config.video_loss_coef, config.dropout,
             on_off[config.motion_init], on_off[config.motion_constraint], on_off[config.position_init],
             f"decay {config.ema_decay:g}" if config.ema_decay else "off", config.freeze_trunk, config.decoder_steps,
             len(train_loader))
    ckpt_path, best_path, results_csv = output_dir / "checkpoint.pth", output_dir / "best_model.pth", output_dir / "training_results.csv"
    net = getattr(model, "module", model)   # unwrapped from DistributedDataParallel
    ema = engine.make_ema(net, config.ema_decay)
    evaluated = ema.module if ema is not None else net   # what is validated and kept as best
    start_epoch, best = 0, -math.inf
    if config.resume and ckpt_path.exists():
        start_epoch, best, trained_in = resume(ckpt_path, model, optimizer, scheduler, scaler, ema, config.freeze_trunk,
                                               results_csv)
        precision.resume_from(trained_in)
    elif config.resume:
        log.info("--resume: no %s yet, starting from scratch", ckpt_path)
    preprocessing = {"num_frames": config.num_frames, "img_size": config.img_size,
                     "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "window_sec": config.window_sec}
    common = {"raw_class_ids": list(class_map.raw_ids), "args": config.to_dict()}   # "args": the key readers know

    def write_best(result, epoch, **extra):   # the weights validated (the average, if any), self-describing
        with writing(best_path):
            save_checkpoint(make_checkpoint(evaluated, model_args, class_map.names, preprocessing, epoch=epoch,
                                            metrics=result, **extra, **common), best_path)
    keeper = engine.KeepBest(write_best, has_validation=bool(val_records), best=best, path=best_path)

    run_times = engine.PhaseTimes(device)
    for epoch in range(start_epoch, config.epochs):
        start = time.time()
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"]}
        row.update(engine.train_one_epoch(model, criterion, train_loader, optimizer, scaler, device, precision, config,
                                          epoch, world, ema, run_times))
        scheduler.step()
        result = {}
        if rank == 0 and val_records and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            with run_times("validation"):
                result, *_ = engine.evaluate(evaluated, criterion, val_loader, device, precision.dtype, class_map.names,
                                             config.score_threshold)
            result["score"] = metrics.best_score(result)
            row.update({k: v for k, v in result.items() if k in engine.EPOCH_FIELDS})
        row["seconds"] = time.time() - start
        if rank == 0:
            with writing(results_csv):
                append_results(results_csv, row)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                         if isinstance(v, float) and k != "epoch"))
            with run_times("checkpoints"):
                keeper.after_epoch(result, epoch, last=epoch + 1 == config.epochs, exists=best_path.exists())
                # the training weights (and their average, if any) and the precision: what --resume continues from
                ckpt = make_checkpoint(model, model_args, class_map.names, preprocessing, epoch=epoch, metrics=result,
                                       optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                       scaler=scaler.state_dict(), rng=engine.rng_state(), best_score=keeper.best,
                                       precision=precision.name, **common)
                if ema is not None:
                    ckpt["ema"] = ema.state_dict()
                with writing(ckpt_path):
                    save_checkpoint(ckpt, ckpt_path)
        if world > 1:
            dist.barrier()
    if rank == 0 and config.decoder_steps > 0:
        with run_times("decoder phase"):
            engine.decoder_phase(evaluated, model_args, criterion, train_loader.dataset, val_loader.dataset,
                                 class_map.names, device, precision.dtype, config,
                                 lambda step, result: keeper.after_decoder_step(step, config.decoder_steps, result,
                                                                                config.epochs - 1))
    if world > 1:
        dist.barrier()
    final = {}
    if rank == 0:
        with run_times("final report and plots"):
            plot(plots.plot_training_history, results_csv, output_dir)
            if val_records and best_path.exists():
                final = final_report(model_args, best_path, val_loader, criterion, device, precision.dtype,
                                     class_map.names, config, output_dir)
        log.info("run time: %s", run_times.summary())
    if world > 1:
        dist.destroy_process_group()
    return final


def main(args) -> int:
    try:
        train(args)
    except (DatasetError, CheckpointError, UsageError, FloatingPointError) as err:
        log.error("error: %s", err)
        if isinstance(err, FloatingPointError):
            log.error("training stopped; the last good checkpoint is unchanged in %s (lower --lr or use --precision fp32)",
                      args.output_dir)
        return 2
    except OSError as err:   # a full disk while writing a file no `writing` names (split.json, the report...)
        if not disk_full(err):
            raise
        log.error("error: %s: the disk is full (%s); checkpoint.pth still holds the last epoch saved",
                  args.output_dir, one_line(err))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
