"""Faults in the web demo (app.py, app_jobs.py, app_examples.py): an unwritable examples folder, fractional or absurd
``--max_upload_mb``, clean-up of every request's files (after each request and on SIGTERM), and only the example
videos served from the examples folder. A tiny STAR (4 frames, 64 px) keeps it fast; the server tests bind 127.0.0.1
only and are bounded in time."""
from __future__ import annotations

import contextlib
import io
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import app
import app_examples
import app_jobs
import inference
from conftest import ROOT, free_port, refuse_load, tiny_checkpoint, write_video



def a_file(tmp_path) -> pathlib.Path:
    """A regular file, to be used as a parent folder (which no one, root included, can write into)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


def cli_output(argv) -> tuple[int, str]:
    """app.cli's exit code and console output (stdout and stderr together); it must not start a server."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = app.cli([str(a) for a in argv])
    return rc, buf.getvalue()


# --------------------------------------------------------------------------- 1. unwritable examples folder


def test_an_unwritable_examples_folder_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "load_model", refuse_load)
    blocked = a_file(tmp_path) / "examples"
    rc, text = cli_output(["--examples_dir", blocked, "--model_path", tmp_path / "m.pth"])
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "--examples_dir" in lines[0] and str(blocked) in lines[0], text


# --------------------------------------------------------------------------- 3. --max_upload_mb


@pytest.mark.parametrize("mb", [2.5, 0.05, 200.0])
def test_a_fractional_upload_limit_starts_the_page_with_that_many_bytes(tmp_path, mb):
    pytest.importorskip("gradio")
    args = app.get_args_parser().parse_args(["--max_upload_mb", str(mb)])
    limits = app_jobs.Limits(args.max_upload_mb)
    demo = app_jobs.DemoApp(None, None, torch.device("cpu"), None, tmp_path / "work", limits)
    page = app.build_ui(demo, [], None)
    try:
        app.launch(page, demo, "127.0.0.1", free_port(), [tmp_path], block=False)
        assert page.max_file_size == round(mb * 1e6)
    finally:
        page.close()


@pytest.mark.parametrize("value", ["1e6", "inf", "0", "-1"])
def test_an_absurd_upload_limit_is_an_argparse_message(value, capsys):
    with pytest.raises(SystemExit) as exc:
        app.get_args_parser().parse_args(["--max_upload_mb", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--max_upload_mb" in err and "Traceback" not in err
    if value == "1e6":
        assert f"must be at most {app.MAX_UPLOAD_MB:g}" in err


# --------------------------------------------------------------------------- 5. clean-up; 6. what is served


def small_video(path) -> pathlib.Path:
    frames = np.full((8, 48, 64, 3), 40, np.uint8)
    for i in range(8):
        frames[i, 10:26, 2 * i:2 * i + 16] = 230
    return write_video(path, frames, fps=8)


def files_under(folder: pathlib.Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_the_upload_box_leaves_no_file_per_request(tmp_path, monkeypatch):
    """Gradio's gr.File (type filepath) made an empty temporary file in its cache on every request and never removed
    it; the page's upload box hands the path on and makes none."""
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import FileData
    page = app.build_ui(app_jobs.DemoApp(None, None, torch.device("cpu"), None, tmp_path / "work"), [], None)
    box = [c for c in page.blocks.values() if getattr(c, "elem_id", None) == "video-in"][0]
    cache = pathlib.Path(box.GRADIO_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    src = small_video(tmp_path / "walk.mp4")
    before = files_under(cache)
    for _ in range(3):
        assert box.preprocess(FileData(path=str(src), orig_name="walk.mp4")) == str(src)
    assert files_under(cache) == before
    with pytest.raises(gr.Error, match="not a video file name"):
        box.preprocess(FileData(path=str(tmp_path / "notes.txt"), orig_name="notes.txt"))
    assert not (ROOT / "app.pyi").exists()   # Gradio writes a stub beside the module of a component subclass


def test_a_failed_request_leaves_no_request_folder(tmp_path):
    net, desc = inference.load_model(tiny_checkpoint(tmp_path / "tiny.pth"), torch.device("cpu"))
    work = tmp_path / "work"
    demo = app_jobs.DemoApp(net, desc, torch.device("cpu"), None, work)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 400)
    original = inference.run_videos

    def failing(*args, **kwargs):   # the probe passed, decoding fails: the request folder exists by then
        results, *rest = original(*args, **kwargs)
        results[0].error = "cannot decode frame 3"
        return (results, *rest)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(inference, "run_videos", failing)
        out = demo.predict(str(small_video(tmp_path / "a.mp4")))
    assert not out.ok and "cannot decode frame 3" in out.message
    assert list(work.iterdir()) == []
    assert demo.predict(str(small_video(tmp_path / "b.mp4"))).ok and len(list(work.iterdir())) == 1


def start_server(tmp_path, checkpoint, port: int, env: dict) -> subprocess.Popen:
    """``python app.py`` on 127.0.0.1:``port``; returns once the page answers (fails with the server's output)."""
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model_path", str(checkpoint), "--port", str(port),
                             "--host", "127.0.0.1", "--examples_dir", str(tmp_path / "examples"), "--precision",
                             "fp32"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return proc
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"app.py did not answer in 90 s:\n{(tmp_path / 'server.log').read_text()[-3000:]}")


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@contextlib.contextmanager
def server(tmp_path):
    """A real app.py on 127.0.0.1 with its own temporary folder: yields ``(origin, process, temporary folder)``;
    stopped with SIGTERM (then killed after 30 s) when the test is done with it."""
    pytest.importorskip("gradio")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio"), "OMP_NUM_THREADS": "1"}
    port = free_port()
    proc = start_server(tmp_path, tiny_checkpoint(tmp_path / "tiny.pth"), port, env)
    try:
        yield f"http://127.0.0.1:{port}", proc, tmp
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM, then the exit code; None when it had to be killed after 30 s."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def test_sigterm_removes_every_request_and_no_file_is_left_per_request(tmp_path):
    """Two requests through the HTTP API, then SIGTERM: the server exits 0 within 30 s and leaves none of its request
    folders and no empty file per request under the temporary folder."""
    from gradio_client import Client, handle_file
    with server(tmp_path) as (origin, proc, tmp):
        client = Client(origin, verbose=False)
        for name in ("a.mp4", "b.mp4"):
            result = client.predict(handle_file(str(small_video(tmp_path / name))), 0.5, app_jobs.WHOLE, 4, 2,
                                    api_name="/predict")
            assert "detection" in result[-1] or "No action" in result[-1], result[-1]
        assert len(list(tmp.glob("star_app_*/request_*"))) == 2
        rc = stop(proc)
    log = (tmp_path / "server.log").read_text()
    assert rc == 0, log[-3000:]
    assert list(tmp.glob("star_app_*")) == [], log[-3000:]
    empty = [p for p in (tmp / "gradio").rglob("*") if p.is_file() and p.stat().st_size == 0]
    assert empty == [], empty


def test_only_the_example_videos_are_served_from_the_examples_folder(tmp_path):
    with server(tmp_path) as (origin, _, _):
        samples = tmp_path / "examples" / f"sample_seed{app_examples.SAMPLE_SEED}"
        shown = [pathlib.Path(p) for p, _ in app_examples.sample_examples(tmp_path / "examples")]   # made by the server
        assert status_of(f"{origin}/gradio_api/file={shown[0]}") == 200
        hidden = next(p for p in sorted(samples.rglob("*.mp4")) if p not in shown)
        private = [samples / "action_challenge.csv", samples / "classes.txt", next(samples.rglob("*.txt")), hidden]
        for path in private:
            assert path.is_file() and status_of(f"{origin}/gradio_api/file={path}") in (403, 404), path
