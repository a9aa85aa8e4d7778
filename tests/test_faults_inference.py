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


# --------------------------------------------------------------------------- 2. impossible ONNX metadata


def tiny_onnx(path, frames: int = 4, size: int = 64, queries: int = 3, classes: int = 2, **meta_changes):
    """A hand-made STAR-shaped ONNX graph (no trunk): ``clips (B, frames, 3, size, size)`` -> per-frame means ->
    ``pred_logits (B, queries, classes + 1)`` and sigmoid ``pred_boxes (B, queries, 4)``, with export.py's metadata
    for TINY_PREP (4 frames, 64 px) changed by ``meta_changes``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w_logits = numpy_helper.from_array(rng.normal(size=(frames, queries * (classes + 1))).astype(np.float32), "wl")
    w_boxes = numpy_helper.from_array(rng.normal(size=(frames, queries * 4)).astype(np.float32), "wb")
    shape_l = numpy_helper.from_array(np.array([0, queries, classes + 1], np.int64), "sl")
    shape_b = numpy_helper.from_array(np.array([0, queries, 4], np.int64), "sb")
    nodes = [helper.make_node("ReduceMean", ["clips"], ["m"], axes=[2, 3, 4], keepdims=0),
             helper.make_node("MatMul", ["m", "wl"], ["l"]), helper.make_node("Reshape", ["l", "sl"], ["pred_logits"]),
             helper.make_node("MatMul", ["m", "wb"], ["b"]), helper.make_node("Sigmoid", ["b"], ["bs"]),
             helper.make_node("Reshape", ["bs", "sb"], ["pred_boxes"])]
    graph = helper.make_graph(
        nodes, "tiny_star",
        [helper.make_tensor_value_info("clips", TensorProto.FLOAT, ["batch", frames, 3, size, size])],
        [helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, ["batch", queries, classes + 1]),
         helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, ["batch", queries, 4])],
        initializer=[w_logits, w_boxes, shape_l, shape_b])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    info = {**TINY_PREP, "class_names": ["fight", "collapse"],
            "model_args": star_model.model_args_from(2, num_queries=queries), **meta_changes}
    export.set_metadata(proto, export.metadata(info, "fp32", "tiny.pth"))
    onnx.save(proto, str(path))
    return path


@needs_onnx
def test_a_consistent_hand_made_onnx_graph_loads_and_runs(tmp_path):
    net, info = backend.load_model(tiny_onnx(tmp_path / "ok.onnx"))
    out = net(torch.zeros(2, 4, 3, 64, 64))
    assert info["img_size"] == 64 and out["pred_logits"].shape == (2, 3, 3) and out["pred_boxes"].shape == (2, 3, 4)


@needs_onnx
@pytest.mark.parametrize("graph, changes, expected", [
    ({}, {"img_size": 0}, "img_size 0 (must be a whole number >= 1)"),
    ({}, {"num_frames": -3}, "num_frames -3"),
    ({}, {"std": [0.2, 0.0, 0.2]}, "std [0.2, 0.0, 0.2]"),
    ({}, {"class_names": ["only_one"]}, "class_names ['only_one'] (must be 2 names)"),
    ({"frames": 8}, {}, "the graph takes clips of shape (B, 8, 3, 64, 64) but its metadata says (B, 4, 3, 64, 64)"),
    ({"size": 32}, {}, "the graph takes clips of shape (B, 4, 3, 32, 32)"),
    ({"classes": 4}, {}, "the graph gives 5 class logits but its metadata names 2 classes"),
])
def test_impossible_onnx_metadata_is_refused_at_load_with_what_is_wrong(tmp_path, graph, changes, expected):
    path = tiny_onnx(tmp_path / "bad.onnx", **graph, **changes)
    with pytest.raises(star_model.CheckpointError) as err:
        backend.load_model(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path)) and expected in str(err.value)


@needs_onnx
def test_test_py_refuses_an_onnx_graph_that_disagrees_with_its_metadata(tmp_path):
    inputs = videos(tmp_path / "in", count=1)
    rc, text = run_test_py("--input_dir", inputs, "--output_file", tmp_path / "out" / "p.csv", "--model_path",
                           tiny_onnx(tmp_path / "bad.onnx", frames=8), "--no_annotate", "--workers", 0)
    lines = error_lines(text)
    assert rc == 2 and len(lines) == 1 and "bad.onnx: the graph takes clips of shape (B, 8" in lines[0], text
    assert not (tmp_path / "out" / "p.csv").exists()
