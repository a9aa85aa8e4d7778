"""Tests for tools/import_annotations.py and annotations.py: small files in each format written here."""
from __future__ import annotations

import csv
import os
import pathlib
import pickle
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest

import annotations as ann
from conftest import ROOT, numbered_frames, write_video
from labels import parse_label_file
from records import _resolve, load_dataset
from tools import import_annotations as tool


def run_tool(capsys, *argv) -> tuple[int, str, str]:
    code = tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_dataset(root: pathlib.Path) -> dict[str, list[str]]:
    """{video_file: label lines} of a written dataset; checks each video path resolves as records.py does."""
    with (root / "action_challenge.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["video_file", "label_file"]
    out = {}
    for video_file, label_file in rows[1:]:
        assert _resolve(root, video_file).exists(), video_file
        out[video_file] = (root / label_file).read_text().splitlines()
    return out


# ---------------------------------------------------------------------------- pickles


def py2_pickle(obj) -> bytes:
    """Protocol-2 bytes as Python 2 wrote them: str as BINSTRING, numpy arrays through
    numpy.core.multiarray._reconstruct with the raw data as a byte string (what ACT/YOWO distribute)."""
    out = bytearray(b"\x80\x02")

    def s(b: bytes):
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)

    def emit(o):
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, tuple):
            out.extend(b"(")
            for v in o:
                emit(v)
            out.extend(b"t")
        elif isinstance(o, str):
            s(o.encode("latin1"))
        elif isinstance(o, bool) or o is None:
            out.extend({True: b"\x88", False: b"\x89", None: b"N"}[o])
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, np.ndarray):
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(J\x00\x00\x00\x00t")
            s(b"b")
            out.extend(b"tR(J\x01\x00\x00\x00")
            emit(tuple(o.shape))
            out.extend(b"cnumpy\ndtype\n(")
            s(o.dtype.str[1:].encode())
            out.extend(b"J\x00\x00\x00\x00J\x01\x00\x00\x00tR(J\x03\x00\x00\x00")
            s(b"<")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffJ\x00\x00\x00\x00tb\x89")
            s(np.ascontiguousarray(o).astype(o.dtype.newbyteorder("<")).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


BASKET, BIKING, MISSING = "Basketball/v_Basketball_g01_c01", "Biking/v_Biking_g01_c01", "Biking/v_Biking_g02_c01"


def act_gt() -> dict:
    """A tiny UCF101v2-GT.pkl: 1-based frames, two videos with frames on disk, one without."""
    return {
        "labels": ["Basketball", "Biking"],
        "gttubes": {
            BASKET: {0: [np.array([[1, 10, 12, 40, 44], [2, 11, 12, 41, 44], [3, 12, 13, 42, 45]], np.float32)]},
            BIKING: {1: [np.array([[2, 0, 0, 20, 30], [3, 1, 0, 21, 30]], np.float64),
                         np.array([[4, 30, 5, 60, 40]], np.float64)]},
            MISSING: {1: [np.array([[1, 0, 0, 5, 5]], np.float64)]},
        },
        "nframes": {BASKET: 5, BIKING: 5, MISSING: 5},
        "resolution": {BASKET: (48, 64), BIKING: (48, 64), MISSING: (48, 64)},
        "train_videos": [[BASKET]],
        "test_videos": [[BIKING, MISSING]],
    }


EXPECTED_ACT = {
    BASKET: ["0 0 0 10 12 40 44", "1 0 0 11 12 41 44", "2 0 0 12 13 42 45"],
    BIKING: ["1 0 1 0 0 20 30", "2 0 1 1 0 21 30", "3 1 1 30 5 60 40"],
}


@pytest.fixture
def frame_folders(tmp_path):
    """rgb-images/<class>/<video>/00001.jpg ... (5 frames of 64x48), the UCF101-24/JHMDB layout."""
    root = tmp_path / "rgb-images"
    for key in (BASKET, BIKING):
        folder = root / key
        folder.mkdir(parents=True)
        for i, frame in enumerate(numbered_frames(5), start=1):
            cv2.imwrite(str(folder / f"{i:05d}.jpg"), frame)
    return root


@pytest.mark.parametrize("kind", ["py2", "protocol2", "protocol4", "protocol5"])
def test_act_pickle_all_protocols(tmp_path, frame_folders, capsys, kind):
    gt = act_gt()
    data = py2_pickle(gt) if kind == "py2" else pickle.dumps(gt, protocol=int(kind[-1]))
    if kind == "protocol2":
        assert b"_codecs" in data  # Python 3 protocol 2 passes array bytes through _codecs.encode
    pkl = tmp_path / "UCF101v2-GT.pkl"
    pkl.write_bytes(data)
    out_dir = tmp_path / "ds"
    code, out, err = run_tool(capsys, "--format", "ucf24", "--annotations", pkl, "--videos", frame_folders,
                              "--output_dir", out_dir)
    assert code == 0, err
    assert f"{MISSING}: no video of that name" in out
    assert "wrote 2 videos, 6 label lines, 2 classes" in out and "1 annotated video(s) skipped" in out
    written = read_dataset(out_dir)
    assert sorted(written) == sorted(str(frame_folders / k) for k in EXPECTED_ACT)  # the folders, not copies
    assert {k: written[str(frame_folders / k)] for k in EXPECTED_ACT} == EXPECTED_ACT
    assert (out_dir / "classes.txt").read_text() == "Basketball\nBiking\n"


def test_act_pickle_split(tmp_path, frame_folders, capsys):
    pkl = tmp_path / "JHMDB-GT.pkl"
    pkl.write_bytes(pickle.dumps(act_gt(), protocol=4))
    code, out, _ = run_tool(capsys, "--format", "jhmdb", "--annotations", pkl, "--videos", frame_folders,
                            "--output_dir", tmp_path / "train", "--split", "train")
    assert code == 0 and "wrote 1 videos, 3 label lines, 1 classes" in out
    assert (tmp_path / "train" / "classes.txt").read_text() == "Basketball\n"
    code, _, err = run_tool(capsys, "--format", "jhmdb", "--annotations", pkl, "--videos", frame_folders,
                            "--output_dir", tmp_path / "s2", "--split", "test", "--split_number", "2")
    assert code == 2 and "no test split 2 in 'test_videos' (1 split(s))" in err


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, frame_folders, capsys):
    marker = tmp_path / "ran"
    for name, payload in (("evil2.pkl", 2), ("evil5.pkl", 5)):
        gt = act_gt()
        gt["labels"] = _Evil(f"touch {marker}")
        pkl = tmp_path / name
        pkl.write_bytes(pickle.dumps(gt, protocol=payload))
        code, out, err = run_tool(capsys, "--format", "ucf24", "--annotations", pkl, "--videos", frame_folders,
                                  "--output_dir", tmp_path / "ds")
        assert code == 2 and out == ""
        names = f"{os.system.__module__}.system"  # posix.system
        assert err.strip() == f"error: {pkl}: refused: the pickle names {names}, which is not data"
    assert not marker.exists()
    assert not (tmp_path / "ds" / "action_challenge.csv").exists()
    with pytest.raises(ann.FormatError, match="names builtins.eval"):
        evil = tmp_path / "eval.pkl"
        evil.write_bytes(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
        ann.load_data_pickle(evil)


@pytest.mark.parametrize("fmt,content,message", [
    ("ucf24", b"video_file,label_file\nx.mp4,\n", "not a pickle"),
    ("jhmdb", pickle.dumps([1, 2], protocol=2), "not an ACT/YOWO ground-truth pickle (no 'gttubes' dict; found list)"),
    ("ucf24", pickle.dumps({"gttubes": {"v": {"x": [1]}}}), "not an ACT/YOWO ground-truth pickle (ValueError"),
    ("ucf24", pickle.dumps({"gttubes": {"v": {0: [[[0, 1, 2, 3, 4]]]}}}), "a tube is not an (n, 5) array of 1-based"),
    ("ava", b"<annotations><track/></annotations>\n", "line 1: not an AVA v2.x CSV row"),
    ("ava", b"\x80\x02\xff\xfe", "not an AVA v2.x CSV"),
    ("cvat", b"vid,902,0.1,0.1,0.2,0.2,1,0\n", "not a CVAT for video 1.1 XML file"),
    ("cvat", b"<annotations><image id='0' name='a.jpg'/></annotations>", "'CVAT for images' export"),
    ("cvat", b"<coco/>", "root element <coco>"),
])
def test_wrong_format_is_one_line_exit_2(tmp_path, capsys, fmt, content, message):
    bad = tmp_path / "annotations.bin"
    bad.write_bytes(content)
    code, out, err = run_tool(capsys, "--format", fmt, "--annotations", bad, "--videos", tmp_path,
                              "--output_dir", tmp_path / "ds")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: ") and message in err, err


def test_cli_runs_as_a_script(tmp_path):
    bad = tmp_path / "x.xml"
    bad.write_text("not xml at all")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "import_annotations.py"), "--format", "cvat",
                           "--annotations", str(bad), "--videos", str(tmp_path), "--output_dir", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {bad}: not a CVAT for video 1.1 XML file")


# ---------------------------------------------------------------------------- AVA


AVA_CSV = """\
vidA,0902,0.1,0.2,0.5,0.9,12,0
vidA,0902,0.1,0.2,0.5,0.9,17,0
vidA,0903,0.5,0.1,0.9,0.6,12,1
vidA,0903,0.15,0.2,0.55,0.9,12,0
vidA,0903,0.15,0.2,0.55,0.9,99,0
vidB,0902,0.1,0.1,0.2,0.2,12,3
"""
AVA_PBTXT = 'label {\n  name: "stand"\n  label_id: 12\n  label_type: PERSON_MOVEMENT\n}\n' \
            'item {\n  name: "talk to (e.g., self, a person, a group)"\n  id: 17\n}\n'


def test_ava_normalised_boxes_1fps_several_actions(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "vidA.mp4", numbered_frames(8), fps=2)  # 4 s, a 15-minute clip's start: offset 900
    (tmp_path / "train.csv").write_text(AVA_CSV)
    (tmp_path / "actions.pbtxt").write_text(AVA_PBTXT)
    code, out, err = run_tool(capsys, "--format", "ava", "--annotations", tmp_path / "train.csv", "--videos", videos,
                              "--output_dir", tmp_path / "ds", "--label_map", tmp_path / "actions.pbtxt")
    assert code == 0, err
    assert "1 rows of action ids not in --label_map skipped (99)" in out and "vidB: no video" in out
    assert "wrote 1 videos, 4 label lines, 2 classes" in out
    (lines,) = read_dataset(tmp_path / "ds").values()
    # (t - 900) * 2 fps; x * 64, y * 48; person 0 does two actions at 902: two lines, one box
    assert lines == ["4 0 12 6.4 9.6 32 43.2", "4 0 17 6.4 9.6 32 43.2",
                     "6 0 12 9.6 9.6 35.2 43.2", "6 1 12 32 4.8 57.6 28.8"]
    names = (tmp_path / "ds" / "classes.txt").read_text().splitlines()
    assert names == ["stand", "talk to (e.g., self, a person, a group)"]


def test_ava_offset_and_frames_past_the_end(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "vidA.mp4", numbered_frames(8), fps=2)
    (tmp_path / "a.csv").write_text("vidA,1,0,0,1,1,5,7\nvidA,3.5,0,0,0.5,0.5,5,7\nvidA,9,0,0,1,1,5,7\n")
    code, out, _ = run_tool(capsys, "--format", "ava", "--annotations", tmp_path / "a.csv", "--videos", videos,
                            "--output_dir", tmp_path / "ds", "--ava_offset", "0")
    assert code == 0 and "vidA: 1 line(s) outside its 8 frames dropped" in out
    (lines,) = read_dataset(tmp_path / "ds").values()
    assert lines == ["2 7 5 0 0 64 48", "7 7 5 0 0 32 24"]
    assert (tmp_path / "ds" / "classes.txt").read_text() == "action_5\n"
    with pytest.raises(SystemExit):
        tool.main(["--format", "ava", "--annotations", "a", "--videos", "v", "--output_dir", "o", "--ava_offset", "x"])


def test_label_map_variants(tmp_path):
    (tmp_path / "a.pbtxt").write_text(AVA_PBTXT)
    assert ann.read_label_map(tmp_path / "a.pbtxt") == {12: "stand", 17: "talk to (e.g., self, a person, a group)"}
    (tmp_path / "b.txt").write_text("# comment\nrun\nwalk\n")
    assert ann.read_label_map(tmp_path / "b.txt") == {0: "run", 1: "walk"}
    (tmp_path / "c.txt").write_text("3 jump rope\n7 walk\n")
    assert ann.read_label_map(tmp_path / "c.txt") == {3: "jump rope", 7: "walk"}
    (tmp_path / "d.pbtxt").write_text("item { name: 'x' }\n")
    with pytest.raises(ann.FormatError, match="needs a name and an integer id"):
        ann.read_label_map(tmp_path / "d.pbtxt")


# ---------------------------------------------------------------------------- CVAT


def cvat_xml(source: str | None, tracks: str, labels=("walk", "run", "wave")) -> str:
    label_xml = "".join(f"<label><name>{n}</name><type>rectangle</type></label>" for n in labels)
    src = f"<source>{source}</source>" if source else ""
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version><meta><task><id>1</id>'
            f"<mode>interpolation</mode><labels>{label_xml}</labels><original_size><width>64</width>"
            f"<height>48</height></original_size>{src}</task></meta>{tracks}</annotations>")


def box(frame, x, outside=0, keyframe=1):
    return (f'<box frame="{frame}" keyframe="{keyframe}" outside="{outside}" occluded="0" xtl="{x}.00" '
            f'ytl="2.50" xbr="{x + 20}.00" ybr="30.00" z_order="0"><attribute name="a">b</attribute></box>')


STREET_TRACKS = (
    # walk: a full export (every frame, interpolated ones keyframe="0"), leaves at 3, re-enters at 6, leaves at 8
    '<track id="0" label="walk" source="manual">' + box(0, 1) + box(1, 2, keyframe=0) + box(2, 3, keyframe=0)
    + box(3, 3, outside=1) + box(6, 10) + box(7, 11, keyframe=0) + box(8, 11, outside=1) + "</track>"
    # run: keyframes only (0, 4), outside marker at 7: the box at 4 holds until frame 6
    + '<track id="5" label="run" source="manual">' + box(4, 20) + box(0, 5) + box(7, 20, outside=1) + "</track>"
    + '<track id="6" label="wave"><polygon frame="0" points="1,1;5,5;1,5" outside="0"/></track>'
)


def test_cvat_outside_reentry_keyframes(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "street.mp4", numbered_frames(20))
    write_video(videos / "clip2.mp4", numbered_frames(10))
    (tmp_path / "street.xml").write_text(cvat_xml("street.mp4", STREET_TRACKS))
    (tmp_path / "clip2.xml").write_text(cvat_xml("uploads/clip2.avi", '<track id="3" label="wave">' + box(9, 1)
                                                 + box(12, 1) + "</track>"))
    (tmp_path / "nosource.xml").write_text(cvat_xml(None, '<track id="0" label="walk">' + box(0, 1) + "</track>"))
    out_dir = videos / "dataset"  # inside the videos' folder: paths written relative to it
    code, out, err = run_tool(capsys, "--format", "cvat", "--annotations", tmp_path / "street.xml",
                              tmp_path / "clip2.xml", tmp_path / "nosource.xml", "--videos", videos,
                              "--output_dir", out_dir)
    assert code == 0, err
    assert "nosource: no video of that name" in out and "uploads/clip2.avi: 1 line(s) outside its 10 frames" in out
    assert "wrote 2 videos, 9 label lines, 3 classes" in out
    written = read_dataset(out_dir)
    assert set(written) == {str(videos / "street.mp4"), str(videos / "clip2.mp4")}
    # sorted label names: run 0, walk 1, wave 2
    assert written[str(videos / "street.mp4")] == [
        "0 0 1 1 2.5 21 30", "0 5 0 5 2.5 25 30", "1 0 1 2 2.5 22 30", "2 0 1 3 2.5 23 30",
        "4 5 0 20 2.5 40 30", "6 0 1 10 2.5 30 30", "6 5 0 20 2.5 40 30", "7 0 1 11 2.5 31 30"]
    assert written[str(videos / "clip2.mp4")] == ["9 3 2 1 2.5 21 30"]
    assert (out_dir / "classes.txt").read_text() == "run\nwalk\nwave\n"


def test_cvat_label_map_and_relative_paths(tmp_path, capsys):
    out_dir = tmp_path / "ds"
    (out_dir / "media").mkdir(parents=True)
    write_video(out_dir / "media" / "street.mp4", numbered_frames(20))
    (tmp_path / "street.xml").write_text(cvat_xml("street.mp4", STREET_TRACKS))
    (tmp_path / "map.txt").write_text("4 walk\n")
    code, out, _ = run_tool(capsys, "--format", "cvat", "--annotations", tmp_path / "street.xml", "--videos",
                            out_dir / "media", "--output_dir", out_dir, "--label_map", tmp_path / "map.txt")
    assert code == 0 and "labels not in --label_map, their tracks skipped: run, wave" in out
    written = read_dataset(out_dir)
    assert list(written) == ["media/street.mp4"]  # inside the dataset: relative, so the folder can move
    assert [ln.split()[:3] for ln in written["media/street.mp4"]] == [["0", "0", "4"], ["1", "0", "4"], ["2", "0", "4"],
                                                                      ["6", "0", "4"], ["7", "0", "4"]]
    assert (out_dir / "classes.txt").read_text() == "walk\n"
    assert (out_dir / "labels" / "street.txt").is_file()


def test_no_video_at_all_is_exit_2(tmp_path, capsys):
    (tmp_path / "a.xml").write_text(cvat_xml("gone.mp4", '<track id="0" label="walk">' + box(0, 1) + "</track>"))
    code, out, err = run_tool(capsys, "--format", "cvat", "--annotations", tmp_path / "a.xml", "--videos", tmp_path,
                              "--output_dir", tmp_path / "ds")
    assert code == 2 and "gone.mp4: no video" in out
    assert err.strip() == f"error: nothing written: none of the 1 annotated videos was found in {tmp_path}"


def test_unreadable_video_is_skipped_with_a_line(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "broken.mp4").write_bytes(b"not a video")
    write_video(videos / "good.mp4", numbered_frames(3))
    for name in ("broken", "good"):
        track = '<track id="0" label="walk">' + box(0, 1) + "</track>"
        (tmp_path / f"{name}.xml").write_text(cvat_xml(f"{name}.mp4", track))
    code, out, _ = run_tool(capsys, "--format", "cvat", "--annotations", tmp_path / "broken.xml", tmp_path / "good.xml",
                            "--videos", videos, "--output_dir", tmp_path / "ds")
    assert code == 0 and f"broken.mp4: {videos / 'broken.mp4'} cannot be read (" in out
    assert "wrote 1 videos, 1 label lines, 1 classes" in out and "1 annotated video(s) skipped" in out


def test_written_dataset_loads(tmp_path, capsys):
    """End to end through records.load_dataset (needs its per-frame label parsing)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "street.mp4", numbered_frames(20))
    (tmp_path / "street.xml").write_text(cvat_xml("street.mp4", STREET_TRACKS))
    assert run_tool(capsys, "--format", "cvat", "--annotations", tmp_path / "street.xml", "--videos", videos,
                    "--output_dir", tmp_path / "ds")[0] == 0
    probe = tmp_path / "probe.txt"
    probe.write_text("0 0 1 1 2 21 30\n")
    if parse_label_file(probe, "probe.txt")[1]:
        pytest.skip("needs per-frame labels in labels.py")
    records, class_map, _ = load_dataset(tmp_path / "ds")
    assert len(records) == 1 and records[0].path == str(videos / "street.mp4")
    assert class_map.names == ["run", "walk"]
