"""The web demo (app.py, app_jobs.py, timeline.py, app_examples.py): the prediction function without a server (video,
table, timeline, CSV; bad inputs give one line and the next call works), the examples, the offline page set-up, and
the page in a real headless Chromium driven by Playwright (skipped, with the reason, when either is missing).
A tiny STAR checkpoint (4 frames, 64 px) whose every query says ``collapse`` keeps it fast on a CPU."""
from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import av
import numpy as np
import pytest
import torch

import app
import app_examples
import app_jobs
import detections
import drawing
import inference
import model as star_model
import predictions_io
import timeline
import tubes
import video
from conftest import ROOT, TINY_PREP, free_port, tiny_checkpoint, write_video, tube_checkpoint

FIELDS = list(predictions_io.CSV_FIELDS)
BROWSER_BUDGET_SEC = 90


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", confident=True)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """The checkpoint loaded once, as app.py does (inference.load_model)."""
    return inference.load_model(checkpoint, torch.device("cpu"))


@pytest.fixture(scope="module")
def tube_loaded(tmp_path_factory):
    """The acting tube-mode checkpoint, loaded once."""
    path = tube_checkpoint(tmp_path_factory.mktemp("tube_ckpt") / "tube.pth")
    return inference.load_model(path, torch.device("cpu"))


def make_app(loaded, work_dir, **limits) -> app_jobs.DemoApp:
    net, desc = loaded
    return app_jobs.DemoApp(net, desc, torch.device("cpu"), None, work_dir, app_jobs.Limits(**limits))


def clip(path, n=16, fps=8, w=64, h=48) -> pathlib.Path:
    """A small H.264 clip with a bright square moving right."""
    frames = np.full((n, h, w, 3), 40, np.uint8)
    for i in range(n):
        frames[i, 10:26, 2 * i:2 * i + 16] = 230
    return write_video(path, frames, fps=fps)


class Recorder:
    """Stands in for gr.Progress: records ``(fraction, desc)``."""

    def __init__(self):
        self.calls = []

    def __call__(self, fraction, desc=None):
        self.calls.append((fraction, desc))


# --------------------------------------------------------------------------- the prediction function


def test_predict_gives_playable_video_table_timeline_and_csv(tmp_path, loaded):
    src = clip(tmp_path / "walk.mp4", n=16, fps=8)
    progress = Recorder()
    out = make_app(loaded, tmp_path / "work").predict(str(src), 0.5, app_jobs.WHOLE, progress=progress)
    assert out.ok, out.message
    assert "\n" not in out.message and "collapse x12" in out.message and "Whole clip, 4 frames sampled" in out.message
    with av.open(out.video) as container:   # H.264, every input frame, input size
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert sum(1 for _ in container.decode(stream)) == 16
    assert (video.probe_video(out.video).width, video.probe_video(out.video).height) == (64, 48)
    with open(out.files[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert pathlib.Path(out.files[0]).name == "predictions.csv" and list(rows[0]) == FIELDS
    assert len(rows) == 12 and {r["pred_class"] for r in rows} == {"collapse"}
    assert out.rows == [[r["pred_class"], r["score"], r["start_sec"], r["end_sec"],
                         ", ".join(r[k] for k in ("x1", "y1", "x2", "y2"))] for r in rows]
    assert rows[0]["video_name"] == "walk.mp4" and rows[0]["end_sec"] == "2.000"
    labels = [line.get_label() for line in out.figure.axes[0].get_lines()]
    assert labels == ["fight", "collapse", "threshold"]   # clip mode: the per-class score timeline
    assert not tube_rows(out.figure) and out.headers == app_jobs.TABLE_HEADERS
    fractions = [f for f, _ in progress.calls]
    assert fractions == sorted(fractions) and fractions[-1] >= 0.95
    assert any("annotating 16 frames" in (d or "") for _, d in progress.calls)
    assert out.outputs() == (out.video, {"headers": app_jobs.TABLE_HEADERS, "data": out.rows}, out.figure, out.files,
                             out.message)


def test_windows_give_one_timeline_point_per_clip_and_per_clip_progress(tmp_path, loaded):
    src = clip(tmp_path / "long.mp4", n=16, fps=8)   # 2 s: windows of 0.5 s = 4 clips
    progress = Recorder()
    out = make_app(loaded, tmp_path / "work").predict(str(src), 0.5, app_jobs.WINDOWS, 0.5, 0.5, progress)
    assert out.ok, out.message
    assert "Windows of 0.5 s every 0.5 s" in out.message
    collapse = out.figure.axes[0].get_lines()[1]
    assert list(collapse.get_xdata()) == [0.25, 0.75, 1.25, 1.75]
    assert any(d == "predicted 4 of 4 clip(s)" for _, d in progress.calls)
    assert {(r[2], r[3]) for r in out.rows} == {("0.000", "2.000")}   # joined across the 4 windows


def test_a_long_video_is_cut_into_windows_automatically(tmp_path, loaded, monkeypatch):
    monkeypatch.setattr(app_jobs, "AUTO_WINDOW_SEC", 1.0)
    src = clip(tmp_path / "long.mp4", n=16, fps=8)
    out = make_app(loaded, tmp_path / "work").predict(str(src), 0.5, app_jobs.WHOLE, 1.0, 0.5)
    assert out.ok and "Longer than 1 s, so cut into windows of 1 s every 0.5 s" in out.message
    assert len(out.figure.axes[0].get_lines()[1].get_xdata()) == 3


def test_no_detection_gives_the_no_object_row(tmp_path):
    loaded = inference.load_model(tiny_checkpoint(tmp_path / "random.pth", confident=False), torch.device("cpu"))
    src = clip(tmp_path / "a.mp4", n=8)
    out = make_app(loaded, tmp_path / "work").predict(str(src), 0.9)
    assert out.ok and out.message.startswith("No action with score >= 0.9 (best 0.")
    assert [r[0] for r in out.rows] == ["no_object"] and out.rows[0][4] == ""


def test_a_tube_mode_checkpoint_gives_tubes_and_the_frames_csv(tmp_path, tube_loaded):
    """A tiny tube-mode STAR (8 frames, 4 queries, every step collapse): one row per tube, a box per frame; the table
    shows each tube's id first, the ids of the frames CSV."""
    out = make_app(tube_loaded, tmp_path / "work").predict(str(clip(tmp_path / "walk.mp4", n=16, fps=8)), 0.5)
    assert out.ok, out.message
    assert "collapse x4" in out.message and [r[3:5] for r in out.rows] == [["0.000", "2.000"]] * 4
    assert out.headers == ["tube_id", *app_jobs.TABLE_HEADERS] and out.outputs()[1]["headers"] == out.headers
    assert [pathlib.Path(f).name for f in out.files] == ["predictions.csv", "predictions_frames.csv"]
    with open(out.files[1], newline="") as f:
        frames = list(csv.DictReader(f))
    assert len(frames) == 4 * 16 and [r["tube_id"] for r in frames[::16]] == ["1", "2", "3", "4"]
    assert [r[0] for r in out.rows] == ["1", "2", "3", "4"]
    with open(out.files[0], newline="") as f:   # predictions.csv keeps its columns: no tube_id there
        assert list(next(csv.DictReader(f))) == FIELDS
    assert sum(1 for _ in av.open(out.video).decode(video=0)) == 16


# --------------------------------------------------------------------------- the tube timeline


def tube_rows(fig) -> dict:
    """The tube rows of a timeline figure: ``{tube_id: (label, [(start_sec, end_sec) of each bar], y, facecolour)}``,
    labels read off the y axis at the row's height."""
    if not fig.axes:
        return {}
    ax = fig.axes[0]
    ticks = {round(float(y), 6): t.get_text() for y, t in zip(ax.get_yticks(), ax.get_yticklabels())}
    rows = {}
    for coll in ax.collections:
        gid = coll.get_gid() or ""
        if not gid.startswith("tube-"):
            continue
        extents = []
        for path in coll.get_paths():
            xs, ys = path.vertices[:, 0], path.vertices[:, 1]
            extents.append((round(float(xs.min()), 6), round(float(xs.max()), 6)))
        y = round(float((ys.min() + ys.max()) / 2), 6)
        rows[int(gid.split("-")[1])] = (ticks.get(y), sorted(extents), y, tuple(coll.get_facecolor()[0][:3]))
    return rows


def hand_tube(tube_id: int, class_name: str, frames, score: float) -> tubes.PredTube:
    """A tube made by hand: box fixed, its per-frame scores rising from 0.2 to 0.8."""
    frames = np.asarray(list(frames), dtype=np.int64)
    scores = np.linspace(0.2, 0.8, len(frames))
    return tubes.PredTube(0 if class_name == "fight" else 1, class_name, score, frames,
                          np.tile([0.1, 0.2, 0.5, 0.6], (len(frames), 1)), scores, frames[:1], scores[:1],
                          tube_id=tube_id)


def test_tube_timeline_has_one_row_per_tube_id_with_its_frames_and_pauses():
    paused = hand_tube(1, "fight", [*range(0, 30), *range(40, 70)], 0.81)   # a pause of frames 30-39 (1 s at 10 fps)
    whole = hand_tube(2, "collapse", range(20, 90), 0.655)
    fig = timeline.tube_timeline_figure([whole, paused], 10.0, 10.0, ["fight", "collapse"])   # any order in: id order
    rows = tube_rows(fig)
    assert sorted(rows) == [1, 2]
    assert rows[1][:2] == ("#1 fight 0.81", [(0.0, 3.0), (4.0, 7.0)])   # the pause is a gap inside the row
    assert rows[2][:2] == ("#2 collapse 0.66", [(2.0, 9.0)])
    assert rows[1][2] > rows[2][2]   # #1 on top
    assert rows[1][3] == pytest.approx(tuple(v / 255 for v in drawing.class_colour("fight")))
    assert rows[2][3] == pytest.approx(tuple(v / 255 for v in drawing.class_colour("collapse")))
    ax = fig.axes[0]
    assert ax.get_xlim() == (0.0, 10.0) and ax.get_xlabel() == "time (s)" and "one row per tube" in ax.get_title()
    line = [ln for ln in ax.get_lines() if ln.get_gid() == "tube-1-score"][0]   # the per-frame score, broken too
    xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    assert np.isnan(xs).sum() == 1 and np.nanmin(xs) == pytest.approx(0.05) and np.nanmax(xs) == pytest.approx(6.95)
    row_bottom = rows[1][2] - 0.4
    assert (ys[~np.isnan(ys)] - row_bottom) / 0.8 == pytest.approx(paused.frame_scores)


def test_many_tubes_stay_readable_the_figure_grows_up_to_a_cap():
    def figure(n):
        return timeline.tube_timeline_figure([hand_tube(i, "collapse", range(i, i + 20), 0.5) for i in range(1, n + 1)],
                                             25.0, 10.0, ["fight", "collapse"])
    two, forty, many = figure(2), figure(40), figure(300)
    heights = [f.get_size_inches()[1] for f in (two, forty, many)]
    assert heights[0] < heights[1] <= timeline.TUBE_FIGURE_MAX_INCH and heights[2] == timeline.TUBE_FIGURE_MAX_INCH
    assert len(tube_rows(forty)) == 40 and heights[1] / 40 >= 0.2   # at least 0.2 inch a row
    labels = [t for t in forty.axes[0].get_yticklabels()]
    assert [t.get_text() for t in labels] == [f"#{i} collapse 0.50" for i in range(1, 41)]
    assert min(t.get_fontsize() for t in labels) >= 8
    labels = many.axes[0].get_yticklabels()   # beyond the cap: fewer labels, never unreadably small
    assert len(tube_rows(many)) == 300 and 0 < len(labels) < 300
    assert min(t.get_fontsize() for t in labels) >= timeline.TUBE_LABEL_MIN_PT


def test_no_tubes_gives_a_figure_that_says_so():
    fig = timeline.tube_timeline_figure([], 25.0, 4.0, ["fight", "collapse"])
    assert fig.axes == [] and "no tubes" in " ".join(t.get_text() for t in fig.texts)


def test_a_tube_mode_prediction_shows_the_tube_timeline(tmp_path, tube_loaded, monkeypatch):
    seen = []
    original = timeline.result_figure

    def spy(result, class_names, settings):
        seen.append(result)
        return original(result, class_names, settings)

    monkeypatch.setattr(timeline, "result_figure", spy)
    out = make_app(tube_loaded, tmp_path / "work").predict(str(clip(tmp_path / "walk.mp4", n=16, fps=8)), 0.5)
    assert out.ok, out.message
    [result] = seen
    assert result.tube_mode and len(result.tubes) == 4
    rows = tube_rows(out.figure)
    assert sorted(rows) == [t.tube_id for t in result.tubes] == [1, 2, 3, 4]
    assert [rows[t.tube_id][0] for t in result.tubes] == [f"#{t.tube_id} collapse {t.score:.2f}" for t in result.tubes]
    assert all(rows[i][1] == [(0.0, 2.0)] for i in rows)   # every tube spans the whole 2 s clip
    assert [r[0] for r in out.rows] == [str(t.tube_id) for t in result.tubes]   # the table's ids are the rows' ids
    assert not any(line.get_label() == "threshold" for line in out.figure.axes[0].get_lines())


def test_a_tube_mode_prediction_without_tubes_says_so(tmp_path):
    loaded = inference.load_model(tube_checkpoint(tmp_path / "idle.pth", acting=False), torch.device("cpu"))
    out = make_app(loaded, tmp_path / "work").predict(str(clip(tmp_path / "walk.mp4", n=16, fps=8)), 0.5)
    assert out.ok, out.message
    assert out.figure.axes == [] and "no tubes" in " ".join(t.get_text() for t in out.figure.texts)
    assert out.headers == ["tube_id", *app_jobs.TABLE_HEADERS] and [r[:2] for r in out.rows] == [["", "no_object"]]


def test_the_page_figure_follows_the_model_mode():
    """Tube mode: the tube timeline; clip mode keeps the per-class score timeline, though its detections are tubes
    (numbered, constant boxes) too."""
    info = video.VideoInfo(64, 48, 40, 10.0, 4.0)
    tube = hand_tube(1, "collapse", range(0, 20), 0.9)
    queries = [{"labels": torch.tensor([1]), "scores": torch.tensor([0.9])}]
    settings = inference.Settings(0.5, annotate=False)
    tube_fig = timeline.result_figure(detections.VideoResult(0, "a.mp4", "a.mp4", info, queries=queries,
                                                             spans=[(0.0, 4.0)], tube_mode=True, tubes=[tube]),
                                      ["fight", "collapse"], settings)
    assert {i: r[:2] for i, r in tube_rows(tube_fig).items()} == {1: ("#1 collapse 0.90", [(0.0, 2.0)])}
    assert tube_fig.axes[0].get_xlim() == (0.0, 4.0)
    clip_fig = timeline.result_figure(detections.VideoResult(0, "a.mp4", "a.mp4", info, queries=queries,
                                                             spans=[(0.0, 4.0)], tube_mode=False, tubes=[tube]),
                                      ["fight", "collapse"], settings)
    assert not tube_rows(clip_fig)
    assert [line.get_label() for line in clip_fig.axes[0].get_lines()] == ["fight", "collapse", "threshold"]


def test_bad_inputs_give_one_line_and_the_next_call_works(tmp_path, loaded):
    demo = make_app(loaded, tmp_path / "work", max_upload_mb=0.05, max_seconds=3)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    long_clip = clip(tmp_path / "long.mp4", n=40, fps=8)   # 5 s > 3 s
    big = tmp_path / "big.mp4"
    big.write_bytes(bytes(60_000))
    named_txt = tmp_path / "clip.txt"
    named_txt.write_bytes(clip(tmp_path / "c.mp4", n=4).read_bytes())
    cases = {None: "Upload a video or pick an example first", str(text): "notes.mp4: not a readable video",
             str(empty): "empty.mp4: the file is empty (0 bytes)", str(long_clip): "long.mp4: 5 s long",
             str(big): "big.mp4: 0 MB; this page takes videos up to 0.05 MB",
             str(named_txt): "clip.txt: not a video file name", str(tmp_path / "gone.mp4"): "gone.mp4: the uploaded"}
    for path, expected in cases.items():
        out = demo.predict(path)
        assert not out.ok and expected in out.message, (path, out.message)
        assert "\n" not in out.message and out.outputs()[:4] == (None, {"headers": app_jobs.TABLE_HEADERS, "data": []},
                                                                  None, None)
    good = demo.predict(str(clip(tmp_path / "good.mp4", n=8)))
    assert good.ok and len(good.rows) == 12


def test_without_a_model_the_page_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "DEFAULT_MODEL", tmp_path / "missing" / "best_model.pth")
    args = app.get_args_parser().parse_args([])
    demo, model_path = app.load_app(args, torch.device("cpu"), None, tmp_path / "work")
    assert demo.model is None and model_path is None
    out = demo.predict(str(clip(tmp_path / "a.mp4", n=4)))
    assert not out.ok and out.message == app_jobs.NO_MODEL_LINE
    assert "bash demo.sh" in out.message and "--model_path" in out.message


def test_a_bad_model_path_is_one_line_and_exit_2(tmp_path, capsys):
    assert app.cli(["--model_path", str(tmp_path / "nope.pth")]) == 2
    captured = capsys.readouterr()   # the log (stdout) once logging is set up, else stderr
    lines = [line for line in (captured.out + captured.err).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "nope.pth: no such file" in lines[0]


def test_every_flag_has_help():
    for action in app.get_args_parser()._actions:
        assert action.help, action.dest


# --------------------------------------------------------------------------- examples and page set-up


def test_sample_examples_are_made_once_with_their_actions(tmp_path):
    first = app_examples.sample_examples(tmp_path)
    assert 2 <= len(first) <= app_examples.SAMPLE_EXAMPLES + 1
    assert all(pathlib.Path(p).is_file() and video.is_video_file(p) for p, _ in first)
    assert first[-1][1] == "sample: no action" and all(lab.startswith("sample: ") for _, lab in first)
    stamp = pathlib.Path(first[0][0]).stat().st_mtime_ns
    assert app_examples.sample_examples(tmp_path) == first
    assert pathlib.Path(first[0][0]).stat().st_mtime_ns == stamp   # reused, not made again
    assert app_examples.media_examples(tmp_path / "absent") == []


def test_page_is_offline_queued_and_uses_system_fonts(tmp_path, loaded):
    gr = pytest.importorskip("gradio")
    from gradio import analytics
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and not analytics.analytics_enabled()   # no version check
    theme = app.theme()
    assert not any(isinstance(f, gr.themes.GoogleFont) for f in [*theme._font, *theme._font_mono])
    page = app.build_ui(make_app(loaded, tmp_path / "work"), [], None, concurrency=2)
    assert page.analytics_enabled is False
    assert page._queue.default_concurrency_limit == 2
    radio = [c for c in page.blocks.values() if getattr(c, "elem_id", None) == "mode"][0]
    assert radio.value == app_jobs.WHOLE   # a checkpoint trained on whole clips
    windowed = make_app(loaded, tmp_path / "work")
    windowed.desc = dataclasses.replace(windowed.desc, window_sec=0.64)   # trained on windows: cut as test.py cuts
    page = app.build_ui(windowed, [], None)
    values = {c.elem_id: c.value for c in page.blocks.values() if getattr(c, "elem_id", None) in ("mode", "window")}
    assert values == {"mode": app_jobs.WINDOWS, "window": 0.64}
    empty = app.build_ui(app_jobs.DemoApp(None, None, torch.device("cpu"), None, tmp_path / "work"), [], None)
    notes = [c.value for c in empty.blocks.values() if getattr(c, "elem_id", None) == "no-model"]
    assert notes == [app_jobs.NO_MODEL_LINE]
    assert [c.interactive for c in empty.blocks.values() if getattr(c, "elem_id", None) == "run"] == [False]


# --------------------------------------------------------------------------- the page in a real browser


def chromium_path() -> str:
    """A Chromium that Playwright can drive: $STAR_CHROMIUM, Debian's, or Playwright's own; else skip."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    for candidate in (os.environ.get("STAR_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    from playwright.sync_api import Error, sync_playwright
    try:
        with sync_playwright() as p:
            own = p.chromium.executable_path
    except Error as err:
        pytest.skip(f"no browser: {str(err).splitlines()[0]}")
    if not os.path.exists(own):
        pytest.skip("no Chromium: install Debian's chromium (apt-get install chromium) or run "
                    "`playwright install chromium`")
    return own


def launch_browser(playwright, executable: str):
    """Headless Chromium (--no-sandbox: CI runs as root); skip with the reason when it does not start."""
    from playwright.sync_api import Error
    try:
        return playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
    except Error as err:
        pytest.skip(f"{executable} does not start: {str(err).strip().splitlines()[0]}")


def start_server(checkpoint, tmp_path, port: int) -> subprocess.Popen:
    """``python app.py`` on a free port; returns once the page answers (fails with the server's output)."""
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model_path", str(checkpoint), "--port", str(port),
                             "--examples_dir", str(tmp_path / "examples"), "--precision", "fp32"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"app.py did not answer in 60 s:\n{(tmp_path / 'server.log').read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_clip(page, path, timeout_ms: int = 60_000) -> None:
    """Upload ``path`` into the page's video input (clearing the one before) and press Detect."""
    clear = page.locator("#video-in button[aria-label='Clear']")
    if clear.count():
        clear.click()
    page.set_input_files("#video-in input[type=file]", str(path))
    page.wait_for_selector(f"#video-in [aria-label='{path.name}']", timeout=timeout_ms)
    page.click("#run")


def check_page(page, origin: str, src, bad, tmp_path) -> None:
    """Load the page, refuse a bad file, predict a good clip: video plays, table rows, CSV download, screenshot."""
    page.goto(origin)
    page.wait_for_selector("#run")
    assert "STAR" in page.title()

    run_clip(page, bad)   # bad input: a one-line message, and the server keeps serving
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('not a readable')",
                           timeout=30_000)

    run_clip(page, src)
    page.wait_for_function("() => { const v = document.querySelector('#video-out video');"
                           " return v && v.duration > 0 }", timeout=60_000)
    assert 1.5 < page.evaluate("document.querySelector('#video-out video').duration") < 2.5
    page.evaluate("() => { const v = document.querySelector('#video-out video'); v.muted = true; return v.play(); }")
    page.wait_for_function("() => document.querySelector('#video-out video').currentTime > 0", timeout=10_000)

    grid = page.locator("#detections [role=grid]")   # virtualised: rows are counted by aria-rowcount
    assert grid.get_attribute("aria-rowcount") == "13"   # header + 12 detections
    classes = page.locator("#detections [role=gridcell][data-col='0']").all_inner_texts()
    assert classes and {c.strip() for c in classes} == {"collapse"}
    assert page.inner_text("#detections [data-testid='cell-0-1']").strip() == "1.0000"
    assert "collapse x12" in page.inner_text("#status")
    assert page.locator("#timeline img").count() == 1

    with page.expect_download() as download:
        page.click("#csv a[download]")
    saved = tmp_path / "downloaded.csv"
    download.value.save_as(saved)
    with saved.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FIELDS and len(rows) == 12
    assert {(r["video_name"], r["pred_class"]) for r in rows} == {("walk.mp4", "collapse")}

    page.wait_for_timeout(500)   # let the plot image settle for the screenshot
    page.screenshot(path=str(tmp_path / "app_page.png"), full_page=True)


def test_page_in_a_real_browser(tmp_path, checkpoint):
    executable = chromium_path()
    from playwright.sync_api import sync_playwright
    started = time.monotonic()
    src = clip(tmp_path / "walk.mp4", n=16, fps=8)
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n" * 50)
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    requests = []
    with sync_playwright() as p:
        browser = launch_browser(p, executable)   # before the server: a browser that cannot start skips early
        proc = start_server(checkpoint, tmp_path, port)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.on("request", lambda r: requests.append(r.url))
            check_page(page, origin, src, bad, tmp_path)
        finally:
            browser.close()
            stop_server(proc)
    hosts = {u.split("/")[2] for u in requests if u.startswith(("http://", "https://"))}
    assert hosts == {f"127.0.0.1:{port}"}, f"the page fetched from elsewhere: {hosts}"
    assert (tmp_path / "app_page.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'app_page.png'}")
    assert time.monotonic() - started < BROWSER_BUDGET_SEC


def test_an_onnx_export_serves_the_same_page(tmp_path, checkpoint, loaded):
    """--model_path star.onnx: the page predicts through onnxruntime (inference.load_model), same rows as PyTorch."""
    pytest.importorskip("onnx", reason="onnx not installed (pip install -r requirements-deploy.txt)")
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -r requirements-deploy.txt)")
    import export
    onnx_path = tmp_path / "star.onnx"
    assert export.cli(["--model_path", str(checkpoint), "--output", str(onnx_path), "--check_clips", "1"]) == 0
    args = app.get_args_parser().parse_args(["--model_path", str(onnx_path)])
    demo, _ = app.load_app(args, torch.device("cpu"), None, tmp_path / "work")
    src = clip(tmp_path / "a.mp4", n=8)
    via_onnx, via_torch = demo.predict(str(src)), make_app(loaded, tmp_path / "work2").predict(str(src))
    assert via_onnx.ok, via_onnx.message
    assert [r[0] for r in via_onnx.rows] == [r[0] for r in via_torch.rows] == ["collapse"] * 12
    assert app.model_line(demo, onnx_path).startswith("Model `star.onnx`: classes fight, collapse")
