"""main.py (training CLI) end to end on tiny sample data: outputs, resume reproducibility, torchrun,
the non-finite guards, bad data, and fine-tuning from a checkpoint with other classes.

Speed: the real R(2+1)D-18 trunk has 31 M parameters; one CPU training step of it (forward, backward,
AdamW) takes several seconds, far too slow for ~10 short training runs. These tests therefore swap in
a tiny trunk with the same interface (``stem``, ``layer1..4``, 512 output channels) and a narrow
decoder (``install_tiny_network``). Everything main.py does around the network (data, sampler,
losses, optimiser, schedule, checkpoints, resume, DDP, reports) runs unchanged.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import checkpoint
import dataset
import engine
import main
import predictions_io
import recipes
import runtime
import losses as losses_module
import model as star_model
import model_setup
from config import TrainConfig, resolve_config, stored_setting
from conftest import free_port
from records import load_dataset
from synthetic_data import make_sample_dataset
from video import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY_ARGS = ["--epochs", "2", "--batch_size", "2", "--num_frames", "4", "--img_size", "64", "--pretrained", "none",
             "--workers", "0", "--eval_every", "1", "--num_queries", "4", "--device", "cpu",   # CPU: the suite's contract
             "--decoder_steps", "0"]   # the decoder phase has its own tests
PRED_HEADER = list(predictions_io.CSV_FIELDS)   # the one writer's header (its schema is checked in test_inference.py)
EMA_ARGS = ["--ema_decay", "0.9"]   # the reference run averages its weights: the resume test covers that state too
OUTPUTS = ["best_model.pth", "checkpoint.pth", "split.json", "training_results.csv", "test_predictions.csv",
           "losses.png", "metrics.png", "confusion_matrix.png", "train.log"]


# ----------------------------------------------------------------------------- tiny network

def tiny_r2plus1d_18(weights=None, **kwargs) -> nn.Module:
    """Stand-in for torchvision's r2plus1d_18: same attributes, 512 channels out, /2 in time and
    /16 in space (as the real trunk's /8, /16 on these tiny inputs), conv + BatchNorm + ReLU."""
    assert weights is None
    trunk = nn.Module()
    trunk.stem = nn.Sequential(nn.Conv3d(3, 8, (1, 4, 4), stride=(1, 4, 4), bias=False), nn.BatchNorm3d(8), nn.ReLU())
    trunk.layer1 = nn.Sequential(nn.Conv3d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(16), nn.ReLU())
    trunk.layer2 = nn.Sequential(nn.Conv3d(16, 16, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.ReLU())
    trunk.layer3 = nn.Identity()
    trunk.layer4 = nn.Conv3d(16, 512, 1)
    return trunk


def tiny_model_args(num_classes: int, **overrides) -> dict:
    small = {"hidden_dim": 32, "num_decoder_layers": 2, "nheads": 2, "dim_feedforward": 64, "max_positions": 512}
    return checkpoint.model_args_from(num_classes, **{**small, **overrides})


def install_tiny_network(setattr_=setattr) -> None:
    """Make STAR (wherever it is built: main.py, checkpoint.load_checkpoint) use the tiny trunk and
    decoder. ``setattr_`` is ``monkeypatch.setattr`` in-process (undone after the test)."""
    setattr_(star_model, "r2plus1d_18", tiny_r2plus1d_18)
    setattr_(main, "model_args_from", tiny_model_args)


@pytest.fixture
def tiny_net(monkeypatch):
    install_tiny_network(monkeypatch.setattr)


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    """10 tiny sample videos (3 classes + negatives); copy it before changing it."""
    root = tmp_path_factory.mktemp("sample") / "data"
    make_sample_dataset(root, num_videos=10, num_frames=16, width=64, height=48, seed=0)
    return root


def run_main(input_dir, output_dir, *extra) -> int:
    """main.main in-process; the root logger (runtime.setup_logging adds its handlers) is restored."""
    args = main.get_args_parser().parse_args(
        ["--input_dir", str(input_dir), "--output_dir", str(output_dir), *TINY_ARGS, *extra])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return main.main(args)
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                handler.close()
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def resolved(*flags, records=()) -> TrainConfig:
    """main.py's ``flags`` resolved as a run resolves them; no ``records``: whole-video data (clip mode)."""
    return resolve_config(main.get_args_parser().parse_args(["--input_dir", "d", "--output_dir", "o", *flags]), records)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def log_text(output_dir) -> str:
    return (Path(output_dir) / "train.log").read_text()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sample_data) -> Path:
    """One uninterrupted 2-epoch run (shared: end-to-end outputs, and the resume reference)."""
    out = tmp_path_factory.mktemp("run") / "full"
    with pytest.MonkeyPatch.context() as mp:
        install_tiny_network(mp.setattr)
        assert run_main(sample_data, out, *EMA_ARGS) == 0
    return out


def epoch_of(function, args, kwargs) -> int:
    """The ``epoch`` argument of a call to ``engine.train_one_epoch``."""
    return inspect.signature(function).bind(*args, **kwargs).arguments["epoch"]


# ----------------------------------------------------------------------------- 1. end to end

def test_end_to_end_writes_every_output(reference_run, sample_data, tiny_net):
    out = reference_run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    rows = read_rows(out / "training_results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == engine.EPOCH_FIELDS
    for row in rows:
        assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss"]))
        assert row["skipped_steps"] == "0" and row["score"] != ""

    with open(out / "test_predictions.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == PRED_HEADER
    split = json.loads((out / "split.json").read_text())
    assert sorted({r[0] for r in table[1:]}) == sorted(split["val"])      # every validation video, only those
    assert len(split["train"]) + len(split["val"]) == 10

    net, info = checkpoint.load_checkpoint(out / "best_model.pth")
    assert info["source"] == "project"
    assert info["class_names"] == (sample_data / "classes.txt").read_text().split()
    assert info["num_frames"] == 4 and info["img_size"] == 64
    assert info["mean"] == list(IMAGENET_MEAN) and info["std"] == list(IMAGENET_STD)
    with torch.no_grad():
        outputs = net(torch.zeros(1, 4, 3, 64, 64))
    assert outputs["pred_logits"].shape == (1, 4, len(info["class_names"]) + 1)

    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and {"optimizer", "scheduler", "scaler", "rng", "best_score"} <= set(ckpt)
    log = log_text(out)
    assert "epoch 2:" in log and "best model (epoch" in log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_end_to_end(sample_data, tmp_path, tiny_net):
    """On a GPU: fp16 autocast with GradScaler; every output written, finite losses, the scaler's state in
    the checkpoint. GradScaler starts at scale 2**16 and skips the steps whose gradients overflow until it
    has backed off, so a few skipped steps are expected, but not all of them."""
    out = tmp_path / "cuda"
    assert run_main(sample_data, out, "--device", "cuda", *EMA_ARGS) == 0   # later flags win: cuda, AMP on
    assert "precision: fp16 autocast" in log_text(out)
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    rows = read_rows(out / "training_results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["val_loss"])) for r in rows)
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["scaler"]["scale"] <= 2.0 ** 16
    assert sum(int(r["skipped_steps"]) for r in rows) < 2 * int(log_text(out).split(" steps per epoch")[0].split()[-1])


# ----------------------------------------------------------------------------- 2. resume

def test_resume_continues_and_reproduces_the_uninterrupted_run(reference_run, sample_data, tmp_path, tiny_net,
                                                               monkeypatch):
    out = tmp_path / "resumed"
    original = engine.train_one_epoch

    def interrupted(*args, **kwargs):
        if epoch_of(original, args, kwargs) >= 1:     # positional `epoch`: stop before the 2nd epoch trains
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_main(sample_data, out, *EMA_ARGS)
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1"]
    monkeypatch.setattr(engine, "train_one_epoch", original)

    assert run_main(sample_data, out, "--resume", *EMA_ARGS) == 0
    assert "resumed from" in log_text(out) and "continuing at epoch 2" in log_text(out)
    rows, ref = read_rows(out / "training_results.csv"), read_rows(reference_run / "training_results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]                     # in order, no duplicate
    for mine, theirs in zip(rows, ref):
        for key in ("lr", "train_loss", "train_loss_ce", "train_loss_bbox", "val_loss", "mean_iou"):
            assert float(mine[key]) == pytest.approx(float(theirs[key]), rel=1e-3, abs=1e-6), (mine["epoch"], key)
    a = torch.load(reference_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    b = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    for part in ("model", "ema"):                  # the weight average is resumed too
        for key in a[part]:
            torch.testing.assert_close(b[part][key], a[part][key], rtol=1e-3, atol=1e-5, msg=f"{part} {key}")


def test_resume_without_checkpoint_starts_from_scratch(sample_data, tmp_path, tiny_net):
    out = tmp_path / "fresh"
    assert run_main(sample_data, out, "--resume", "--epochs", "1") == 0
    assert "no " in log_text(out) and "starting from scratch" in log_text(out)
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1"]


# ----------------------------------------------------------------------------- 3. torchrun

WRAPPER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import main, test_train
test_train.install_tiny_network()
sys.exit(main.main(main.get_args_parser().parse_args()))
"""


def test_torchrun_two_processes_on_cpu(sample_data, tmp_path):
    """main.py under torchrun (gloo): runs the real main(); the wrapper only installs the tiny network."""
    script = tmp_path / "train_tiny.py"
    script.write_text(textwrap.dedent(WRAPPER.format(root=str(ROOT), tests=str(TESTS))))
    out = tmp_path / "ddp"
    # the repository first, and whatever the caller's PYTHONPATH holds (packages installed there) after it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), "--input_dir", str(sample_data), "--output_dir", str(out),
           *TINY_ARGS, "--epochs", "1", "--device", "cpu", "--decoder_steps", "6"]   # the phase runs on rank 0 only
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    rows = read_rows(out / "training_results.csv")
    assert [r["epoch"] for r in rows] == ["1"]                          # written once, by rank 0
    log = log_text(out)
    assert log.count("epoch 1:") == 1 and log.count("decoder step 6/6:") == 1
    # 6 training videos (3 steps in one process) over 2 ranks: 4 global batches, 2 per rank
    assert "2 steps per epoch" in log
    assert not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------- 4. non-finite guards

def test_nan_loss_stops_with_exit_2_and_keeps_the_last_checkpoint(sample_data, tmp_path, tiny_net, monkeypatch,
                                                                  caplog):
    """Diverged weights: the model's outputs become NaN in epoch 2 (so the loss would be NaN)."""
    out = tmp_path / "nan"
    original = engine.train_one_epoch
    saved = {}

    def nan_in_second_epoch(model, *args, **kwargs):
        if epoch_of(original, (model, *args), kwargs) >= 1:
            saved["checkpoint"] = (out / "checkpoint.pth").read_bytes()
            saved["best"] = (out / "best_model.pth").read_bytes()
            model.register_forward_hook(lambda module, inputs, outputs: {k: v * float("nan") if torch.is_tensor(v)
                                                                         else v for k, v in outputs.items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", nan_in_second_epoch)
    assert run_main(sample_data, out) == 2
    log = log_text(out)
    assert "epoch 2: the loss became nan" in log
    assert "last good checkpoint is unchanged" in log
    assert "Traceback" not in log
    assert (out / "checkpoint.pth").read_bytes() == saved["checkpoint"]
    assert (out / "best_model.pth").read_bytes() == saved["best"]
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"] == 0
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1"]


def test_an_epoch_whose_every_step_had_non_finite_gradients_stops_with_exit_2(sample_data, tmp_path, tiny_net,
                                                                              monkeypatch):
    """A finite loss with NaN gradients (as bf16 gave on a native-bf16 CPU): each step is skipped; an epoch in
    which all were skipped learnt nothing, and the run stops there instead of going on unchanged."""
    out = tmp_path / "nangrad"
    original = engine.train_one_epoch
    saved = {}

    def nan_gradients_in_second_epoch(model, *args, **kwargs):
        if epoch_of(original, (model, *args), kwargs) >= 1:
            saved["checkpoint"] = (out / "checkpoint.pth").read_bytes()
            next(model.head.parameters()).register_hook(lambda grad: grad * float("nan"))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", nan_gradients_in_second_epoch)
    assert run_main(sample_data, out) == 2
    log = log_text(out)
    assert "epoch 2: all 3 steps had a non-finite gradient norm and were skipped" in log, log
    assert "last good checkpoint is unchanged" in log and "Traceback" not in log
    assert (out / "checkpoint.pth").read_bytes() == saved["checkpoint"]
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1"]


def test_nan_loss_from_the_criterion_stops_with_exit_2(sample_data, tmp_path, tiny_net, monkeypatch):
    out = tmp_path / "nanloss"
    original = engine.train_one_epoch

    def nan_total(model, criterion, *args, **kwargs):
        real_total = criterion.total
        monkeypatch.setattr(criterion, "total", lambda losses: real_total(losses) * float("nan"))
        return original(model, criterion, *args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", nan_total)
    assert run_main(sample_data, out, "--epochs", "1") == 2
    assert "epoch 1: the loss became nan" in log_text(out)
    assert not (out / "checkpoint.pth").exists() and not (out / "training_results.csv").exists()


def test_non_finite_gradient_skips_the_step(sample_data, tmp_path, tiny_net, monkeypatch):
    """A finite loss with an inf gradient (first step only): that step is skipped and counted,
    the weights stay finite, and training goes on."""
    out = tmp_path / "infgrad"
    original = engine.train_one_epoch
    calls = {"n": 0}

    def inf_grad_once(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 1 else grad

    def with_hook(model, *args, **kwargs):
        if epoch_of(original, (model, *args), kwargs) == 0:
            model.queries.weight.register_hook(inf_grad_once)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", with_hook)
    # fp32: under auto bf16 a bad step is redone in fp32 instead (test_auto_precision_falls_back_at_the_first_bad...)
    assert run_main(sample_data, out, "--epochs", "1", "--precision", "fp32") == 0
    row, = read_rows(out / "training_results.csv")
    assert int(row["skipped_steps"]) == 1
    assert math.isfinite(float(row["train_loss"]))
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert calls["n"] >= 2          # later steps ran (and were applied)


# ----------------------------------------------------------------------------- 5. bad data

def test_bad_rows_are_reported_and_skipped(sample_data, tmp_path, tiny_net):
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    with open(data / "action_challenge.csv", newline="") as f:
        rows = list(csv.reader(f))
    labelled = next(r for r in rows[1:] if r[1])
    with open(data / labelled[1], "a") as f:
        f.write("0 1 2 three 4\n")                                       # malformed line next to a good one
    (data / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with open(data / "action_challenge.csv", "a", newline="") as f:
        csv.writer(f).writerows([["missing.mp4", ""], ["corrupt.mp4", ""]])

    out = tmp_path / "out"
    assert run_main(data, out, "--epochs", "1") == 0
    log = log_text(out)
    assert "missing.mp4" in log and "missing video" in log
    assert "corrupt.mp4" in log and "corrupt video" in log
    assert labelled[1] in log and "malformed label line" in log
    assert "10 videos:" in log                                           # the good ones, all of them
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1"]


def test_nothing_usable_returns_2_with_one_line_error(tmp_path, tiny_net):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corrupt.mp4").write_bytes(b"not a video at all" * 100)
    (data / "action_challenge.csv").write_text("video_file,label_file\nmissing.mp4,\ncorrupt.mp4,\n")
    out = tmp_path / "out"
    assert run_main(data, out, "--epochs", "1") == 2
    errors = [line for line in log_text(out).splitlines() if "error: " in line]
    assert len(errors) == 1 and "no usable videos" in errors[0] and "(2 problem(s))" in errors[0], errors
    assert "missing.mp4" in log_text(out) and "corrupt.mp4" in log_text(out)     # what is wrong, too
    assert not (out / "checkpoint.pth").exists()


def test_missing_dataset_folder_returns_2(tmp_path, tiny_net):
    assert run_main(tmp_path / "nowhere", tmp_path / "out", "--epochs", "1") == 2
    assert "no action_challenge.csv" in log_text(tmp_path / "out")


# ----------------------------------------------------------------------------- 6. fine-tuning

def test_init_from_checkpoint_with_other_classes(sample_data, tmp_path, tiny_net):
    torch.manual_seed(1)
    args = tiny_model_args(5, num_queries=4)
    other = star_model.STAR(**args)
    source = tmp_path / "five_classes.pth"
    checkpoint.save_checkpoint(checkpoint.make_checkpoint(other, args, [f"c{i}" for i in range(5)],
                                                          checkpoint.PUBLISHED_PREPROCESSING, epoch=0), source)
    out = tmp_path / "finetune"
    assert run_main(sample_data, out, "--epochs", "1", "--init_from", str(source)) == 0
    log = log_text(out)
    assert f"class layer {checkpoint.CLASS_LAYER} re-initialised (5 classes there, 3 here)" in log
    assert f"lr {recipes.PUBLISHED_RECIPE['lr']:g} (trunk" in log                          # fine-tuning default
    net, info = checkpoint.load_checkpoint(out / "best_model.pth")
    assert net.num_classes == 3 and len(info["class_names"]) == 3


def test_init_from_unusable_file_returns_2(sample_data, tmp_path, tiny_net):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 50)
    assert run_main(sample_data, tmp_path / "out", "--epochs", "1", "--init_from", str(bad)) == 2
    assert "error: " in log_text(tmp_path / "out") and "bad.pth" in log_text(tmp_path / "out")


# ----------------------------------------------------------------------------- recipe, groups, schedule

def test_recipe_defaults_depend_on_the_trunk_and_flags_win():
    scratch = resolved("--pretrained", "none", "--lr", "3e-4")
    assert scratch.lr == 3e-4 and scratch.recipe == "scratch"          # an explicit flag wins
    assert all(getattr(scratch, k) == v for k, v in recipes.SCRATCH_RECIPE.items() if k != "lr")
    for extra in ([], ["--init_from", "x.pth"], ["--pretrained", "none", "--backbone_weights", "w.pth"]):
        config = resolved(*extra)
        assert config.recipe == "published"
        assert all(getattr(config, k) == v for k, v in recipes.PUBLISHED_RECIPE.items()), extra
    assert resolved("--recipe", "scratch").recipe == "scratch" and resolved("--pretrained", "none").decoder_steps > 0


def test_one_config_resolves_flags_recipe_and_cutting_once_and_stays_as_it_is():
    args = main.get_args_parser().parse_args(["--input_dir", "d", "--output_dir", "o", "--pretrained", "none",
                                              "--no_amp", "--class_names", "a", "b"])
    flags = dict(vars(args))
    per_frame = [types.SimpleNamespace(per_frame=True, fps=25.0), types.SimpleNamespace(per_frame=False, fps=30.0)]
    config = resolve_config(args, per_frame)
    assert vars(args) == flags                                                # the parsed flags are left as they are
    assert (config.mode, config.window_sec, config.clips_per_video, config.pair_prob) == \
        ("tube", round(recipes.WINDOW_STRIDE * 16 / 25, 4), recipes.WINDOWS_PER_VIDEO, recipes.PAIR_PROB)
    assert config.precision == "fp32" and not hasattr(config, "no_amp")      # --no_amp: --precision fp32
    assert config.decoder_steps == recipes.TUBE_DECODER_STEPS and config.time_tokens is True
    assert config.set_cost_class == config.ce_loss_coef == recipes.SCRATCH_RECIPE["ce_loss_coef"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    assert dataclasses.replace(config, lr=1.0).lr == 1.0 and config.lr == recipes.SCRATCH_RECIPE["lr"]
    with pytest.raises(TypeError, match="lr"):
        dataclasses.replace(config, lr=None)                                 # a resolved config leaves nothing open
    stored = config.to_dict()                                                # what checkpoints hold under "args"
    assert set(stored) == {f.name for f in dataclasses.fields(TrainConfig)} and stored["class_names"] == ["a", "b"]
    assert TrainConfig(**{**stored, "class_names": ("a", "b")}) == config
    whole = resolved("--set_cost_class", "1")
    assert (whole.mode, whole.window_sec, whole.clips_per_video, whole.pair_prob, whole.time_tokens) == \
        ("clip", None, 1, 0.0, False)
    assert whole.set_cost_class == 1.0 and whole.precision == "auto" and whole.recipe == "published"
    assert resolved("--mode", "tube").window_sec is None                     # tube mode on whole-video labels


def _remember_initial_stem(monkeypatch) -> dict:
    """The temporal stem conv's weight as main.py initialised it (captured when it freezes stages)."""
    initial = {}
    freeze = main.freeze_trunk_stages

    def remember(model, num_stages):     # called once the model is initialised
        initial["weight"] = model_setup.motion_stem_conv(model).weight.detach().clone()
        return freeze(model, num_stages)

    monkeypatch.setattr(main, "freeze_trunk_stages", remember)
    return initial


def test_motion_constraint_keeps_the_stem_blind_to_stillness_through_training(sample_data, tmp_path, tiny_net,
                                                                             monkeypatch):
    """From scratch with the stem trained (--freeze_trunk 0; the recipe freezes it): after 2 epochs of
    steps the kernels have moved but still sum to zero over time (without the constraint AdamW moves them off at once)."""
    initial = _remember_initial_stem(monkeypatch)
    out = tmp_path / "stem_trained"
    assert run_main(sample_data, out, "--freeze_trunk", "0") == 0
    weight = model_setup.motion_stem_conv(checkpoint.load_checkpoint(out / "checkpoint.pth")[0]).weight
    assert not torch.allclose(weight, initial["weight"])                 # trained
    assert weight.sum(2).abs().max() < 1e-6 * weight.abs().max()
    assert "motion constraint on, position init on" in log_text(out) and "frozen trunk stages 0," in log_text(out)


def test_a_frozen_stem_is_not_reprojected_by_the_motion_constraint(sample_data, tmp_path, tiny_net, monkeypatch):
    """--no-motion_init with the constraint on and the stem frozen: the stem stays exactly as initialised."""
    initial = _remember_initial_stem(monkeypatch)
    out = tmp_path / "frozen_stem"
    assert run_main(sample_data, out, "--epochs", "1", "--freeze_trunk", "2", "--no-motion_init") == 0
    weight = model_setup.motion_stem_conv(checkpoint.load_checkpoint(out / "checkpoint.pth")[0]).weight
    assert weight.sum(2).abs().max() > 1e-3                              # not zero-sum: never projected
    assert torch.equal(weight, initial["weight"])


def test_the_from_scratch_recipe_freezes_stem_and_layer1(reference_run):
    """The reference run is from scratch: it ran with the recipe's --freeze_trunk 2 and its checkpoint says so
    (what freezing does: test_freeze_trunk_keeps_the_first_stages_and_trains_the_rest)."""
    assert recipes.SCRATCH_RECIPE["freeze_trunk"] == 2 and recipes.PUBLISHED_RECIPE["freeze_trunk"] == 0
    ckpt = torch.load(reference_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["freeze_trunk"] == 2 and "frozen trunk stages 2," in log_text(reference_run)


def test_the_checkpoints_hold_the_resolved_config_and_the_log_says_it(reference_run):
    for name in ("checkpoint.pth", "best_model.pth"):
        stored = torch.load(reference_run / name, map_location="cpu", weights_only=True)["args"]
        assert set(stored) == {f.name for f in dataclasses.fields(TrainConfig)}, name
        assert (stored["recipe"], stored["mode"], stored["precision"], stored["decoder_steps"]) == \
            ("scratch", "clip", "auto", 0)
        assert stored["lr"] == recipes.SCRATCH_RECIPE["lr"] and stored["ema_decay"] == 0.9
    config_lines = [line for line in log_text(reference_run).splitlines() if " config: " in line]
    assert len(config_lines) == 1 and "recipe=scratch" in config_lines[0] and "freeze_trunk=2" in config_lines[0]


def test_a_checkpoint_with_the_older_args_resumes(reference_run, sample_data, tmp_path, tiny_net):
    """Checkpoints written before the config held main.py's namespace under "args" (recipe "auto", a no_amp key, None
    where the model or the matcher chose): they resume as before; a setting they lack or hold None reads as its
    default."""
    out = tmp_path / "older"
    shutil.copytree(reference_run, out)
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    ckpt["args"] = {**ckpt["args"], "recipe": "auto", "no_amp": False, "set_cost_class": None, "time_tokens": None}
    checkpoint.save_checkpoint(ckpt, out / "checkpoint.pth")
    assert run_main(sample_data, out, "--epochs", "3", "--resume", *EMA_ARGS) == 0
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1", "2", "3"]
    assert stored_setting(ckpt, "freeze_trunk", 0) == 2 and stored_setting(ckpt, "set_cost_class", 2.0) == 2.0
    assert stored_setting({}, "freeze_trunk", 0) == 0
    assert stored_setting({"args": {"freeze_trunk": None}}, "freeze_trunk", 0) == 0


def test_resume_with_another_freeze_trunk_says_what_to_do(reference_run, sample_data, tmp_path, tiny_net):
    out = tmp_path / "refrozen"
    shutil.copytree(reference_run, out)
    assert run_main(sample_data, out, "--epochs", "3", "--resume", *EMA_ARGS, "--freeze_trunk", "0") == 2
    assert "checkpoint.pth: was trained with --freeze_trunk 2; resume with --freeze_trunk 2" in log_text(out)


def test_class_loss_and_no_object_weights_reach_the_criterion_and_the_matcher(sample_data, tiny_net):
    dataset_args = main.get_args_parser().parse_args(["--input_dir", str(sample_data), "--output_dir", "o", *TINY_ARGS])
    class_map = load_dataset(sample_data)[1]
    for extra, expected in (([], recipes.SCRATCH_RECIPE["ce_loss_coef"]), (["--ce_loss_coef", "3"], 3.0)):
        config = resolved(*TINY_ARGS, *extra)
        assert config.set_cost_class == expected                  # the class cost follows the class loss weight
        criterion = main.build_training_state(config, class_map, torch.device("cpu"), 1)[1]
        assert criterion.weight_dict["loss_ce"] == criterion.weight_dict["loss_ce_0"] == expected
        assert criterion.matcher.cost_class == expected
        assert criterion.weight_dict["loss_bbox"] == 5.0 and criterion.weight_dict["loss_giou"] == 2.0
    assert dataset_args.ce_loss_coef is None and recipes.PUBLISHED_RECIPE["ce_loss_coef"] == 2.0   # the published weight
    criterion = main.build_training_state(resolved(*TINY_ARGS, "--set_cost_class", "1"), class_map,
                                          torch.device("cpu"), 1)[1]
    assert criterion.matcher.cost_class == 1.0 and criterion.weight_dict["loss_ce"] == recipes.SCRATCH_RECIPE["ce_loss_coef"]
    for extra, expected in (([], 0.1), (["--eos_coef", "0.3"], 0.3)):     # 0.1: the published no-object weight
        criterion = main.build_training_state(resolved(*TINY_ARGS, *extra), class_map, torch.device("cpu"), 1)[1]
        assert criterion.class_weight.tolist() == pytest.approx([1.0] * len(class_map) + [expected])


def test_dropout_flag_reaches_every_dropout_and_the_model_args(sample_data, tiny_net):
    class_map = load_dataset(sample_data)[1]
    for extra, expected in (([], 0.1), (["--dropout", "0.3"], 0.3)):      # 0.1: the published network's
        config = resolved(*TINY_ARGS, *extra)
        model, *_, model_args = main.build_training_state(config, class_map, torch.device("cpu"), 1)
        assert model_args["dropout"] == expected                 # stored in the checkpoint's model arguments
        rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        rates |= {m.dropout for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}   # a float there
        assert rates == {expected}


def test_parameter_groups_split_trunk_from_the_rest_once():
    net = star_model.STAR(num_classes=2, **{k: v for k, v in tiny_model_args(2).items() if k != "num_classes"})
    trunk, rest = engine.parameter_groups(net, resolved("--lr", "1e-4", "--lr_backbone", "5e-4"))
    assert (trunk["lr"], rest["lr"]) == (5e-4, 1e-4)
    ids = [id(p) for p in trunk["params"] + rest["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert {id(p) for p in trunk["params"]} == {id(p) for p in net.backbone.stem.parameters()}


def test_freeze_trunk_keeps_the_first_stages_and_trains_the_rest(sample_data, tiny_net):
    """--freeze_trunk 2: stem and layer1 get no gradient and are in no optimizer group, so a step leaves
    their weights as they were (their BatchNorm statistics still follow the data); later stages train."""
    records, class_map, _ = load_dataset(sample_data)
    config = resolved(*TINY_ARGS, "--freeze_trunk", "2", "--motion_constraint")
    model, criterion, optimizer, _, scaler, *_ = main.build_training_state(config, class_map, torch.device("cpu"), 1)
    stem, layer1 = list(model.backbone.stem)[:2]
    frozen = [p for stage in (stem, layer1) for p in stage.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert not grouped & {id(p) for p in frozen}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clips, targets = dataset.collate([dataset.ActionDataset(records, 4, 64)[i] for i in range(4)])
    targets = [{k: v for k, v in t.items() if k != "video"} for t in targets]
    model.train()
    loss = criterion.total(criterion(model(clips), targets))
    assert engine.optimizer_step(loss, model.parameters(), optimizer, scaler, 0.5)
    after = model.state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.startswith(("backbone.stem.0.", "backbone.stem.1.")) and "running_" not in name and "num_batches" not in name:
            assert not changed, name                              # frozen weights and BatchNorm affine terms
        elif name.startswith("backbone.stem.2.") and name.endswith("weight"):
            assert changed, name                                  # layer2 trains
    assert not torch.equal(before["backbone.stem.0.1.running_mean"], after["backbone.stem.0.1.running_mean"])
    with pytest.raises(SystemExit):
        main.get_args_parser().parse_args(["--input_dir", "d", "--output_dir", "o", "--freeze_trunk", "6"])


def test_schedule_warms_up_then_follows_the_cosine_to_min_lr():
    config = resolved("--epochs", "10", "--warmup_epochs", "2", "--min_lr", "1e-6")
    bases = (5e-4, 2e-4)
    optimizer = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in bases])
    scheduler = engine.make_scheduler(optimizer, config)
    seen = []
    for _ in range(config.epochs):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for base, lrs in zip(bases, zip(*seen)):
        assert lrs[0] == pytest.approx(base / 3) and lrs[1] == pytest.approx(2 * base / 3)
        for epoch in range(2, 10):                      # torch's CosineAnnealingLR formula over 8 epochs
            cosine = 1e-6 + (base - 1e-6) * (1 + math.cos(math.pi * (epoch - 2) / 8)) / 2
            assert lrs[epoch] == pytest.approx(cosine, rel=1e-9)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-6, 1e-6])


def test_weight_average_follows_the_ema_formula_with_its_ramp():
    """make_ema: after n earlier updates the average moves by 1 - min(decay, (1 + n) / (10 + n)) towards
    the weights; integer buffers (BatchNorm's step count) are copied, not averaged."""
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = engine.make_ema(net, 0.9)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    ema.update_parameters(net)                                            # first update: a copy
    for n in range(1, 40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
            net[1].num_batches_tracked += 1
        ema.update_parameters(net)
        keep = min(0.9, (1 + n) / (10 + n))
        for k, v in net.state_dict().items():
            expected[k] = v.clone() if not v.is_floating_point() else keep * expected[k] + (1 - keep) * v
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], msg=k)
    assert engine.make_ema(net, 0.0) is None
    with pytest.raises(runtime.UsageError):
        engine.make_ema(net, 1.0)


def test_best_model_holds_the_weight_average_and_the_checkpoint_both(reference_run):
    """With --ema_decay, validation and best_model.pth use the weight average; checkpoint.pth keeps the
    training weights (to resume) and the average beside them."""
    ckpt = torch.load(reference_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    best = torch.load(reference_run / "best_model.pth", map_location="cpu", weights_only=True)
    averaged = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert set(averaged) == set(ckpt["model"]) == set(best["model"])
    assert any(not torch.equal(averaged[k], ckpt["model"][k]) for k in averaged)
    if best["epoch"] == ckpt["epoch"]:                 # best = last epoch: the very same averaged weights
        assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert "weight average decay 0.9," in log_text(reference_run)


def test_without_weight_average_the_checkpoints_hold_the_training_weights(sample_data, tmp_path, tiny_net):
    for trunk in ("none", "kinetics400"):                                                # opt-in (README)
        assert resolved("--pretrained", trunk).ema_decay == 0.0
    out = tmp_path / "plain"
    assert run_main(sample_data, out, "--epochs", "1") == 0
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    best = torch.load(out / "best_model.pth", map_location="cpu", weights_only=True)
    assert "ema" not in ckpt and "weight average off" in log_text(out)
    assert all(torch.equal(best["model"][k], v) for k, v in ckpt["model"].items())
    assert run_main(sample_data, out, "--epochs", "2", "--resume", *EMA_ARGS) == 2       # says what to do
    assert "resume with --ema_decay 0" in log_text(out)


def test_a_tie_in_the_validation_score_goes_to_the_later_epoch(sample_data, tmp_path, tiny_net, monkeypatch):
    monkeypatch.setattr(engine.metrics, "best_score", lambda result: 0.5)
    out = tmp_path / "ties"
    assert run_main(sample_data, out) == 0
    best = torch.load(out / "best_model.pth", map_location="cpu", weights_only=True)
    assert best["epoch"] == 1                                              # the 2nd (last) of the tied epochs


@pytest.mark.parametrize("native_bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_decoder_phase_retrains_the_decoder_side_on_the_trunk_and_keeps_its_best(sample_data, tmp_path, tiny_net,
                                                                                 monkeypatch, native_bf16):
    monkeypatch.setattr(engine.metrics, "best_score", lambda result: 0.5)  # all tie: the last evaluation is kept
    # a CPU with native bf16 trains and evaluates under bf16 autocast: the phase must score as the final report does
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    out = tmp_path / "phase"
    assert run_main(sample_data, out, "--decoder_steps", "12") == 0
    log = log_text(out)
    assert "decoder phase: trunk tokens of" in log and "decoder step 12/12:" in log
    assert len(re.findall(r"^\S+ decoder step \d+/12: ", log, re.MULTILINE)) == 12         # every steps/12
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    best = torch.load(out / "best_model.pth", map_location="cpu", weights_only=True)
    assert best["decoder_step"] == 12 and best["epoch"] == ckpt["epoch"] == 1
    decoder_side = ("pos_embedding.", "queries.", "decoder.", "head.")
    for key, value in ckpt["model"].items():
        if key.startswith("backbone."):                              # the trunk and projection as trained
            assert torch.equal(best["model"][key], value), key
    assert any(not torch.equal(best["model"][k], v) for k, v in ckpt["model"].items() if k.startswith(decoder_side))
    # the phase scores cached tokens; the final report runs the whole saved model on the videos: same metrics
    full = json.loads((out / "val_metrics.json").read_text())
    for key in ("video_acc", "det_acc_50", "mean_iou", "map50", "map50_95"):
        assert best["metrics"][key] == pytest.approx(full[key], rel=1e-4, abs=1e-5), key


def test_decoder_phase_keeps_the_best_of_its_second_half_over_the_epochs_best(sample_data, tmp_path, tiny_net,
                                                                              monkeypatch):
    """Scores by evaluation: epochs 9, phase steps 1-5 (first half) 8, step 6 2, step 7 3, later 1: the phase's
    step 7 is kept although the epochs and the first half scored higher."""
    step_now = {"step": None}
    real_fit = engine.fit_decoder

    def fit_tagging_steps(*args, on_eval, **kwargs):
        def tagged(step, loss):
            step_now["step"] = step
            on_eval(step, loss)
        real_fit(*args, on_eval=tagged, **kwargs)

    def score(result):
        step = step_now["step"]
        if step is None:
            return 9.0
        return {6: 2.0, 7: 3.0}.get(step, 8.0 if step < 6 else 1.0)
    monkeypatch.setattr(engine, "fit_decoder", fit_tagging_steps)
    monkeypatch.setattr(engine.metrics, "best_score", score)
    out = tmp_path / "phase_half"
    assert run_main(sample_data, out, "--decoder_steps", "12") == 0
    best = torch.load(out / "best_model.pth", map_location="cpu", weights_only=True)
    assert best["decoder_step"] == 7 and best["metrics"]["score"] == 3.0
    log = log_text(out)
    assert "new best model (score 9.0000) ->" in log                       # the epochs' best was written first
    assert re.findall(r"decoder step (\d+)\) ->", log) == ["6", "7"]


def test_decoder_phase_is_the_from_scratch_default_only():
    def parse(extra):
        return resolved(*extra).decoder_steps
    assert parse(["--pretrained", "none"]) == recipes.SCRATCH_RECIPE["decoder_steps"] > 0
    assert parse([]) == parse(["--pretrained", "none", "--init_from", "x.pth"]) == 0
    assert parse(["--decoder_steps", "50"]) == 50


def test_decoder_probe_trains_the_decoder_side_on_cached_tokens(reference_run, sample_data, tiny_net, capsys):
    """tools/decoder_probe.py (README's cached-token measurements) runs on a run's checkpoint and prints its figures."""
    from tools import decoder_probe
    args = decoder_probe.get_args_parser().parse_args(
        ["--checkpoint", str(reference_run / "checkpoint.pth"), "--input_dir", str(sample_data),
         "--unseen_dir", str(sample_data), "--augmentations", "2", "--steps", "6", "--num_queries", "4"])
    assert decoder_probe.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    split = json.loads((reference_run / "split.json").read_text())
    assert lines[0].startswith(f"cached tokens: train ({2 * len(split['train'])}, ")
    assert sum(line.startswith("step ") for line in lines) == 6
    assert "; val video_acc " in lines[-1] and "; unseen video_acc " in lines[-1] and "det_acc_50" in lines[-1]


# ----------------------------------------------------------------------------- 8. bf16 gradient check

class Bf16WeightGradientBug(torch.autograd.Function):
    """Identity forward; under bf16 a NaN gradient backward, as oneDNN's kernel gives the trunk's conv weights."""

    @staticmethod
    def forward(ctx, x, healthy_calls):
        ctx.bf16 = x.dtype == torch.bfloat16 and healthy_calls < 0
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad * float("nan") if ctx.bf16 else grad), None


class BuggyUnderBf16(nn.Module):
    """NaN gradients under bf16 from the ``healthy``-th call on (0: always; the real bug comes and goes)."""

    def __init__(self, healthy: int = 0):
        super().__init__()
        self.healthy = healthy

    def forward(self, x):
        self.healthy -= 1
        return Bf16WeightGradientBug.apply(x, self.healthy)


def tiny_r2plus1d_18_with_bf16_bug(weights=None, **kwargs) -> nn.Module:
    trunk = tiny_r2plus1d_18(weights, **kwargs)
    trunk.layer2.append(BuggyUnderBf16())      # after layer2's conv: its weight gradient is NaN under bf16
    return trunk


@pytest.fixture
def bf16_cpu_with_bug(monkeypatch, tiny_net):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(star_model, "r2plus1d_18", tiny_r2plus1d_18_with_bf16_bug)


def test_auto_precision_falls_back_to_fp32_when_a_bf16_step_gives_non_finite_gradients(sample_data, tmp_path,
                                                                                       bf16_cpu_with_bug):
    out = tmp_path / "fallback"
    assert run_main(sample_data, out, "--epochs", "1") == 0
    log = log_text(out)
    assert "bf16 autocast (auto: this CPU has native bf16)" in log
    assert log.count("precision: fp32 from now on, not bf16: a bf16 training step on the first batch gave "
                     "non-finite gradients") == 1 and "tools/check_bf16.py" in log
    assert "autocast None;" in log
    row, = read_rows(out / "training_results.csv")
    assert row["skipped_steps"] == "0" and math.isfinite(float(row["train_loss"]))


def test_auto_precision_falls_back_at_the_first_bad_bf16_step_and_redoes_it_in_fp32(sample_data, tmp_path, tiny_net,
                                                                                  monkeypatch):
    """Seen on a Zen 4 CPU: the first-batch check was finite, every later bf16 step NaN (with loader workers)."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)

    def trunk_healthy_for_the_check_and_one_step(weights=None, **kwargs):
        trunk = tiny_r2plus1d_18(weights, **kwargs)
        trunk.layer2.append(BuggyUnderBf16(healthy=2))
        return trunk
    monkeypatch.setattr(star_model, "r2plus1d_18", trunk_healthy_for_the_check_and_one_step)
    out = tmp_path / "late"
    assert run_main(sample_data, out, "--epochs", "2") == 0
    log = log_text(out)
    assert "precision check: a bf16 training step on the first batch gives finite gradients" in log
    assert log.count("precision: fp32 from now on, not bf16: epoch 1: a bf16 step gave non-finite gradients") == 1
    rows = read_rows(out / "training_results.csv")
    assert [r["skipped_steps"] for r in rows] == ["0", "0"]           # the bad step was redone, nothing skipped


def test_explicit_bf16_with_non_finite_gradients_says_how_to_fall_back(sample_data, tmp_path, bf16_cpu_with_bug):
    out = tmp_path / "forced"
    assert run_main(sample_data, out, "--epochs", "1", "--precision", "bf16") == 2
    errors = [line for line in log_text(out).splitlines() if "error: " in line]
    assert len(errors) == 1 and "--precision bf16:" in errors[0] and "train with --precision fp32" in errors[0]
    assert not (out / "checkpoint.pth").exists()


def test_a_run_that_fell_back_to_fp32_resumes_in_fp32_and_ends_as_the_uninterrupted_run(sample_data, tmp_path,
                                                                                          tiny_net, monkeypatch):
    """The precision a run has reached is in checkpoint.pth: resumed, it does not try bf16 again (whose steps would
    change the figures) and ends with the uninterrupted run's last row."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)

    def trunk_that_goes_bad_at_its_second_step(weights=None, **kwargs):
        trunk = tiny_r2plus1d_18(weights, **kwargs)
        trunk.layer2.append(BuggyUnderBf16(healthy=2))   # the check and one step fine, then NaN: falls back in epoch 1
        return trunk
    monkeypatch.setattr(star_model, "r2plus1d_18", trunk_that_goes_bad_at_its_second_step)
    whole = tmp_path / "whole"
    assert run_main(sample_data, whole, "--epochs", "2") == 0
    original = engine.train_one_epoch

    def interrupted(*args, **kwargs):
        if epoch_of(original, args, kwargs) >= 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_main(sample_data, part, "--epochs", "2")
    assert torch.load(part / "checkpoint.pth", weights_only=True)["precision"] == "fp32"
    monkeypatch.setattr(engine, "train_one_epoch", original)
    assert run_main(sample_data, part, "--epochs", "2", "--resume") == 0
    assert "precision: fp32, as the resumed run had fallen back to it" in log_text(part)
    mine, theirs = read_rows(part / "training_results.csv")[-1], read_rows(whole / "training_results.csv")[-1]
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox", "val_loss", "mean_iou"):
        assert float(mine[key]) == pytest.approx(float(theirs[key]), rel=1e-3, abs=1e-6), key


def test_auto_precision_keeps_bf16_where_its_gradients_are_finite(sample_data, tmp_path, tiny_net, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    out = tmp_path / "kept"
    assert run_main(sample_data, out, "--epochs", "1") == 0
    log = log_text(out)
    assert "precision check: a bf16 training step on the first batch gives finite gradients" in log
    assert "autocast torch.bfloat16;" in log
    assert run_main(sample_data, tmp_path / "fp32", "--epochs", "1", "--no_amp") == 0    # the old flag: fp32, no check
    assert "precision check" not in log_text(tmp_path / "fp32") and "autocast None;" in log_text(tmp_path / "fp32")


def test_the_bf16_check_leaves_the_model_and_the_random_streams_as_they_were(sample_data, tiny_net):
    records, class_map, _ = load_dataset(sample_data)
    net = star_model.STAR(**tiny_model_args(len(class_map))).train()
    criterion = losses_module.build_criterion(len(class_map), 2)
    clips, targets = dataset.collate([dataset.ActionDataset(records, 4, 64)[i] for i in range(2)])
    targets = [{k: v for k, v in t.items() if k != "video"} for t in targets]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    assert engine.bf16_gradients_finite(net, criterion, clips, targets, torch.device("cpu")) == []
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    buggy = star_model.STAR(**tiny_model_args(len(class_map)))
    buggy.backbone.stem[2].append(BuggyUnderBf16())
    bad = engine.bf16_gradients_finite(buggy, criterion, clips, targets, torch.device("cpu"))
    assert bad and all(name.startswith("backbone.") for name in bad)


def _cpu_has_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


@pytest.mark.skipif(not _cpu_has_amx(), reason="needs a CPU with AMX (the oneDNN bf16 bug is in its AMX kernel)")
def test_on_an_amx_cpu_the_real_check_chooses_fp32_for_the_recommended_shapes():
    """The real network at the recommended 8x112, batch 4, stem and layer1 frozen (torch 2.14.1: NaN there)."""
    torch.manual_seed(0)
    net = star_model.STAR(num_classes=3)
    model_setup.freeze_trunk_stages(net, 2)
    criterion = losses_module.build_criterion(3, 4)
    clips = torch.randn(4, 8, 3, 112, 112)
    targets = [{"labels": torch.tensor([i % 3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])} for i in range(4)]
    bad = engine.bf16_gradients_finite(net, criterion, clips, targets, torch.device("cpu"))
    assert bad, "bf16 gradients were finite: the oneDNN AMX bug may be fixed in this torch; the check keeps bf16 then"


# ----------------------------------------------------------------------------- 9. outputs survive

def test_resume_drops_result_rows_past_the_checkpoint(reference_run, sample_data, tmp_path, tiny_net):
    """A kill between an epoch's row in training_results.csv and its checkpoint.pth: the row is not kept twice."""
    out = tmp_path / "killed"
    shutil.copytree(reference_run, out)
    rows = read_rows(out / "training_results.csv")
    with open(out / "training_results.csv", "a", newline="") as f:   # epoch 3's row, without its checkpoint
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow({**rows[-1], "epoch": "3"})
    assert run_main(sample_data, out, "--epochs", "3", "--resume", *EMA_ARGS) == 0
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1", "2", "3"]
    assert "dropped 1 row(s) past the checkpoint's epoch 2" in log_text(out)


def test_without_matplotlib_a_finished_run_keeps_its_outputs_and_warns_once(sample_data, tmp_path, tiny_net,
                                                                             monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` raises ImportError
    out = tmp_path / "noplots"
    assert run_main(sample_data, out, "--epochs", "1") == 0
    for name in ("best_model.pth", "checkpoint.pth", "training_results.csv", "test_predictions.csv", "val_metrics.json"):
        assert (out / name).is_file(), name
    log = log_text(out)
    assert log.count("plots skipped:") == 2 and "Traceback" not in log       # the history plots and the confusion matrix


def test_check_bf16_tool_reports_the_repros_and_the_workaround_is_right(capsys):
    """tools/check_bf16.py: its exit code says what it printed; the workaround (time padded beforehand) and oneDNN
    off are right on any CPU."""
    from tools import check_bf16
    parse = check_bf16.get_args_parser().parse_args
    rc = check_bf16.main(parse(["--tries", "2"]))
    text = capsys.readouterr().out
    assert rc == (1 if "WRONG" in text else 0) and ("reproduced: a bf16" in text) == (rc == 1)
    assert "time padded beforehand (the workaround): right" in text and "short-time:" in text and "amx:" in text
    try:
        assert check_bf16.main(parse(["--tries", "1", "--no_mkldnn"])) == 0
    finally:
        torch.backends.mkldnn.enabled = True


# ----------------------------------------------------------------------------- 10. per-frame labels (tubes)

@pytest.fixture(scope="module")
def tube_data(tmp_path_factory) -> Path:
    """10 tiny per-frame sample videos (40 frames: actors act for part of each, some two at once)."""
    root = tmp_path_factory.mktemp("tubes") / "data"
    make_sample_dataset(root, num_videos=10, num_frames=40, width=64, height=48, seed=0, per_frame=True)
    return root


def test_per_frame_labels_train_on_windows_and_report_tube_metrics(tube_data, tmp_path, tiny_net):
    out = tmp_path / "tubes"
    assert run_main(tube_data, out, "--window_sec", "0.8", "--epochs", "1") == 0
    row, = read_rows(out / "training_results.csv")
    for key in ("frame_map50", "video_map20", "video_map50"):
        assert 0.0 <= float(row[key]) <= 1.0, key
    assert "frame-mAP@0.5" in log_text(out) and "video-mAP@0.5" in log_text(out)
    full = json.loads((out / "val_metrics.json").read_text())            # per class, as test.py's report shows them
    for key in ("frame_ap50", "video_ap50"):
        assert set(full[key]) == set(checkpoint.load_checkpoint(out / "best_model.pth")[1]["class_names"]), key
        assert all(v is None or 0.0 <= v <= 1.0 for v in full[key].values()), key
    best = torch.load(out / "best_model.pth", map_location="cpu", weights_only=True)
    assert best["preprocessing"]["window_sec"] == 0.8                  # test.py cuts its windows so by default
    _, info = checkpoint.load_checkpoint(out / "best_model.pth")
    assert info["window_sec"] == 0.8


def test_whole_video_labels_report_no_tube_metrics(reference_run):
    rows = read_rows(reference_run / "training_results.csv")
    assert all(r["frame_map50"] == "" and r["video_map50"] == "" for r in rows)
    assert "frame-mAP" not in log_text(reference_run)


def test_per_frame_labels_train_the_tube_mode_by_default_with_its_decoder_phase(tube_data, tmp_path, tiny_net):
    out = tmp_path / "tube_mode"
    assert run_main(tube_data, out, "--epochs", "1", "--decoder_steps", "12") == 0
    best = torch.load(out / "best_model.pth", map_location="cpu", weights_only=True)
    assert best["model_args"]["tube_steps"] == 4                       # no flag: per-frame labels choose tubes
    assert best["preprocessing"]["window_sec"] == pytest.approx(recipes.WINDOW_STRIDE * 4 / 25)   # 4 frames at 25 fps
    assert "mode tube" in log_text(out) and "decoder step 12/12" in log_text(out)
    assert "the class under each true box fitted" in log_text(out)
    assert f"{recipes.WINDOWS_PER_VIDEO} per video and epoch; {recipes.PAIR_PROB:g} side by side" in log_text(out)
    net, info = checkpoint.load_checkpoint(out / "best_model.pth")
    with torch.no_grad():
        pred = net(torch.zeros(1, 4, 3, 64, 64))
    assert pred["pred_logits"].shape[:3] == (1, 4, 4) and net.locate is not None


def test_whole_video_labels_default_to_clip_mode_and_train_the_tube_mode_when_asked(reference_run, sample_data,
                                                                                   tmp_path, tiny_net):
    clip = torch.load(reference_run / "best_model.pth", map_location="cpu", weights_only=True)
    assert clip["model_args"]["tube_steps"] == 0 and clip["preprocessing"]["window_sec"] is None
    out = tmp_path / "whole_video_tubes"
    assert run_main(sample_data, out, "--epochs", "1", "--mode", "tube") == 0
    best = torch.load(out / "best_model.pth", map_location="cpu", weights_only=True)
    assert best["model_args"]["tube_steps"] == 4 and best["preprocessing"]["window_sec"] is None
    for run in (reference_run, out):     # one clip per whole video, never beside another
        assert "1 per video and epoch; 0 side by side" in log_text(run)
    row, = read_rows(out / "training_results.csv")
    assert float(row["train_loss_bbox"]) > 0                           # 5-field boxes supervise every step


def test_the_tube_mode_decoder_phase_is_shorter_unless_asked():
    def parse(extra, tube):
        return resolved("--pretrained", "none", "--mode", "tube" if tube else "clip", *extra).decoder_steps
    assert parse(["--epochs", "30"], tube=True) == recipes.TUBE_DECODER_STEPS == 600
    assert parse(["--epochs", "30"], tube=False) == 2000
    assert parse(["--epochs", "1"], tube=True) == recipes.DECODER_STEPS_PER_EPOCH      # short runs stay short
    assert parse(["--epochs", "30", "--decoder_steps", "2000"], tube=True) == 2000
