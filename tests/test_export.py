"""ONNX export (export.py) and the inference backend (backend.py): parity with PyTorch, metadata,
the published raw state_dict, int8, and one-line failures that leave no file behind.

A STAR with a small decoder and tiny clips (4 frames, 64x64) keeps it fast; the R(2+1)D trunk is full
size (the ONNX file is ~130 MB), so the export runs once per module where it can."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import sys

import numpy as np
import pytest
import torch

import backend
import checkpoint
import export
import model as star_model
from conftest import write_video
from video import IMAGENET_MEAN, IMAGENET_STD

HAVE_DEPLOY = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
needs_deploy = pytest.mark.skipif(not HAVE_DEPLOY, reason="onnx/onnxruntime not installed "
                                  "(pip install -r requirements-deploy.txt)")
PREP = {"num_frames": 4, "img_size": 64, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "window_sec": 0.5}
ARGS = checkpoint.model_args_from(2, num_queries=4, dim_feedforward=128, num_decoder_layers=2, max_positions=64)
NAMES = ["fight", "collapse"]


def _tiny_net() -> star_model.STAR:
    """Random weights, with class 1 clearly ahead so the top class is stable under int8 rounding."""
    torch.manual_seed(0)
    net = star_model.STAR(**ARGS)
    with torch.no_grad():
        bias = net.head.class_head[3].bias
        bias.zero_()
        bias[1] = 5.0
    return net.eval()


def _videos(folder):
    """Two short videos with a bright square moving over noise."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        frames = np.repeat(rng.integers(0, 255, (1, 48, 64, 3), dtype=np.uint8), 12, axis=0)
        for i in range(12):
            frames[i, 10:22, 4 * i:4 * i + 12] = 255
        write_video(folder / f"clip{k}.mp4", frames)
    return folder


def _cli(argv) -> tuple[int, str, str]:
    """export.cli with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = export.cli([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A project checkpoint, the same weights as a raw state_dict, and a folder of 2 videos."""
    folder = tmp_path_factory.mktemp("export_inputs")
    net = _tiny_net()
    ckpt = folder / "best_model.pth"
    checkpoint.save_checkpoint(checkpoint.make_checkpoint(net, ARGS, NAMES, PREP), ckpt)
    raw = folder / "raw_state_dict.pth"
    torch.save(net.state_dict(), raw)
    return {"ckpt": ckpt, "raw": raw, "videos": _videos(folder / "videos")}


@pytest.fixture(scope="module")
def exported(files, tmp_path_factory):
    """One export of the project checkpoint, fp32 and (forced) int8, checked on the real videos' clips."""
    if not HAVE_DEPLOY:
        pytest.skip("onnx/onnxruntime not installed (pip install -r requirements-deploy.txt)")
    out = tmp_path_factory.mktemp("export_out") / "star.onnx"
    rc, stdout, stderr = _cli(["--model_path", files["ckpt"], "--output", out, "--check_videos", files["videos"],
                               "--check_clips", 4, "--int8", "--force_int8", "--calibration_dir", files["videos"],
                               "--calibration_clips", 2])
    return {"rc": rc, "stdout": stdout, "stderr": stderr, "fp32": out, "int8": out.with_name("star.int8.onnx")}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in ("pred_logits", "pred_boxes"))


# --------------------------------------------------------------------------- export


@needs_deploy
def test_export_writes_both_models_and_reports_parity(exported):
    assert exported["rc"] == 0, exported["stderr"]
    report = exported["stdout"]
    assert "checking on 4 clips from" in report
    assert "onnxruntime fp32 vs PyTorch fp32: max |diff| logits" in report and "same top class on 4/4 clips" in report
    assert "onnxruntime int8 vs PyTorch fp32" in report and "speed (best of 3, taking turns)" in report
    assert exported["fp32"].is_file() and exported["int8"].is_file()
    assert sorted(p.name for p in exported["fp32"].parent.iterdir()) == ["star.int8.onnx", "star.onnx"]   # no temp left


@pytest.fixture(scope="module")
def onnx_fp32(exported):
    """The fp32 export loaded once through the backend: ``(net, info)``."""
    return backend.load_model(exported["fp32"])


@needs_deploy
def test_onnx_model_gives_prepared_pytorch_outputs_for_any_batch(onnx_fp32, files):
    onnx_net, _ = onnx_fp32
    torch_net, info = backend.load_model(files["ckpt"])
    assert torch_net.channels_last and not any(isinstance(m, torch.nn.BatchNorm3d) for m in torch_net.modules())
    assert not torch_net.training and info["source"] == "project"
    x = torch.randn(3, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, want = onnx_net(x), torch_net(x)
    assert got["pred_logits"].shape == (3, 4, 3) and got["pred_boxes"].shape == (3, 4, 4)
    assert got["pred_logits"].dtype == torch.float32
    assert _max_diff(got, want) < 1e-4
    assert onnx_net.eval() is onnx_net and onnx_net.to("cpu") is onnx_net


@needs_deploy
def test_metadata_round_trips(exported, onnx_fp32):
    import onnx
    net, info = onnx_fp32
    want = {"class_names": NAMES, "model_args": ARGS, **PREP}
    for key in ("class_names", "num_frames", "img_size", "mean", "std", "model_args", "window_sec"):
        assert info[key] == want[key], key
    assert info["source"] == "onnx" and info["checkpoint"] is None
    assert net.precision == "fp32" and backend.OnnxModel(exported["int8"]).precision == "int8"
    props = {p.key: p.value for p in onnx.load(str(exported["fp32"]), load_external_data=False).metadata_props}
    assert props[backend.FORMAT_KEY] == "1" and props["source_checkpoint"] == '"best_model.pth"'
    _, renamed = backend.load_model(exported["fp32"], class_names=["a", "b"])
    assert renamed["class_names"] == ["a", "b"]
    with pytest.raises(checkpoint.CheckpointError, match="has 2 classes but 3 class names"):
        backend.load_model(exported["fp32"], class_names=["a", "b", "c"])


@needs_deploy
def test_int8_model_runs_with_the_same_top_class(exported, onnx_fp32):
    net, _ = backend.load_model(exported["int8"])
    x = torch.randn(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    got, want = net(x), onnx_fp32[0](x)
    assert got["pred_boxes"].shape == (2, 4, 4) and torch.isfinite(got["pred_logits"]).all()
    for i in range(2):
        assert export.top_class(got["pred_logits"][i].numpy()) == export.top_class(want["pred_logits"][i].numpy())


@needs_deploy
def test_raw_state_dict_exports_with_class_names_and_sizes(files, tmp_path):
    out = tmp_path / "raw.onnx"
    rc, stdout, stderr = _cli(["--model_path", files["raw"], "--output", out, "--class_names", "walk", "run",
                               "--num_frames", 4, "--img_size", 64, "--check_clips", 2])
    assert rc == 0, stderr
    assert "raw_state_dict" in stdout and "2 random clips" in stdout
    net, info = backend.load_model(out)
    assert info["class_names"] == ["walk", "run"] and (info["num_frames"], info["img_size"]) == (4, 64)
    assert info["model_args"] == ARGS and "window_sec" not in info   # the published file stores none
    assert net.input_shape == (4, 3, 64, 64)


@needs_deploy
def test_parity_failure_exits_2_and_leaves_no_file(files, tmp_path, monkeypatch):
    real = export.run_torch

    def drifting(net, clips):   # PyTorch's boxes moved by 0.01: the ONNX file now "differs" by that
        outs, seconds = real(net, clips)
        return [{**o, "pred_boxes": o["pred_boxes"] + 0.01} for o in outs], seconds

    monkeypatch.setattr(export, "run_torch", drifting)
    out = tmp_path / "star.onnx"
    rc, _, stderr = _cli(["--model_path", files["ckpt"], "--output", out, "--check_clips", 1])
    assert rc == export.EXIT_ERROR
    assert stderr.count("\n") == 1 and "not written" in stderr and "1.00e-02" in stderr
    assert list(tmp_path.iterdir()) == []


@needs_deploy
def test_broken_checkpoint_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "best_model.pth"
    bad.write_bytes(b"\x80\x02 not a checkpoint" * 50)
    out_dir = tmp_path / "out"
    rc, stdout, stderr = _cli(["--model_path", bad, "--output", out_dir / "star.onnx"])
    assert rc == export.EXIT_ERROR
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and str(bad) in stderr
    assert "Traceback" not in stdout + stderr
    assert list(out_dir.iterdir()) == []


@needs_deploy
def test_too_many_tokens_is_one_line_before_any_work(files, tmp_path):
    rc, _, stderr = _cli(["--model_path", files["ckpt"], "--output", tmp_path / "x.onnx", "--img_size", 256])
    assert rc == export.EXIT_ERROR and stderr.count("\n") == 1
    assert "256 tokens, more than its position table holds (64)" in stderr


def test_output_must_be_onnx(tmp_path):
    rc, _, stderr = _cli(["--model_path", tmp_path / "m.pth", "--output", tmp_path / "star.bin"])
    assert rc == export.EXIT_ERROR and "must end in .onnx" in stderr


def test_token_count_matches_the_trunk():
    # (t, h, w) grids read with model.token_grid from the R(2+1)D-18 trunk itself
    grids = {(4, 64): (1, 4, 4), (16, 224): (2, 14, 14), (8, 112): (1, 7, 7), (5, 50): (1, 4, 4), (3, 33): (1, 3, 3)}
    for (frames, size), grid in grids.items():
        assert export.token_count(frames, size) == int(np.prod(grid))


def test_int8_is_kept_only_when_it_agrees_and_pays(tmp_path):
    agree = {"top_same": 4, "clips": 4}
    assert export.keep_int8(agree, 1.0, 0.5, False, tmp_path / "q.onnx")
    assert not export.keep_int8(agree, 1.0, 1.2, False, tmp_path / "q.onnx")
    assert export.keep_int8(agree, 1.0, 1.2, True, tmp_path / "q.onnx")
    with pytest.raises(export.ExportError, match="another top class than PyTorch on 1 of 4"):
        export.keep_int8({"top_same": 3, "clips": 4}, 1.0, 0.5, True, tmp_path / "q.onnx")


def test_temp_file_is_removed_on_error(tmp_path):
    with pytest.raises(RuntimeError), export.temp_beside(tmp_path / "star.onnx") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("export died")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- backend failures


def test_missing_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # `import onnxruntime` now raises ImportError
    path = tmp_path / "star.onnx"
    path.write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError) as err:
        backend.load_model(path)
    message = str(err.value)
    assert "\n" not in message and "pip install onnxruntime" in message and "requirements-deploy.txt" in message
    monkeypatch.setitem(sys.modules, "onnx", None)
    rc, _, stderr = _cli(["--model_path", tmp_path / "m.pth", "--output", tmp_path / "o.onnx"])
    assert rc == export.EXIT_ERROR and stderr.count("\n") == 1 and "requirements-deploy.txt" in stderr


@needs_deploy
def test_corrupt_onnx_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "star.onnx"
    path.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(checkpoint.CheckpointError) as err:
        backend.load_model(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}: not a readable ONNX model")
    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        backend.load_model(tmp_path / "missing.onnx")


@needs_deploy
def test_onnx_without_star_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["clips"], ["pred_logits"])], "g",
                              [helper.make_tensor_value_info("clips", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, [1])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(checkpoint.CheckpointError, match="not a STAR export"):
        backend.load_model(path)


@needs_deploy
def test_wrong_clip_shape_is_a_clear_error(onnx_fp32):
    net, _ = onnx_fp32
    with pytest.raises(ValueError, match=r"takes clips of shape \(B, 4, 3, 64, 64\), got \(1, 8, 3, 64, 64\)"):
        net(torch.zeros(1, 8, 3, 64, 64))


# --------------------------------------------------------------------------- onnxruntime as test.py's backend


@needs_deploy
def test_test_py_gives_the_same_csv_with_the_onnx_export(exported, files, tmp_path):
    """The same videos through test.py with the checkpoint (fp32) and with its fp32 export: same rows, scores and boxes
    within 1e-3 (both cut into the checkpoint's 0.5 s windows)."""
    import csv

    import test as test_cli

    def predict(model_path, name, *extra):
        out = tmp_path / name / "predictions.csv"
        assert test_cli.cli(["--input_dir", str(files["videos"]), "--output_file", str(out), "--model_path",
                             str(model_path), "--no_annotate", "--workers", "0", "--score_threshold", "0.3", *extra]) == 0
        return list(csv.DictReader(out.open())), next(out.parent.glob("test_log_*.txt")).read_text()
    torch_rows, _ = predict(files["ckpt"], "torch", "--precision", "fp32")   # fp32 export against fp32 PyTorch
    onnx_rows, log = predict(exported["fp32"], "onnx")
    assert "onnxruntime fp32" in log and "windows of 0.5 s" in log
    assert len(torch_rows) == len(onnx_rows) > 0
    for a, b in zip(torch_rows, onnx_rows):
        assert (a["video_name"], a["pred_class"], a["start_sec"], a["end_sec"]) == \
               (b["video_name"], b["pred_class"], b["start_sec"], b["end_sec"])
        for key in ("score", "x1", "y1", "x2", "y2"):
            assert abs(float(a[key] or 0) - float(b[key] or 0)) <= 1e-3, key


def test_token_count_of_the_tube_mode_matches_its_tokens():
    net = star_model.STAR(2, tube_steps=4, num_queries=2, dim_feedforward=64, num_decoder_layers=1).eval()
    with torch.no_grad():
        tokens = net.encode(torch.zeros(1, 4, 3, 64, 64))
        memory, fine = net.split_tokens(tokens)
    # position rows: the decoder's memory (trunk 1x4x4, time 4x4x4) and the locator's 2x finer time tokens (4x8x8)
    assert export.token_count(4, 64, time_tokens=True) == memory.shape[1] + fine.shape[1] * fine.shape[2] == 336


@needs_deploy
def test_a_tube_mode_checkpoint_exports_with_parity(files, tmp_path):
    torch.manual_seed(0)
    args = checkpoint.model_args_from(2, num_queries=3, dim_feedforward=128, num_decoder_layers=2, max_positions=400,
                                      tube_steps=4)
    ckpt = tmp_path / "tube.pth"
    net = star_model.STAR(**args).eval()
    with torch.no_grad():   # the class evidence under the box starts at zero; trained, it is not
        net.actor_class.weight.normal_(std=0.05)
        net.actor_class.bias.normal_(std=0.05)
    checkpoint.save_checkpoint(checkpoint.make_checkpoint(net, args, NAMES, PREP), ckpt)
    out = tmp_path / "tube.onnx"
    rc, stdout, stderr = _cli(["--model_path", ckpt, "--output", out, "--check_videos", files["videos"],
                               "--check_clips", 2])
    assert rc == 0, stderr
    assert "same top class on 2/2 clips" in stdout
    onnx_net, info = backend.load_model(out)
    torch_net, _ = backend.load_model(ckpt)
    assert info["model_args"]["tube_steps"] == 4
    x = torch.randn(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, want = onnx_net(x), torch_net(x)
    assert got["pred_logits"].shape == (2, 3, 4, 3) and got["pred_boxes"].shape == (2, 3, 4, 4)
    assert _max_diff(got, want) < 1e-4
