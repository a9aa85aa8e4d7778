"""tools/import_annotations.py and annotations.py on hostile input (issue "Faults, bad input"): numbers that
overflow, names longer than the file system allows, boxes that are not finite. Each is one line naming the file
(and line) with exit 2, or a skipped video with a line, never a traceback or a label file of garbage."""
from __future__ import annotations

import pathlib

import pytest

import annotations as ann
from conftest import numbered_frames, write_video
from tools import import_annotations as tool


def run_tool(capsys, *argv) -> tuple[int, str, str]:
    code = tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def videos(tmp_path) -> pathlib.Path:
    """videos/vidA.mp4: 8 frames at 2 fps (64x48)."""
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "vidA.mp4", numbered_frames(8), fps=2)
    return folder


def import_ava(capsys, tmp_path, videos, text: str):
    (tmp_path / "a.csv").write_text(text)
    return run_tool(capsys, "--format", "ava", "--annotations", tmp_path / "a.csv", "--videos", videos,
                    "--output_dir", tmp_path / "ds", "--ava_offset", "0")


# ---------------------------------------------------------------------------- AVA


@pytest.mark.parametrize("row, reason", [
    ("vidA,1e308,0,0,1,1,5,7", "is not a second of a video"),                      # OverflowError when made a frame number
    ("vidA,1,0,0,1e308,1,5,7", "not normalised"),                  # x2 * width: inf in the label file
    ("vidA,1,0,0,1,1,5,99999999999999999999999", "64 bits"),       # a person id no training target holds
])
def test_ava_numbers_out_of_range_are_one_line_naming_file_and_line(capsys, tmp_path, videos, row, reason):
    code, out, err = import_ava(capsys, tmp_path, videos, f"vidA,1,0,0,1,1,5,7\n{row}\n")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path / 'a.csv'}: line 2: ") and reason in err, err
    assert not (tmp_path / "ds" / "labels").exists()


def test_an_ava_video_id_longer_than_a_file_name_is_skipped_with_a_line(capsys, tmp_path, videos):
    long_ids = ["x" * 300, "a/" + "y" * 5000, "b/" * 2100 + "vidZ"]   # a name past NAME_MAX; a path past PATH_MAX
    rows = "".join(f"{key},1,0,0,1,1,5,7\n" for key in long_ids)
    code, out, err = import_ava(capsys, tmp_path, videos, "vidA,1,0,0,1,1,5,7\n" + rows)
    assert code == 0, err
    assert "wrote 1 videos" in out and "3 annotated video(s) skipped" in out
    skipped = [line for line in out.splitlines() if "no video of that name" in line]
    assert len(skipped) == 3 and all(len(line) < 300 for line in skipped), skipped


def test_a_long_video_id_whose_video_exists_gets_a_label_file_name_that_fits(capsys, tmp_path, videos):
    key = "z" * 300 + "/vidA"          # found by its last part; its folder name is longer than a file name can be
    code, out, err = import_ava(capsys, tmp_path, videos, f"{key},1,0,0,1,1,5,7\n")
    assert code == 0, err
    (label,) = (tmp_path / "ds" / "labels").rglob("*.txt")
    assert label.read_text() == "2 7 5 0 0 64 48\n"
    assert all(len(part.encode()) <= 255 for part in label.relative_to(tmp_path).parts)


# ---------------------------------------------------------------------------- CVAT


def cvat_xml(box: str) -> str:
    return ('<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version><meta><task>'
            "<labels><label><name>walk</name></label></labels><source>vidA.mp4</source></task></meta>"
            f'<track id="3" label="walk"><box frame="0" outside="0" xtl="1" ytl="2" xbr="20" ybr="30"/>{box}'
            "</track></annotations>")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_a_cvat_box_that_is_not_finite_is_refused_naming_file_track_and_frame(capsys, tmp_path, videos, value):
    xml = tmp_path / "vidA.xml"
    xml.write_text(cvat_xml(f'<box frame="1" outside="0" xtl="1" ytl="{value}" xbr="20" ybr="30"/>'))
    code, out, err = run_tool(capsys, "--format", "cvat", "--annotations", xml, "--videos", videos,
                              "--output_dir", tmp_path / "ds")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {xml}: track 3: the <box> at frame 1 ") and "finite" in err, err
    assert not (tmp_path / "ds" / "labels").exists()


def test_a_cvat_track_id_beyond_64_bits_is_refused(tmp_path):
    xml = tmp_path / "vidA.xml"
    xml.write_text(cvat_xml("").replace('id="3"', 'id="99999999999999999999999"'))
    with pytest.raises(ann.FormatError, match="64 bits"):
        ann.read_cvat([xml])


def test_a_label_file_path_longer_than_the_file_system_takes_skips_that_video(capsys, tmp_path, videos):
    key = "c/" * 2100 + "vidA"           # found by its last part; labels/c/c/.../vidA.txt is past PATH_MAX
    code, out, err = import_ava(capsys, tmp_path, videos, f"vidA,1,0,0,1,1,5,7\n{key},1,0,0,1,1,5,7\n")
    assert code == 0, err
    assert "its label file's path is longer than the file system takes; skipped" in out
    assert "wrote 1 videos" in out and "1 annotated video(s) skipped" in out
