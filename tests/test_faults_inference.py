"""Faults and bad input for test.py, export.py, stream.py and the ONNX backend: unwritable output folders, impossible
ONNX metadata, exit status when nothing was predicted, ``--resume`` after a kill, progress and summary.

A tiny STAR (4 frames, 64x64) and 12-frame videos keep it fast on a CPU; the ONNX files are hand-made graphs of a few
nodes (no trunk), so no export runs here. We run as root, where a read-only folder is writable: an output under a
regular file (a file used as a folder) is what cannot be written."""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json

import numpy as np
import pytest
import torch

import backend
import export
import inference
import model as star_model
import stream
from conftest import ROOT, write_video

import test as test_cli  # noqa: E402  (the repository's test.py: conftest puts the root first on the path)

assert test_cli.__file__ == str(ROOT / "test.py"), test_cli.__file__

HAVE_ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx/onnxruntime not installed")
TINY_PREP = {"num_frames": 4, "img_size": 64, "mean": list(star_model.IMAGENET_MEAN),
             "std": list(star_model.IMAGENET_STD)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny project checkpoint whose 12 queries all say class 1 (collapse) with probability ~1."""
    torch.manual_seed(0)
    net = star_model.STAR(2).eval()
    with torch.no_grad():
        bias = net.head.class_head[3].bias
        bias.zero_()
        bias[1] = 20.0
    ck = star_model.make_checkpoint(net, star_model.model_args_from(2), ["fight", "collapse"], TINY_PREP,
                                    raw_class_ids=[0, 1])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    star_model.save_checkpoint(ck, path)
    return path


def videos(folder, count: int = 3, frames: int = 12):
    """``count`` short videos of noise with a bright square moving right, named v0.mp4 ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(count):
        clip = np.repeat(rng.integers(0, 255, (1, 48, 64, 3), dtype=np.uint8), frames, axis=0)
        for i in range(frames):
            clip[i, 10:22, 3 * i:3 * i + 12] = 255
        write_video(folder / f"v{k}.mp4", clip, fps=12)
    return folder


def a_file(tmp_path):
    """A regular file, to be used as a parent folder (which no one, root included, can write into)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


def run_test_py(*argv) -> tuple[int, str]:
    """test.py's CLI with its console output (stdout and stderr together)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = test_cli.cli([str(a) for a in argv])
    return rc, buf.getvalue()


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


class LoadCalled(Exception):
    """Raised by a stand-in model loader: the CLI went on to load the model."""


def refuse_load(*_args, **_kwargs):
    raise LoadCalled("the model was loaded")


# --------------------------------------------------------------------------- 1. unwritable output folders


def test_test_py_refuses_an_unwritable_annotated_folder_before_any_work(tmp_path, checkpoint, monkeypatch):
    inputs = videos(tmp_path / "in", count=1)
    monkeypatch.setattr(inference, "load_model", refuse_load)
    blocked = a_file(tmp_path) / "annotated"
    rc, text = run_test_py("--input_dir", inputs, "--output_file", tmp_path / "out" / "p.csv", "--model_path",
                           checkpoint, "--annotated_dir", blocked)
    assert rc == 2 and len(error_lines(text)) == 1 and str(blocked) in error_lines(text)[0], text
    rc, text = run_test_py("--input_dir", inputs, "--output_file", a_file(tmp_path) / "p.csv", "--model_path",
                           checkpoint)
    assert rc == 2 and len(error_lines(text)) == 1 and "--output_file" in error_lines(text)[0], text


def test_export_refuses_unwritable_outputs_before_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "load_network", refuse_load)
    monkeypatch.setattr(export, "require_deploy_packages", lambda: None)
    blocked = a_file(tmp_path)
    for extra in (["--output", blocked / "star.onnx"],
                  ["--output", tmp_path / "ok" / "star.onnx", "--int8", "--int8_output", blocked / "q.onnx"]):
        rc = export.cli(["--model_path", str(tmp_path / "m.pth"), *map(str, extra)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and str(blocked) in err, err


@pytest.mark.parametrize("flag", ["--output", "--events", "--stats_json"])
def test_stream_refuses_unwritable_outputs_before_loading_the_model(tmp_path, monkeypatch, capsys, flag):
    source = videos(tmp_path / "in", count=1) / "v0.mp4"
    monkeypatch.setattr(inference, "load_model", refuse_load)
    blocked = a_file(tmp_path) / "out.x"
    rc = stream.cli(["--source", str(source), flag, str(blocked)])
    captured = capsys.readouterr()
    lines = error_lines(captured.out + captured.err)
    assert rc == 2 and len(lines) == 1 and flag in lines[0] and str(blocked.parent) in lines[0], lines
