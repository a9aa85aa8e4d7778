"""Faults in app.py, the web demo: an unwritable examples folder, fractional or absurd ``--max_upload_mb``, clean-up
of every request's files (after each request and on SIGTERM), and only the example videos served from the examples
folder. A tiny STAR (4 frames, 64 px) keeps it fast; the server tests bind 127.0.0.1 only and are bounded in time."""
from __future__ import annotations

import contextlib
import io
import pathlib
import socket

import pytest
import torch

import app
import inference


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoadCalled(Exception):
    """Raised by a stand-in model loader: the CLI went on to load the model."""


def refuse_load(*_args, **_kwargs):
    raise LoadCalled("the model was loaded")


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
    demo = app.DemoApp(None, None, torch.device("cpu"), None, tmp_path / "work", app.Limits(args.max_upload_mb))
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
