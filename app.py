#!/usr/bin/env python
"""STAR web demo: a local page where you drop a video and watch the detected actions.

    python app.py --model_path best_model.pth [--host 127.0.0.1] [--port 7860]

Upload a video (or pick a bundled example), choose the score threshold and whole clip vs windows; the
page shows the annotated H.264 video, the detections table, a timeline and the predictions CSVs (per tube;
per tube per frame) to download. The timeline of a tube-mode model has one row per tube id (the ``#id`` of the
annotated video and the ``tube_id`` of the frames CSV): the frames where the tube is present, coloured by class,
with its per-frame score; a clip-mode model's shows each class's best score per clip. Everything runs through
``inference.py`` (the pipeline of test.py); the model is loaded once per process; requests wait in Gradio's queue, at
most ``--concurrency`` at once.
Offline: Gradio serves its own JS/CSS, the theme uses system fonts, analytics are off, nothing is
downloaded. This file is the page and its command line; the prediction behind it (``app_jobs.DemoApp.predict``,
usable without a server) is app_jobs.py, the timeline figures timeline.py, the example clips app_examples.py.
"""
from __future__ import annotations

import os

# No telemetry and no version check: set before anything imports gradio.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402

import checkpoint  # noqa: E402
import inference  # noqa: E402
import video  # noqa: E402
from app_examples import collect_examples  # noqa: E402
from app_jobs import (AUTO_WINDOW_SEC, DEFAULT_STRIDE_SEC, DEFAULT_WINDOW_SEC, NO_MODEL_LINE,  # noqa: E402
                      TABLE_HEADERS, WHOLE, WINDOWS, DemoApp, Limits)
from cutting import choose_cut  # noqa: E402
from model_description import ModelDescription  # noqa: E402
from runtime import autocast_settings, number, resolve_device, run_cli, setup_logging, writable_dir  # noqa: E402

log = logging.getLogger("star.app")

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "demo_output" / "run" / "best_model.pth"   # what demo.sh trains
MAX_UPLOAD_MB = 10_000      # --max_upload_mb above this (10 GB) is refused: far beyond any video of --max_seconds
QUEUE_SIZE = 32             # requests waiting beyond this are refused by Gradio with a message
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial",
                "sans-serif")
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace")
CSS = """
#status p { margin: 0; font-size: 1.05em; }
#no-model * { color: #b45309 !important; font-weight: 600; }
footer { display: none !important; }
"""


# --------------------------------------------------------------------------- the page


def theme():
    """Gradio's default look with system fonts, so the page fetches no web fonts."""
    import gradio as gr
    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))


def model_line(app: DemoApp, model_path) -> str:
    """What the page says about the loaded model."""
    if app.model is None:
        return ""
    desc = app.desc
    name = f" `{pathlib.Path(model_path).name}`" if model_path else ""
    return (f"Model{name}: classes {', '.join(desc.class_names)}; "
            f"{desc.num_frames} frames at {desc.img_size} px; on {app.device}.")


def default_cut(desc: ModelDescription | None) -> tuple[str, float, float]:
    """``(mode, window, stride)`` the page starts with: as the model was trained (:func:`cutting.choose_cut`, as
    test.py cuts)."""
    cut = choose_cut(desc)
    if cut.window_sec:
        return WINDOWS, cut.window_sec, cut.stride_sec
    return WHOLE, DEFAULT_WINDOW_SEC, DEFAULT_STRIDE_SEC


def cut_info(desc: ModelDescription | None) -> str:
    """The line under the whole clip / windows choice."""
    if desc is not None and desc.window_sec:
        trained = f"This model was trained on windows of {desc.window_sec:g} s. "
    else:
        trained = f"Whole clip: the network sees {desc.num_frames if desc else 'T'} frames spread over the video. "
    return trained + f"Videos longer than {AUTO_WINDOW_SEC:g} s are cut into windows automatically."


def upload_box(**kwargs):
    """A ``gr.File`` for one video path. Gradio's own (6.x) opens an empty temporary file in its cache on every request
    and never removes it (it only renames the Python object): this box hands the uploaded file's path on as it is,
    after the same file-type check, so a server that runs for weeks does not collect one file per request. Replaced on
    the instance: a subclass of a Gradio component makes Gradio write a ``.pyi`` stub beside this file."""
    import gradio as gr
    box = gr.File(type="filepath", file_count="single", **kwargs)
    box._process_single_file = functools.partial(_uploaded_path, box)
    return box


def _uploaded_path(box, f):
    """What ``gr.File(type="filepath")`` gives for the uploaded file ``f``, without the temporary file."""
    import gradio as gr
    import gradio_client.utils as client_utils
    from gradio.utils import NamedString
    if box.file_types and not client_utils.is_valid_file(f.path, box.file_types):
        raise gr.Error(f"{pathlib.Path(f.path).name}: not a video file name ({', '.join(video.VIDEO_EXTENSIONS)}).")
    return NamedString(f.path)


def build_ui(app: DemoApp, examples: list[tuple[str, str]], model_path=None, concurrency: int = 1):
    """The Gradio page around ``app.predict``; queued, at most ``concurrency`` requests at once."""
    import gradio as gr

    def run(video_path, threshold, mode, window_sec, stride_sec, progress=gr.Progress()):
        outcome = app.predict(video_path, threshold, mode, window_sec, stride_sec, progress)
        if not outcome.ok:
            gr.Warning(outcome.message)
        return outcome.outputs()

    limits = app.limits
    with gr.Blocks(title="STAR action detection", analytics_enabled=False, delete_cache=(1800, 3600)) as page:
        gr.Markdown("## STAR: spatio-temporal action detection\nWhat action happens, where (a box) and when, "
                    "in your video. " + model_line(app, model_path))
        if app.model is None:
            gr.Markdown(app.missing, elem_id="no-model")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                # A file box, not gr.Video: a browser cannot preview .avi/.mkv and gr.Video calls that an error.
                video_in = upload_box(label="Video (.mp4 .avi .mov .mkv)", file_types=list(video.VIDEO_EXTENSIONS),
                                      elem_id="video-in", height=150)
                if examples:
                    gr.Examples([[p] for p, _ in examples], inputs=[video_in], label="Examples (click one)",
                                example_labels=[lab for _, lab in examples])
                threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Score threshold", elem_id="threshold")
                cut, window_sec, stride_sec = default_cut(app.desc)
                mode = gr.Radio([WHOLE, WINDOWS], value=cut, label="Cut", elem_id="mode", info=cut_info(app.desc))
                with gr.Row():
                    window = gr.Slider(0.1, 30, value=window_sec, step=0.1, label="Window (s)", elem_id="window")
                    stride = gr.Slider(0.1, 30, value=stride_sec, step=0.1, label="Stride (s)", elem_id="stride")
                button = gr.Button("Detect actions", variant="primary", elem_id="run",
                                   interactive=app.model is not None)
                gr.Markdown(f"Limits: {limits.max_upload_mb:g} MB, {limits.max_seconds:g} s per video.")
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown("Results appear here.", elem_id="status")
                video_out = gr.Video(label="Annotated video", elem_id="video-out", interactive=False, autoplay=True,
                                     loop=True, height=360)
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype="str",
                                     label="Detections", elem_id="detections", interactive=False, max_height=260,
                                     wrap=True)
                plot = gr.Plot(label="Timeline: one row per tube id (tube-mode model), else each class's score per "
                                     "clip", show_label=False, elem_id="timeline", format="png")
                files = gr.File(label="CSV", file_count="multiple", elem_id="csv", interactive=False)
        button.click(run, [video_in, threshold, mode, window, stride], [video_out, table, plot, files, status],
                     concurrency_limit=concurrency, api_name="predict", show_progress_on=[video_out])
    page.queue(default_concurrency_limit=concurrency, max_size=QUEUE_SIZE)
    return page


def launch(page, app: DemoApp, host: str, port: int, allowed, block: bool = True):
    """Serve ``page`` offline (no share link, no SSR, no MCP, system fonts); returns Gradio's launch tuple."""
    return page.launch(server_name=host, server_port=port, share=False, ssr_mode=False, mcp_server=False,
                       theme=theme(), css=CSS, max_file_size=app.limits.max_upload_bytes,
                       allowed_paths=[str(p) for p in allowed], show_error=True, prevent_thread_lock=not block,
                       footer_links=[])


# --------------------------------------------------------------------------- command line


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="STAR web demo (Gradio, offline)", add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", default=None,
                        help="STAR checkpoint, the published raw state_dict (with --class_names) or an .onnx file "
                             "(default: demo_output/run/best_model.pth beside app.py, when demo.sh made it)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (0.0.0.0 makes the page reachable from other machines)")
    parser.add_argument("--port", type=number(int, 1), default=7860, help="port to serve on")
    parser.add_argument("--class_names", nargs="+", default=None,
                        help="class names, in class-id order (for a raw checkpoint that stores none)")
    parser.add_argument("--max_upload_mb", type=number(float, 0, strict=True, maximum=MAX_UPLOAD_MB),
                        default=Limits.max_upload_mb, help="largest video the page accepts, in MB (fractions allowed)")
    parser.add_argument("--max_seconds", type=number(float, 0, strict=True), default=Limits.max_seconds,
                        help="longest video the page accepts, in seconds")
    parser.add_argument("--concurrency", type=number(int, 1), default=None,
                        help="requests predicted at once; others wait in the queue (default: 1 on cpu, 2 on cuda)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto = fp16 autocast on cuda, bf16 on a CPU with native bf16, else fp32")
    parser.add_argument("--examples_dir", default=None,
                        help="where the sample example clips are made once "
                             "(default: $XDG_CACHE_HOME/star/app_examples, else ~/.cache/star/app_examples)")
    return parser


def default_cache_dir() -> pathlib.Path:
    """The user's cache folder for the example clips."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "star" / "app_examples"


def load_app(args, device, dtype, work_dir) -> tuple[DemoApp, pathlib.Path | None]:
    """The DemoApp with the model of ``--model_path`` (or demo.sh's), or without one and the reason."""
    limits = Limits(args.max_upload_mb, args.max_seconds)
    batch = 8 if device.type == "cuda" else 1
    model_path = pathlib.Path(args.model_path) if args.model_path else DEFAULT_MODEL
    if args.model_path is None and not model_path.is_file():
        log.warning("%s", NO_MODEL_LINE)
        return DemoApp(None, None, device, dtype, work_dir, limits, batch_size=batch), None
    net, desc = inference.load_model(model_path, device, args.class_names)
    return DemoApp(net, desc, device, dtype, work_dir, limits, batch_size=batch), model_path


def serve_until_stopped(page, app: DemoApp, host: str, port: int, allowed) -> str:
    """Serve ``page`` until Ctrl-C or SIGTERM (what ``kill`` and service managers send), then close the server;
    returns which one stopped it. SIGTERM would otherwise end the process at once, and neither atexit nor any
    ``finally`` would remove the request folders."""
    stop = threading.Event()
    reason = []

    def handler(signum, _frame):
        reason.append("interrupted" if signum == signal.SIGINT else "terminated")
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launch(page, app, host, port, allowed, block=False)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        page.close()
    return reason[0]


def main(args) -> int:
    """Load the model once, make the examples, serve the page until interrupted or terminated; the request folders
    are removed either way."""
    setup_logging()
    if args.examples_dir:   # the default cache folder may be unwritable: the page then goes without samples
        writable_dir(args.examples_dir, "--examples_dir")
    device = resolve_device(args.device)
    dtype, precision_note = autocast_settings(device, args.precision)
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix="star_app_"))
    try:
        app, model_path = load_app(args, device, dtype, work_dir)
        cache_dir = pathlib.Path(args.examples_dir) if args.examples_dir else default_cache_dir()
        examples = collect_examples(cache_dir)
        concurrency = args.concurrency or (2 if device.type == "cuda" else 1)
        log.info("%s; %d example(s); at most %d request(s) at once", precision_note, len(examples), concurrency)
        page = build_ui(app, examples, model_path, concurrency)
        # only what the page shows: the request folders and the example videos, not the rest of their folders
        how = serve_until_stopped(page, app, args.host, args.port, [work_dir, *(path for path, _ in examples)])
        log.info("%s: server closed, request files removed", how)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def cli(argv=None) -> int:
    return run_cli(main, get_args_parser().parse_args(argv), errors=(checkpoint.CheckpointError,))


if __name__ == "__main__":
    sys.exit(cli())
