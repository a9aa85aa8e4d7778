"""Faults and bad input for test.py, export.py, stream.py and the ONNX backend: unwritable output folders, impossible
ONNX metadata, exit status when nothing was predicted, ``--resume`` after a kill, progress and summary.

A tiny STAR (4 frames, 64x64) and 12-frame videos keep it fast on a CPU; the ONNX files are hand-made graphs of a few
nodes (no trunk), so no export runs here. We run as root, where a read-only folder is writable: an output under a
regular file (a file used as a folder) is what cannot be written."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import annotated_videos
import backend
import export
import inference
import predictions_io
import stream
from checkpoint import CheckpointError, model_args_from
from conftest import ROOT, TINY_PREP, free_port, refuse_load, tiny_checkpoint, write_video
from model_description import ModelDescription

import test as test_cli  # noqa: E402  (the repository's test.py: conftest puts the root first on the path)

assert test_cli.__file__ == str(ROOT / "test.py"), test_cli.__file__

HAVE_ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx/onnxruntime not installed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny project checkpoint whose 12 queries all say class 1 (collapse) with probability ~1."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", confident=True)


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
    desc = ModelDescription.from_info({**TINY_PREP, "class_names": ["fight", "collapse"], "source": "project",
                                       "model_args": model_args_from(2, num_queries=queries), **meta_changes})
    export.set_metadata(proto, export.metadata(desc, "fp32", "tiny.pth"))
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
    with pytest.raises(CheckpointError) as err:
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


# --------------------------------------------------------------------------- 4. exit status when nothing is predicted


def broken_video(folder, name="broken.mp4"):
    (folder / name).write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 4)
    return folder / name


def test_every_input_failing_is_a_failure_with_the_reason_in_one_line(tmp_path, checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    broken_video(inputs, "a.mp4")
    broken_video(inputs, "b.mp4")
    rc, text = run_test_py("--input_dir", inputs, "--output_file", tmp_path / "out" / "p.csv", "--model_path",
                           checkpoint, "--workers", 0)
    lines = error_lines(text)
    assert rc == 1 and len(lines) == 1, text
    assert lines[0].startswith("error: none of the 2 video(s) could be predicted (first: a.mp4: "), lines


def test_a_model_that_cannot_run_on_any_clip_is_a_failure(tmp_path, checkpoint, monkeypatch):
    def cannot_run(*_args, **_kwargs):
        raise RuntimeError("the graph rejects this input: shape (1, 4, 3, 64, 64)")
    monkeypatch.setattr(inference, "predict_clips", cannot_run)
    rc, text = run_test_py("--input_dir", videos(tmp_path / "in", count=2), "--output_file",
                           tmp_path / "out" / "p.csv", "--model_path", checkpoint, "--workers", 0, "--no_annotate")
    lines = error_lines(text)
    assert rc == 1 and len(lines) == 1 and "none of the 2 video(s) could be predicted" in lines[0], text
    assert "the graph rejects this input" in lines[0]


def test_some_failed_and_some_predicted_exits_0_with_a_summary(tmp_path, checkpoint):
    inputs = videos(tmp_path / "in", count=1)
    broken_video(inputs)
    rc, text = run_test_py("--input_dir", inputs, "--output_file", tmp_path / "out" / "p.csv", "--model_path",
                           checkpoint, "--workers", 0, "--no_annotate")
    assert rc == 0 and not error_lines(text), text
    assert "videos      : 2 (1 predicted, 1 failed)" in text and "    broken.mp4: " in text
    assert "per video   : " in text


# --------------------------------------------------------------------------- 7. --resume after a kill


def outputs(out) -> dict:
    """What a run leaves that must not depend on a kill: both CSVs' text, the annotated videos' names, and any
    journal or half-written annotated video left behind."""
    folder = out.parent
    return {"predictions": out.read_text(), "frames": predictions_io.frames_csv_path(out).read_text(),
            "annotated": sorted(p.name for p in (folder / "annotated_videos").iterdir()),
            "journals": predictions_io.journal_paths(out)}


def read_lines(path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_resume_after_a_kill_skips_complete_videos_and_ends_as_an_uninterrupted_run(tmp_path, checkpoint,
                                                                                    monkeypatch):
    inputs = videos(tmp_path / "in", count=3)
    common = ["--input_dir", inputs, "--model_path", checkpoint, "--workers", 0, "--precision", "fp32"]
    whole = tmp_path / "whole" / "p.csv"
    assert run_test_py(*common, "--output_file", whole)[0] == 0
    expected = outputs(whole)
    assert expected["journals"] == [] and len(expected["annotated"]) == 3 and expected["frames"].count("\n") > 3

    # What a kill after the first video leaves: its journal line, a torn second line, v0's annotated video and v1's
    # half-written one; no CSV yet.
    out = tmp_path / "killed" / "p.csv"
    with monkeypatch.context() as m:
        m.setattr(test_cli, "write_outputs", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert run_test_py(*common, "--output_file", out)[0] == 130
    journal = predictions_io.journal_path(out, 0)
    header, first, second = read_lines(journal)[:3]
    journal.write_text(header + first + second[:len(second) // 2])
    annotated = out.parent / "annotated_videos"
    (annotated / "v1.mp4").rename(annotated / f".v1.4242{annotated_videos.PARTIAL_SUFFIX}")
    (annotated / "v2.mp4").unlink()

    predicted = []
    real_run_videos = inference.run_videos
    monkeypatch.setattr(inference, "run_videos", lambda model, info, paths, names, *a, **k: (
        predicted.extend(names), real_run_videos(model, info, paths, names, *a, **k))[1])
    rc, text = run_test_py(*common, "--output_file", out, "--resume")
    assert rc == 0 and predicted == ["v1.mp4", "v2.mp4"], text
    assert "--resume: 1 of 3 video(s) already complete" in text and "1 complete before (--resume), 2 predicted" in text
    assert outputs(out) == expected

    predicted.clear()   # a finished run resumed: nothing left to do, the same files
    rc, text = run_test_py(*common, "--output_file", out, "--resume")
    assert rc == 0 and predicted == [] and outputs(out) == expected, text


def test_resume_refuses_a_journal_written_with_other_settings(tmp_path, checkpoint):
    inputs = videos(tmp_path / "in", count=1)
    out = tmp_path / "out" / "p.csv"
    journal = predictions_io.journal_path(out, 0)
    journal.parent.mkdir()
    journal.write_text(json.dumps({"star_journal": 1, "settings": {"score_threshold": 0.9}}) + "\n")
    rc, text = run_test_py("--input_dir", inputs, "--output_file", out, "--model_path", checkpoint, "--resume",
                           "--no_annotate")
    lines = error_lines(text)
    assert rc == 2 and len(lines) == 1 and f"--resume: {journal} was written with" in lines[0], text


def test_resume_under_torchrun_splits_the_rest_between_ranks_and_merges_as_one_run(tmp_path, checkpoint, monkeypatch):
    """A one-process run killed after its first video, resumed by two processes under torchrun (CPU, gloo): each rank
    predicts one of the two videos left, rank 0 merges them with the first one's rows: the same files as one run."""
    inputs = videos(tmp_path / "in", count=3)
    common = ["--input_dir", inputs, "--model_path", checkpoint, "--workers", 0, "--precision", "fp32"]
    whole = tmp_path / "whole" / "p.csv"
    assert run_test_py(*common, "--output_file", whole)[0] == 0
    out = tmp_path / "killed" / "p.csv"
    with monkeypatch.context() as m:
        m.setattr(test_cli, "write_outputs", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert run_test_py(*common, "--output_file", out)[0] == 130
    journal = predictions_io.journal_path(out, 0)
    journal.write_text("".join(read_lines(journal)[:2]))   # header and v0
    for name in ("v1.mp4", "v2.mp4"):
        (out.parent / "annotated_videos" / name).unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(ROOT / "test.py"), *map(str, common), "--output_file", str(out),
                           "--resume", "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 complete before (--resume), 2 predicted" in proc.stdout + proc.stderr
    assert outputs(out) == outputs(whole)


# --------------------------------------------------------------------------- 8. progress and summary


def test_progress_lines_with_eta_reach_the_log_and_the_summary_lists_failures(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(inference, "PROGRESS_LOG_SEC", 0.0)   # a line after every video
    inputs = videos(tmp_path / "in", count=2)
    broken_video(inputs)
    out = tmp_path / "out" / "p.csv"
    rc, _ = run_test_py("--input_dir", inputs, "--output_file", out, "--model_path", checkpoint, "--workers", 0,
                        "--no_annotate")
    log_text = next(out.parent.glob("test_log_*.txt")).read_text()
    assert rc == 0
    progress = [line.split("progress: ", 1)[1] for line in log_text.splitlines() if "progress: " in line]
    assert [p.split(" videos")[0] for p in progress] == ["1/3", "2/3", "3/3"], progress
    assert progress[0].startswith("1/3 videos (1 failed), ") and " s/video, about " in progress[0], progress
    assert progress[-1].endswith("about 00:00 left"), progress
    assert "videos      : 3 (2 predicted, 1 failed)" in log_text and "    broken.mp4: " in log_text
