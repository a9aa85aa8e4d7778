"""tools/transcode_videos.py: a dataset copied at a lower height (boxes scaled with the frames) or as JPEG frame folders
(labels unchanged) loads as the same dataset: same videos, frame counts, tracks and normalised boxes."""
from __future__ import annotations

import numpy as np
import pytest

from records import load_dataset
from synthetic_data import make_sample_dataset
from tools import transcode_videos


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("source")
    make_sample_dataset(folder, num_videos=3, num_frames=30, width=160, height=120, per_frame=True, seed=3)
    return folder


@pytest.mark.parametrize("flags", [["--height", "60"], ["--frames"]], ids=["lower-height", "frame-folders"])
def test_a_transcoded_dataset_loads_as_the_same_dataset(source, tmp_path, flags):
    out = tmp_path / "copy"
    rc = transcode_videos.main(transcode_videos.get_args_parser().parse_args([str(source), "--output", str(out), *flags]))
    assert rc == 0
    before, _, problems_before = load_dataset(source)
    after, _, problems_after = load_dataset(out)
    assert len(after) == len(before) == 3
    assert [p.message for p in problems_after] == [p.message for p in problems_before]
    for a, b in zip(sorted(after, key=lambda r: r.video), sorted(before, key=lambda r: r.video)):
        assert a.num_frames == b.num_frames and len(a.tracks) == len(b.tracks)
        if flags == ["--frames"]:
            assert (out / a.video).is_dir()
        else:
            assert a.height == 60
        for ta, tb in zip(a.tracks, b.tracks):   # normalised boxes: the same to rounding (2 decimals of a pixel)
            np.testing.assert_allclose(np.asarray(ta.boxes), np.asarray(tb.boxes), atol=0.02)


def test_a_missing_source_is_one_line(tmp_path, capsys):
    rc = transcode_videos.main(transcode_videos.get_args_parser().parse_args([str(tmp_path / "nope.mp4"), "--output",
                                                                              str(tmp_path / "x.mp4")]))
    assert rc == 2 and capsys.readouterr().err.startswith("error: ")
