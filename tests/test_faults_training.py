"""main.py and the dataset loading (records.py, labels.py) under faults and bad input (issue "Faults, bad input"):
a run killed before its first checkpoint, a second run into an old output folder, temporary files left by a kill, a
full disk, an unwritable output folder, a dataset of many missing files, and track ids that do not fit in 64 bits.

Training runs use test_train's tiny network and settings (a few seconds each)."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import files
import main
from records import CSV_NAME, load_dataset
from test_train import TINY_ARGS, log_text, read_rows, run_main, sample_data, tiny_net  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
ONE_EPOCH = ("--epochs", "1")


def error_lines(output_dir) -> list[str]:
    """The ``error:`` lines of a run's train.log (timestamp dropped)."""
    return [line.split(" ", 1)[1] for line in log_text(output_dir).splitlines() if " error: " in line]


# ----------------------------------------------------------------------------- results of one run only


def test_resume_after_a_kill_before_the_first_checkpoint_starts_a_fresh_results_file(sample_data, tmp_path, tiny_net,
                                                                                      monkeypatch):
    """Killed after epoch 1's row and best model but before checkpoint.pth: --resume starts from scratch, and the
    earlier attempt's rows, best model and report do not mix into the new run's."""
    out = tmp_path / "killed"

    def killed(ckpt, path):
        if Path(path).name == "checkpoint.pth":
            raise KeyboardInterrupt   # SIGKILL at the first checkpoint write
        real_save(ckpt, path)
    real_save = checkpoint.save_checkpoint
    monkeypatch.setattr(main, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run_main(sample_data, out, *ONE_EPOCH)
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1"]
    assert (out / "best_model.pth").exists() and not (out / "checkpoint.pth").exists()
    (out / "val_metrics.json").write_text('{"stale": true}')   # what a finished earlier attempt would leave
    monkeypatch.setattr(main, "save_checkpoint", real_save)

    assert run_main(sample_data, out, "--resume", "--epochs", "2") == 0
    assert "starting from scratch" in log_text(out)
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1", "2"]
    assert "stale" not in json.loads((out / "val_metrics.json").read_text())
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"] == 1


def logged_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_new_run_into_an_old_output_folder_is_refused_naming_resume_and_overwrite(sample_data, tmp_path, tiny_net,
                                                                                     caplog):
    out = tmp_path / "old"
    assert run_main(sample_data, out, *ONE_EPOCH) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    caplog.clear()
    assert run_main(sample_data, out, *ONE_EPOCH) == 2
    (line,) = logged_errors(caplog)
    assert "--resume" in line and "--overwrite" in line and str(out) in line, line
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before   # nothing of the old run touched, log included


def test_the_refusal_is_one_line_on_stderr(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "training_results.csv").write_text("epoch\n1\n")
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--input_dir", str(tmp_path / "none"),
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: --output_dir {out} holds a previous run"), \
        proc.stderr


def test_overwrite_replaces_only_the_previous_runs_own_outputs(sample_data, tmp_path, tiny_net):
    out = tmp_path / "old"
    assert run_main(sample_data, out, *ONE_EPOCH) == 0
    (out / "my_notes.txt").write_text("keep me")
    (out / "clips").mkdir()
    (out / "clips" / "a.mp4").write_bytes(b"mine")
    assert run_main(sample_data, out, "--epochs", "2", "--overwrite") == 0
    assert [r["epoch"] for r in read_rows(out / "training_results.csv")] == ["1", "2"]
    assert (out / "my_notes.txt").read_text() == "keep me" and (out / "clips" / "a.mp4").read_bytes() == b"mine"
    log = log_text(out)
    assert "--overwrite: removed the previous run's" in log and log.count("STAR: ") == 1   # train.log: this run only


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(SystemExit) as exit_:
        main.get_args_parser().parse_args(["--input_dir", "d", "--output_dir", "o", "--resume", "--overwrite"])
    assert exit_.value.code == 2
    assert "--overwrite" in main.get_args_parser().format_help()


def test_overwrite_keeps_the_checkpoint_it_fine_tunes_from(sample_data, tmp_path, tiny_net, caplog):
    out = tmp_path / "old"
    assert run_main(sample_data, out, *ONE_EPOCH) == 0
    caplog.clear()
    assert run_main(sample_data, out, *ONE_EPOCH, "--overwrite", "--init_from", str(out / "best_model.pth")) == 2
    assert (out / "best_model.pth").is_file() and (out / "training_results.csv").is_file()
    (line,) = logged_errors(caplog)
    assert line.startswith(f"error: --init_from {out / 'best_model.pth'}: a previous run's output"), line


def test_temporary_checkpoints_left_by_a_kill_are_removed_by_the_next_run(sample_data, tmp_path, tiny_net):
    out = tmp_path / "tmpfiles"
    out.mkdir()
    left = [out / ".checkpoint.pth.k3j4_2xq.tmp", out / ".best_model.pth.ab_cd123.tmp",
            out / ".training_results.csv.zz9y8x7w.tmp"]
    for path in left:
        path.write_bytes(b"\0" * 1000)
    (out / ".mine.tmp").write_text("not STAR's")
    assert run_main(sample_data, out, *ONE_EPOCH) == 0
    assert not any(path.exists() for path in left) and (out / ".mine.tmp").exists()
    assert "removed 3 temporary file(s) left by an interrupted write" in log_text(out)


# ----------------------------------------------------------------------------- full disk, unwritable folder


def test_a_full_disk_while_writing_the_checkpoint_says_so_and_keeps_the_last_good_one(sample_data, tmp_path, tiny_net,
                                                                                   monkeypatch):
    """The file fills the disk in the middle of torch.save (torch reports that as an 'unexpected pos' RuntimeError)."""
    out = tmp_path / "full"
    writes = {"checkpoint.pth": 0}
    real_atomic_write = files.atomic_write

    class FullDisk:
        """A file whose writes fail with ENOSPC after its first 1000 bytes."""
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def atomic_write(path, *args, **kwargs):
        writes[Path(path).name] = writes.get(Path(path).name, 0) + 1
        context = real_atomic_write(path, *args, **kwargs)
        if Path(path).name != "checkpoint.pth" or writes["checkpoint.pth"] < 2:
            return context
        return _wrapped(context, FullDisk)

    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    assert run_main(sample_data, out, "--epochs", "2") == 2
    (line,) = error_lines(out)
    assert "disk is full" in line and str(out / "checkpoint.pth") in line, line
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"] == 0   # epoch 1's
    assert not list(out.glob(".*.tmp"))


@contextlib.contextmanager
def _wrapped(context, wrapper):
    """Yield ``wrapper(f)`` for the ``f`` of ``context``."""
    with context as f:
        yield wrapper(f)


def test_a_full_disk_while_writing_the_results_table_says_so(sample_data, tmp_path, tiny_net, monkeypatch):
    out = tmp_path / "full"

    def append_results(path, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(main, "append_results", append_results)
    assert run_main(sample_data, out, *ONE_EPOCH) == 2
    (line,) = error_lines(out)
    assert "disk is full" in line and "training_results.csv" in line, line


def test_an_output_dir_under_a_regular_file_is_one_line_exit_2(sample_data, tmp_path, tiny_net, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "out", blocker):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="star"):
            assert run_main(sample_data, out, *ONE_EPOCH) == 2
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        message = record.getMessage()
        assert message.startswith(f"error: --output_dir {out}: cannot write there") and "\n" not in message, message
    assert blocker.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_dir_is_one_line_exit_2(sample_data, tmp_path, tiny_net, caplog):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with caplog.at_level(logging.ERROR, logger="star"):
            assert run_main(sample_data, out, *ONE_EPOCH) == 2
        assert any("cannot write there" in r.getMessage() for r in caplog.records)
    finally:
        out.chmod(0o700)


# ----------------------------------------------------------------------------- bad data


def many_missing_rows(root: Path, count: int) -> None:
    """Append ``count`` rows naming videos that do not exist to the dataset's CSV."""
    with open(root / CSV_NAME, "a") as f:
        f.writelines(f"gone/video_{k:06d}.mp4,\n" for k in range(count))


def test_many_missing_videos_are_summarised_and_listed_in_a_file(sample_data, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    many_missing_rows(data, 20000)
    out = tmp_path / "out"
    out.mkdir()
    args = main.get_args_parser().parse_args(["--input_dir", str(data), "--output_dir", str(out), *TINY_ARGS])
    with caplog.at_level(logging.WARNING, logger="star"):
        train, val, _ = main.load_data(args, 0, out)
    assert len(train) + len(val) == 10
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert len(logged.splitlines()) < 20, logged[:2000]
    assert "19995 more" in logged and str(out / "dataset_problems.txt") in logged
    listed = (out / "dataset_problems.txt").read_text()
    assert all(f"gone/video_{k:06d}.mp4" in listed for k in (0, 12345, 19999))


def test_a_dataset_of_missing_videos_only_is_summarised_and_exit_2(tmp_path, tiny_net):
    data = tmp_path / "data"
    data.mkdir()
    (data / CSV_NAME).write_text("video_file,label_file\n")
    many_missing_rows(data, 3000)
    out = tmp_path / "out"
    assert run_main(data, out, *ONE_EPOCH) == 2
    log = log_text(out)
    assert len(log.splitlines()) < 30 and "no usable videos" in log and "2995 more" in log
    assert len((out / "dataset_problems.txt").read_text().splitlines()) == 3000 + 3   # header, columns, rule


def test_a_track_id_beyond_64_bits_is_a_malformed_line_in_the_dataset_check(sample_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    rows = (data / CSV_NAME).read_text().splitlines()
    video = next(r.split(",")[0] for r in rows[1:])
    (data / "tracks.txt").write_text("0 1 0 2 2 30 30\n1 99999999999999999999999 0 2 2 30 30\n"
                                     "2 1 18446744073709551616 2 2 30 30\n")
    (data / CSV_NAME).write_text("video_file,label_file\n" + f"{video},tracks.txt\n")
    records, _, problems = load_dataset(data)
    found = {p.line: p.message for p in problems if p.file == "tracks.txt"}
    assert set(found) == {2, 3}, found
    assert all("malformed label line" in m and "64 bits" in m for m in found.values()), found
    (record,) = records
    assert [t.frames.tolist() for t in record.tracks] == [[0]]
