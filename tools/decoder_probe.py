#!/usr/bin/env python
"""Decoder probe: how fast can the decoder side learn boxes from a trained trunk's features?

    python tools/decoder_probe.py --checkpoint RUN/checkpoint.pth --input_dir DATASET [--unseen_dir DATASET2]
           [--steps 300 --lr 2e-4 --bbox_loss_coef 5 ...]

Runs the trunk of a STAR checkpoint once over the training clips (``--augmentations`` augmented
copies of each, the run's split.json) and the validation (and unseen) videos, keeps the trunk
tokens, then trains a fresh decoder side (token projection, position table, queries, decoder,
heads) on them alone, with the from-scratch recipe (recipes.py) or the flags given, and prints the
top-query metrics every ``--steps / 12`` steps. A step costs ~0.1 s on 2 CPU cores instead of the
whole network's seconds, so decoder-side recipes (learning rate, loss weights, queries, steps)
can be compared in a minute each. It measures the decoder alone: the trunk stays as trained.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

import engine
from checkpoint import load_checkpoint
from dataset import ActionDataset
from losses import PUBLISHED_WEIGHTS, build_criterion
from model import STAR
from model_setup import init_position_table
from recipes import SCRATCH_RECIPE
from records import load_dataset


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a STAR checkpoint of a run (its folder holds split.json)")
    p.add_argument("--input_dir", required=True, help="the run's dataset folder")
    p.add_argument("--unseen_dir", default=None, help="another dataset of the same classes, scored too")
    p.add_argument("--augmentations", type=int, default=10, help="augmented copies of each training clip")
    p.add_argument("--steps", type=int, default=300, help="decoder-side training steps")
    p.add_argument("--batch_size", type=int, default=4, help="clips per step")
    p.add_argument("--lr", type=float, default=SCRATCH_RECIPE["lr"], help="AdamW learning rate")
    p.add_argument("--ce_loss_coef", type=float, default=SCRATCH_RECIPE["ce_loss_coef"], help="class loss weight")
    p.add_argument("--bbox_loss_coef", type=float, default=PUBLISHED_WEIGHTS["loss_bbox"], help="L1 box loss weight")
    p.add_argument("--giou_loss_coef", type=float, default=PUBLISHED_WEIGHTS["loss_giou"], help="GIoU loss weight")
    p.add_argument("--eos_coef", type=float, default=0.1, help="no-object class weight")
    p.add_argument("--num_queries", type=int, default=12, help="decoder queries")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout of tokens, decoder and heads")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoder's init and the batches")
    return p


def cache_tokens(model: STAR, records, num_frames: int, img_size: int, copies: int, augment: bool):
    """Backbone tokens of the eval-mode ``model`` ``(N, tokens, D)`` and targets (cxcywh): ``copies`` passes."""
    clips = ActionDataset(records, num_frames, img_size, augment=augment)
    return engine.cache_tokens(model, clips, range(copies), torch.device("cpu"), None)


def main(args) -> int:
    trained, info = load_checkpoint(args.checkpoint)
    split = json.loads((pathlib.Path(args.checkpoint).parent / "split.json").read_text())
    records = load_dataset(args.input_dir, probe=False)[0]
    sets = {"train": cache_tokens(trained, [r for r in records if r.video in set(split["train"])], info["num_frames"],
                                  info["img_size"], args.augmentations, augment=True),
            "val": cache_tokens(trained, [r for r in records if r.video in set(split["val"])], info["num_frames"],
                                info["img_size"], 1, augment=False)}
    if args.unseen_dir:
        sets["unseen"] = cache_tokens(trained, load_dataset(args.unseen_dir, probe=False)[0], info["num_frames"],
                                      info["img_size"], 1, augment=False)
    names = info["class_names"]
    print("cached tokens: " + ", ".join(f"{k} {tuple(v[0].shape)}" for k, v in sets.items()), flush=True)

    torch.manual_seed(args.seed)
    model = STAR(**{**info["model_args"], "num_queries": args.num_queries, "dropout": args.dropout}).train()   # the run's size
    side = math.isqrt(sets["train"][0].shape[1])
    init_position_table(model, (1, side, sets["train"][0].shape[1] // side))
    params = [p for n, p in model.named_parameters() if not n.startswith("backbone.stem.")]
    weights = {"loss_ce": args.ce_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    criterion = build_criterion(len(names), model.decoder.decoder.num_layers, True, weights, args.eos_coef)
    start = time.perf_counter()

    def report(step, _loss):
        figures = {k: engine.evaluate_tokens(model, criterion, *v, [], names, 0.5) for k, v in sets.items()}
        print(f"step {step}: " + "; ".join(f"{k} " + " ".join(f"{m} {f[m]:.2f}" for m in ("video_acc", "det_acc_50", "mean_iou"))
                                           for k, f in figures.items()) + f" ({time.perf_counter() - start:.0f} s)",
              flush=True)
    engine.fit_decoder(model, params, criterion, *sets["train"], steps=args.steps, lr=args.lr, weight_decay=1e-4,
                         batch_size=args.batch_size, grad_clip=0.5, seed=args.seed, device=torch.device("cpu"),
                         on_eval=report)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
