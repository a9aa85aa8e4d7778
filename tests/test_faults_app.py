"""Faults in app.py, the web demo: an unwritable examples folder, fractional or absurd ``--max_upload_mb``, clean-up
of every request's files (after each request and on SIGTERM), and only the example videos served from the examples
folder. A tiny STAR (4 frames, 64 px) keeps it fast; the server tests bind 127.0.0.1 only and are bounded in time."""
from __future__ import annotations

import contextlib
import io
import pathlib

import pytest

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
