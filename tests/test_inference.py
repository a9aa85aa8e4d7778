"""Inference (inference.py and its CLI test.py): CSV schema, failures, annotated videos, windows, evaluation,
published checkpoints, precision. A tiny-input STAR (4 frames, 64x64) keeps it fast on a CPU."""
from __future__ import annotations

import csv
import json

import av
import numpy as np
import pytest
import torch

import checkpoint
import clip_loader
import detections
import model as star_model
import postprocess
import predictions_io
import runtime
import scoring
import video
from conftest import ROOT, write_video

# test.py shares its name with the standard library's `test` package; the repository root is first on the
# path (conftest), so `import test` is ours: checked here so that a stdlib import can never pass silently.
import test as test_cli  # noqa: E402

assert test_cli.__file__ == str(ROOT / "test.py"), test_cli.__file__

FIELDS = ["video_name", "pred_class", "score", "x1", "y1", "x2", "y2", "start_sec", "end_sec"]   # DESIGN.md's schema
TINY_PREP = {"num_frames": 4, "img_size": 64, "mean": list(video.IMAGENET_MEAN),
             "std": list(video.IMAGENET_STD)}


def _tiny_model(confident_class: int | None = None) -> star_model.STAR:
    torch.manual_seed(0)
    net = star_model.STAR(2)
    if confident_class is not None:   # every query says this class with probability ~1
        with torch.no_grad():
            bias = net.head.class_head[3].bias
            bias.zero_()
            bias[confident_class] = 20.0
    return net.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Project checkpoints with tiny preprocessing: 'random' (scores ~0.3-0.5) and 'confident'
    (all queries class 1 = collapse with score ~1)."""
    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for key, cls in (("random", None), ("confident", 1)):
        ck = checkpoint.make_checkpoint(_tiny_model(cls), checkpoint.model_args_from(2), ["fight", "collapse"],
                                        TINY_PREP, raw_class_ids=[0, 1])
        out[key] = folder / f"{key}.pth"
        checkpoint.save_checkpoint(ck, out[key])
    return out


def _frames(n, w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    frames = np.repeat(base[None], n, axis=0)
    for i in range(n):   # a bright square moving right
        x = (i * 2) % (w - 12)
        frames[i, 10:22, x:x + 12] = 255
    return frames


def _run(tmp_path, inputs, ckpt, *extra):
    out = tmp_path / "out" / "predictions.csv"
    argv = ["--input_dir", str(inputs), "--output_file", str(out), "--model_path", str(ckpt), *extra]
    rc = test_cli.cli(argv)
    rows = list(csv.DictReader(out.open())) if out.exists() else None
    return rc, out, rows


def _read_header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f))


# --------------------------------------------------------------------------- CSV


def test_the_one_writer_uses_the_designs_schema():
    """main.py's test_predictions.csv and test.py's predictions.csv share predictions_io.CSV_FIELDS."""
    assert list(predictions_io.CSV_FIELDS) == FIELDS


def test_csv_schema_rows_and_order(tmp_path, checkpoints):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "b.mp4", _frames(12), fps=12)
    write_video(inputs / "A.AVI", _frames(10, seed=1), fps=10, codec="mjpeg")
    (inputs / "notes.txt").write_text("not a video")
    rc, out, rows = _run(tmp_path, inputs, checkpoints["random"], "--score_threshold", "0", "--no_annotate",
                         "--workers", "0")
    assert rc == 0
    assert _read_header(out) == FIELDS
    names = [r["video_name"] for r in rows]
    assert names == ["A.AVI"] * 12 + ["b.mp4"] * 12        # sorted; one row per query at threshold 0
    for r in rows:
        assert r["pred_class"] in ("fight", "collapse")
        x1, y1, x2, y2 = (float(r[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1
        assert 0 <= float(r["score"]) <= 1
        assert float(r["start_sec"]) == 0.0
    assert {r["end_sec"] for r in rows if r["video_name"] == "b.mp4"} == {"1.000"}
    logs = list(out.parent.glob("test_log_*.txt"))
    assert len(logs) == 1 and "summary" in logs[0].read_text()


def test_no_detection_gives_one_no_object_row(tmp_path, checkpoints):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "a.mp4", _frames(8), fps=8)
    write_video(inputs / "b.mkv", _frames(8, seed=2), fps=8)
    rc, _, rows = _run(tmp_path, inputs, checkpoints["random"], "--score_threshold", "0.99", "--no_annotate",
                       "--workers", "0")
    assert rc == 0
    assert [(r["video_name"], r["pred_class"]) for r in rows] == [("a.mp4", "no_object"), ("b.mkv", "no_object")]
    for r in rows:
        assert r["x1"] == r["y1"] == r["x2"] == r["y2"] == ""
        assert float(r["score"]) < 0.99


def test_threshold_rule_matches_softmax_over_all_logits(checkpoints):
    net, info = checkpoint.load_checkpoint(checkpoints["random"])
    x = torch.randn(1, 4, 3, 64, 64)
    with torch.inference_mode():
        out = net(x)
    pred = postprocess.outputs_to_predictions(out)[0]
    probs = out["pred_logits"][0].softmax(-1)[:, :-1].max(-1).values
    threshold = float(probs.median())
    dets = detections.detections_from_prediction(pred, info["class_names"], threshold, 0.0, 1.0)
    assert len(dets) == int((probs >= threshold).sum())
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)


# --------------------------------------------------------------------------- failures


def test_bad_files_are_named_and_good_ones_predicted(tmp_path, checkpoints):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "good1.mp4", _frames(8), fps=8)
    write_video(inputs / "good2.mov", _frames(9, seed=3), fps=9)
    (inputs / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    (inputs / "empty.avi").write_bytes(b"")
    rc, out, rows = _run(tmp_path, inputs, checkpoints["confident"], "--no_annotate", "--workers", "2",
                         "--batch_size", "2")
    assert rc == 0
    assert sorted({r["video_name"] for r in rows}) == ["good1.mp4", "good2.mov"]
    assert all(r["pred_class"] == "collapse" for r in rows)
    log_text = next(out.parent.glob("test_log_*.txt")).read_text()
    assert "corrupt.mp4" in log_text and "empty.avi" in log_text
    assert "2 failed" in log_text


def test_bad_model_and_input_paths_exit_2_with_one_line(tmp_path, checkpoints, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "a.mp4", _frames(4), fps=4)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for ckpt in (tmp_path / "missing.pth", garbage):
        rc, _, rows = _run(tmp_path, inputs, ckpt, "--no_annotate")
        err = capsys.readouterr()
        assert rc == 2 and rows is None
        text = err.out + err.err
        assert "Traceback" not in text and str(ckpt) in text
    rc, _, _ = _run(tmp_path, tmp_path / "nowhere", checkpoints["random"])
    err = capsys.readouterr()
    assert rc == 2 and "nowhere" in err.out + err.err and "Traceback" not in err.out + err.err


# --------------------------------------------------------------------------- annotation


def test_annotated_video_keeps_frames_size_and_rate(tmp_path, checkpoints):
    inputs = tmp_path / "in"
    inputs.mkdir()
    frames = _frames(17, w=66, h=50)
    write_video(inputs / "clip.avi", frames, fps=12, codec="mjpeg")
    rc, out, rows = _run(tmp_path, inputs, checkpoints["confident"], "--workers", "0")
    assert rc == 0 and rows[0]["pred_class"] == "collapse"
    annotated = out.parent / "annotated_videos" / "clip.mp4"
    with av.open(str(annotated)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(12, rel=1e-3)
    assert len(decoded) == 17
    assert decoded[0].shape == (50, 66, 3)
    assert np.abs(decoded[5].astype(int) - frames[5]).max() > 100   # a box was drawn


def test_annotated_names_do_not_collide():
    paths = clip_loader.annotated_paths(["a.mp4", "a.avi", "b.MKV", "sub/a.mp4"], "/x")
    assert [p.as_posix() for p in paths] == ["/x/a_mp4.mp4", "/x/a_avi.mp4", "/x/b.mp4", "/x/sub/a.mp4"]


def test_list_videos_any_case_sorted_hidden_skipped(tmp_path):
    for name in ("b.MP4", "a.mov", "c.Mkv", "d.avi", ".hidden.mp4", "e.txt", "sub/f.mp4"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    flat = [p.name for p in clip_loader.list_videos(tmp_path)]
    assert flat == ["a.mov", "b.MP4", "c.Mkv", "d.avi"]
    deep = clip_loader.video_names(clip_loader.list_videos(tmp_path, recursive=True), tmp_path)
    assert deep == ["a.mov", "b.MP4", "c.Mkv", "d.avi", "sub/f.mp4"]
    one = tmp_path / "a.mov"
    assert clip_loader.list_videos(one) == [one]
    with pytest.raises(runtime.UsageError):
        clip_loader.list_videos(tmp_path / "absent")


# --------------------------------------------------------------------------- windows


def _det(cls, score, box, start, end):
    return detections.Detection(cls, ["fight", "collapse"][cls], score, tuple(box), start, end)


def test_join_windows_hand_made():
    box_a = (0.10, 0.10, 0.40, 0.40)
    box_a2 = (0.12, 0.10, 0.42, 0.40)        # IoU with box_a ~0.88
    box_far = (0.60, 0.60, 0.90, 0.90)
    dets = [
        _det(0, 0.6, box_a, 0.0, 2.0),
        _det(0, 0.9, box_a2, 1.0, 3.0),      # overlapping window, same class, overlapping box: joins
        _det(0, 0.7, box_a2, 3.0, 5.0),      # consecutive window (touching): joins
        _det(0, 0.8, box_far, 1.0, 3.0),     # same class, box elsewhere: its own span
        _det(1, 0.5, box_a, 1.0, 3.0),       # other class: its own span
        _det(0, 0.4, box_a, 7.0, 9.0),       # same box but after a gap: its own span
    ]
    joined = detections.join_windows(dets, iou_threshold=0.3)
    assert len(joined) == 4
    first = joined[0]
    assert (first.class_id, first.start_sec, first.end_sec, first.score) == (0, 0.0, 5.0, 0.9)
    np.testing.assert_allclose(first.box, np.mean([box_a, box_a2, box_a2], axis=0))
    spans = sorted((d.class_id, d.start_sec, d.end_sec, d.score) for d in joined[1:])
    assert spans == [(0, 1.0, 3.0, 0.8), (0, 7.0, 9.0, 0.4), (1, 1.0, 3.0, 0.5)]
    # Two detections of one window never join each other; a gap is bridged only when allowed.
    same_window = detections.join_windows([_det(0, 0.9, box_a, 0, 2), _det(0, 0.8, box_a, 0, 2)])
    assert len(same_window) == 2
    bridged = detections.join_windows([_det(0, 0.9, box_a, 0, 2), _det(0, 0.8, box_a, 3, 5)], max_gap_sec=1.0)
    assert [(d.start_sec, d.end_sec) for d in bridged] == [(0, 5)]
    assert detections.join_windows([]) == []


def test_window_mode_spans(tmp_path, checkpoints):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "long.mp4", _frames(40), fps=10)          # 4 s
    rc, out, rows = _run(tmp_path, inputs, checkpoints["confident"], "--window_sec", "2", "--stride_sec", "1",
                         "--workers", "1")
    assert rc == 0 and rows
    for r in rows:
        assert 0.0 <= float(r["start_sec"]) < float(r["end_sec"]) <= 4.0 + 1e-6
        assert r["pred_class"] == "collapse"
    assert max(float(r["end_sec"]) - float(r["start_sec"]) for r in rows) > 2.0   # windows were joined
    with av.open(str(out.parent / "annotated_videos" / "long.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 40


# --------------------------------------------------------------------------- evaluation


def test_evaluation_on_hand_made_case(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_video(data / "pos.mp4", _frames(6, w=100, h=50), fps=6)
    write_video(data / "neg.mp4", _frames(6, w=100, h=50, seed=4), fps=6)
    (data / "pos.txt").write_text("7 10 5 50 25\n")                 # raw class 7 -> model class 1
    (data / "action_challenge.csv").write_text("video_file,label_file\npos.mp4,pos.txt\nneg.mp4,\n")
    info = None

    def result(name, score, label, box):
        q = {"scores": torch.tensor([score, 0.1]), "labels": torch.tensor([label, 0]),
             "boxes": torch.tensor([box, [0.0, 0.0, 0.1, 0.1]])}
        return detections.VideoResult(0, name, str(data / name), info, [], [q], score)

    results = [result("pos.mp4", 0.9, 1, [0.1, 0.1, 0.5, 0.5]),   # exact GT box (10/100, 5/50, ...)
               result("neg.mp4", 0.2, 0, [0.2, 0.2, 0.3, 0.3])]    # below threshold: no_object
    out = tmp_path / "predictions.csv"
    figures = scoring.evaluate_predictions(results, data, ["fight", "collapse"], [3, 7], 0.5, out)
    assert figures["video_acc"] == 1.0 and figures["det_acc_50"] == 1.0
    assert figures["mean_iou"] == pytest.approx(1.0, abs=1e-5)
    assert figures["ap50"]["collapse"] == pytest.approx(1.0) and figures["ap50"]["fight"] is None
    saved = json.loads((tmp_path / "predictions_metrics.json").read_text())
    assert saved["video_acc"] == 1.0
    assert "video accuracy" in (tmp_path / "predictions_metrics.txt").read_text()


# --------------------------------------------------------------------------- checkpoints and precision


def test_published_raw_state_dict_runs(tmp_path):
    raw = tmp_path / "best_model.pth"
    torch.save(_tiny_model(0).state_dict(), raw)
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "one.mp4", _frames(16, w=32, h=32), fps=8)
    rc, out, rows = _run(tmp_path, inputs, raw, "--class_names", "fight", "collapse", "--no_annotate",
                         "--workers", "0")
    assert rc == 0
    assert {r["pred_class"] for r in rows} == {"fight"} and len(rows) == 12
    assert "raw_state_dict" in next(out.parent.glob("test_log_*.txt")).read_text()


def test_device_and_precision_settings():
    cpu = torch.device("cpu")
    assert runtime.resolve_device("cpu") == cpu
    assert runtime.autocast_settings(cpu, "fp32")[0] is None
    dtype, _ = runtime.autocast_settings(cpu, "auto")
    assert dtype == (torch.bfloat16 if runtime.cpu_has_native_bf16() else None)
    assert runtime.autocast_settings(cpu, "bf16")[0] == torch.bfloat16
    assert runtime.autocast_settings(torch.device("cuda"), "auto")[0] == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(runtime.UsageError):
            runtime.resolve_device("cuda")


def test_bf16_agrees_with_fp32(tmp_path):
    """Same classes, boxes within 0.02, on generated clips (a trained-like confident head and random)."""
    from video import preprocess, sample_clip
    path = write_video(tmp_path / "a.mp4", _frames(12), fps=12)
    frames, _ = sample_clip(path, 4)
    x = preprocess(frames, 64)[None]
    cpu = torch.device("cpu")
    for net in (_tiny_model(1), _tiny_model(None)):
        with torch.inference_mode():
            ref = postprocess.outputs_to_predictions(net(x))[0]
            with runtime.autocast(cpu, torch.bfloat16):
                low = postprocess.outputs_to_predictions(net(x))[0]
        decided = (ref["scores"] - 0.5).abs() > 0.05   # classes compared where the decision is not a tie
        assert torch.equal(ref["labels"][decided], low["labels"][decided])
        assert (ref["boxes"] - low["boxes"]).abs().max() <= 0.02


# --------------------------------------------------------------------------- per-frame labels and windows


def test_per_frame_labels_are_scored_as_tubes_by_hand(tmp_path):
    """One actor (raw class 7 -> collapse) at frames 2-5 of 8 in (10, 5)-(50, 25) of a 100x50 video at 4 fps. Two clips
    of 1 s (frames 0-3, 4-7) predicting that box: every frame of both clips carries it; with one score the frames rank
    in order, so frames 0-1 (no actor) come first, then the four hits: precision 4/6 at full recall, frame AP 0.667
    (frames 6-7 come after the last hit); a joined detection (a tube of predictions.csv) over frames 1-6 against 2-5
    (temporal IoU 4/6): a hit at 0.2 and 0.5."""
    data = tmp_path / "data"
    data.mkdir()
    write_video(data / "pos.mp4", _frames(8, w=100, h=50), fps=4)
    (data / "pos.txt").write_text("".join(f"{f} 1 7 10 5 50 25\n" for f in range(2, 6)))
    (data / "action_challenge.csv").write_text("video_file,label_file\npos.mp4,pos.txt\n")
    q = {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]])}
    info = video.probe_video(data / "pos.mp4")
    joined = [detections.Detection(1, "collapse", 0.9, (0.1, 0.1, 0.5, 0.5), 0.25, 1.75)]    # windows, joined
    res = detections.VideoResult(0, "pos.mp4", str(data / "pos.mp4"), info, joined, [q, q], 0.9,
                                 spans=[(0.0, 1.0), (1.0, 2.0)])
    figures = scoring.evaluate_predictions([res], data, ["fight", "collapse"], [3, 7], 0.5, tmp_path / "p.csv")
    assert figures["frame_map50"] == pytest.approx(4 / 6)
    assert figures["video_map20"] == figures["video_map50"] == 1.0
    assert "frame-mAP@0.5  : 0.6667" in (tmp_path / "p_metrics.txt").read_text()


def test_a_checkpoint_trained_on_windows_is_cut_so_by_default(tmp_path):
    ck = checkpoint.make_checkpoint(_tiny_model(1), checkpoint.model_args_from(2), ["fight", "collapse"],
                                    {**TINY_PREP, "window_sec": 1.0}, raw_class_ids=[0, 1])
    path = tmp_path / "windowed.pth"
    checkpoint.save_checkpoint(ck, path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "long.mp4", _frames(24, w=32, h=32), fps=8)      # 3 s: three 1-s windows
    rc, out, rows = _run(tmp_path, inputs, path, "--no_annotate", "--workers", "0")
    assert rc == 0
    assert {(r["start_sec"], r["end_sec"]) for r in rows} == {("0.000", "3.000")}   # the windows joined into one span
    log = next(out.parent.glob("test_log_*.txt")).read_text()
    assert "windows of 1 s every 1 s as the checkpoint was trained" in log
    rc, out, rows = _run(tmp_path / "given", inputs, path, "--no_annotate", "--workers", "0", "--window_sec", "3")
    assert "windows of 3 s every 3 s" in next(out.parent.glob("test_log_*.txt")).read_text()
