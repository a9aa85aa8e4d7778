"""video.py: sampling indices, sequential decoding, bad files, windows, preprocessing; video_writer.py: writing;
drawing.py: boxes and labels."""
import fractions
import struct

import av
import numpy as np
import pytest
import torch

import drawing
import video
import video_writer
from conftest import frame_number, numbered_frames

CODECS = [("h264.mp4", "libx264"), ("mjpeg.avi", "mjpeg"), ("mpeg4.AVI", "mpeg4"),
          ("vp9.mkv", "libvpx-vp9"), ("raw.MOV", "rawvideo")]


def numbers(frames):
    return [frame_number(f) for f in frames]


def test_sample_indices_are_the_published_ones():
    for n, T in [(100, 16), (20, 8), (3, 8), (1, 4), (8, 8)]:
        assert np.array_equal(video.sample_indices(n, T), np.linspace(0, n - 1, T).astype(int))


@pytest.mark.parametrize("name,codec", CODECS)
def test_read_frames_returns_the_published_indices(make_video, name, codec):
    path = make_video(name, n=37, codec=codec)
    info = video.probe_video(path)
    assert (info.width, info.height, info.num_frames, info.fps) == (64, 48, 37, 25.0)
    frames, info2 = video.sample_clip(path, 8)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    assert numbers(frames) == video.sample_indices(37, 8).tolist()
    assert info2 == info


def test_read_frames_any_order_and_repeats(make_video):
    path = make_video(n=30)
    idx = [29, 0, 5, 5, 12, 0]
    assert numbers(video.read_frames(path, idx)) == idx


def test_one_sequential_pass(make_video, monkeypatch):
    path = make_video(n=30)
    calls = []
    real = video._iter_av_frames
    monkeypatch.setattr(video, "_iter_av_frames", lambda p: calls.append(p) or real(p))
    video.read_frames(path, [3, 10, 20, 25])
    assert len(calls) == 1


def test_short_video_repeats_frames(make_video):
    path = make_video(n=3)
    frames, info = video.sample_clip(path, 8)
    assert info.num_frames == 3
    assert numbers(frames) == [0, 0, 0, 0, 1, 1, 1, 2]  # linspace(0, 2, 8).astype(int)


def test_single_frame_video(make_video):
    frames, _ = video.sample_clip(make_video(n=1), 4)
    assert numbers(frames) == [0, 0, 0, 0]


def _lie_about_avi_count(path, count):
    """Overwrite the AVI header's frame counts (avih.dwTotalFrames, strh.dwLength)."""
    data = bytearray(path.read_bytes())
    avih, strh = data.find(b"avih"), data.find(b"strh")
    struct.pack_into("<I", data, avih + 8 + 16, count)
    struct.pack_into("<I", data, strh + 8 + 32, count)
    path.write_bytes(bytes(data))


def test_wrong_container_frame_count(make_video):
    path = make_video("lie.avi", n=20, codec="mjpeg")
    _lie_about_avi_count(path, 500)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 500  # the container lies ...
    assert video.probe_video(path).num_frames == 20  # ... the packet count does not
    frames, info = video.sample_clip(path, 8)
    assert numbers(frames) == video.sample_indices(20, 8).tolist()


def test_missing_container_count(make_video):
    path = make_video("nocount.mkv", n=21)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # Matroska stores no frame count
    assert video.probe_video(path).num_frames == 21


def test_stream_shorter_than_probe(make_video, monkeypatch):
    """If decoding ends before the expected count, indices are re-derived from the true count."""
    path = make_video(n=20)
    real = video.probe_video
    monkeypatch.setattr(video, "probe_video", lambda p, **k: video.VideoInfo(64, 48, 50, 25.0, 2.0))
    frames, info = video.sample_clip(path, 8)
    assert info.num_frames == 20
    assert numbers(frames) == video.sample_indices(20, 8).tolist()
    # read_frames with indices past the end repeats the last frame
    assert numbers(video.read_frames(path, [18, 19, 30, 45])) == [18, 19, 19, 19]
    monkeypatch.setattr(video, "probe_video", real)


def test_truncated_avi_still_decodes(make_video):
    path = make_video("cut.avi", n=40, codec="mjpeg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    info = video.probe_video(path)
    assert 0 < info.num_frames < 40
    frames, info2 = video.sample_clip(path, 8)
    assert numbers(frames) == video.sample_indices(info2.num_frames, 8).tolist()


def _bad_files(tmp_path, make_video):
    good = make_video("good.mp4", n=30)
    files = {
        "zero-byte": tmp_path / "empty.mp4",
        "random bytes": tmp_path / "noise.mp4",
        "text with a video extension": tmp_path / "notes.avi",
        "truncated mp4": tmp_path / "truncated.mp4",
        "missing": tmp_path / "missing.mp4",
    }
    files["zero-byte"].write_bytes(b"")
    files["random bytes"].write_bytes(np.random.default_rng(0).bytes(5000))
    files["text with a video extension"].write_text("this is not a video\n" * 50)
    files["truncated mp4"].write_bytes(good.read_bytes()[:600])  # moov atom lost
    return files


def test_bad_files_raise_one_line_video_error(tmp_path, make_video):
    for what, path in _bad_files(tmp_path, make_video).items():
        for call in (video.probe_video, lambda p: video.sample_clip(p, 8), lambda p: list(video.iter_frames(p))):
            with pytest.raises(video.VideoError) as err:
                call(path)
            message = str(err.value)
            assert path.name in message and "\n" not in message, (what, message)


def test_zero_frame_video(make_video):
    path = make_video("zero.avi", codec="mjpeg", frames=np.zeros((0, 48, 64, 3), np.uint8))
    assert video.probe_video(path).num_frames == 0
    with pytest.raises(video.VideoError, match="zero frames"):
        video.sample_clip(path, 8)


def test_window_spans_cover_the_video():
    spans = video.window_spans(100, 10.0, window_sec=3.0, stride_sec=2.0)
    assert spans[0] == (0, 30) and spans[-1] == (70, 100)
    assert [s for s, _ in spans] == [0, 20, 40, 60, 70]
    assert video.window_spans(20, 10.0, 3.0, 1.0) == [(0, 20)]  # shorter than a window
    assert video.window_spans(30, 10.0, 3.0, 1.0) == [(0, 30)]
    for n in range(1, 60):
        spans = video.window_spans(n, 7.0, 1.5, 0.7)
        covered = set().union(*(range(s, e) for s, e in spans))
        assert covered == set(range(n)) and spans[-1][1] == n


def test_iter_windows_frames_and_times(make_video):
    path = make_video(n=55, fps=10)
    out = list(video.iter_windows(path, 4, window_sec=2.0, stride_sec=1.5))
    spans = video.window_spans(55, 10.0, 2.0, 1.5)
    assert len(out) == len(spans)
    for (frames, start, end), (s, e) in zip(out, spans):
        assert frames.shape == (4, 48, 64, 3)
        assert numbers(frames) == (s + video.sample_indices(e - s, 4)).tolist()
        assert (start, end) == pytest.approx((s / 10, e / 10))
    assert out[0][1] == 0 and out[-1][2] == pytest.approx(5.5)


def test_iter_frames_counts(make_video):
    assert numbers(video.iter_frames(make_video(n=12))) == list(range(12))


@pytest.mark.parametrize("width,height,fps", [(64, 48, 25), (65, 49, 29.97002997), (32, 32, 12.5)])
def test_h264_writer_round_trip(tmp_path, width, height, fps):
    path = tmp_path / "out.mp4"
    frames = numbered_frames(17, width, height)
    with video_writer.H264Writer(path, width, height, fps) as writer:
        for frame in frames:
            writer.write(frame)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.pix_fmt == "yuv420p"
        assert stream.average_rate == video_writer._as_rate(fps)
    info = video.probe_video(path)
    assert info.num_frames == 17 and info.fps == pytest.approx(fps)
    # even sizes are kept; odd ones padded by one replicated row/column (4:2:0 needs even)
    assert (info.width, info.height) == (width + width % 2, height + height % 2)
    assert numbers(f[:height, :width] for f in video.iter_frames(path)) == list(range(17))


def test_preprocess_matches_the_formula():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    x = video.preprocess(frames, 16)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    import cv2
    ref = cv2.resize(frames[1], (16, 16), interpolation=cv2.INTER_LINEAR) / 255.0
    ref = (ref - np.array(video.IMAGENET_MEAN)) / np.array(video.IMAGENET_STD)
    assert np.allclose(x[1].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    # non-contiguous views (flips) are accepted
    assert torch.allclose(video.preprocess(frames[:, :, ::-1], 16), video.preprocess(frames[:, :, ::-1].copy(), 16))


def test_draw_detections_copies_and_draws():
    frame = np.zeros((120, 160, 3), np.uint8)
    out = drawing.draw_detections(frame, [("jump", 0.87, (0.25, 0.25, 0.75, 0.75))])
    assert frame.max() == 0 and out.shape == frame.shape
    assert out[60, 39].any() and not out[60, 80].any()  # left edge drawn, centre untouched
    assert drawing.class_colour("jump") == drawing.class_colour("jump")


def test_real_footage(media_dir):
    expected = {"vtest.avi": (768, 576, 795, 10.0), "bikes.mp4": (640, 272, 250, 25.0),
                "sports2d_demo.mp4": (1768, 994, 230, 30.0)}
    for name, (w, h, n, fps) in expected.items():
        info = video.probe_video(media_dir / name)
        assert (info.width, info.height, info.num_frames, info.fps) == (w, h, n, fps)
    frames, _ = video.sample_clip(media_dir / "vtest.avi", 8)  # MPEG-4 v3 in AVI
    assert frames.shape == (8, 576, 768, 3) and frames.std() > 10
    first = video.read_frames(media_dir / "sports2d_demo.mp4", [0, 2])  # VP9, stops early
    assert first.shape == (2, 994, 1768, 3) and first.std() > 10


# ---------------------------------------------------------------- frame folders (UCF101-24 / JHMDB layout)


def write_frame_folder(folder, frames, ext=".png", name="{:05d}"):
    """Numbered images 00001.png ... (1-based, as UCF101-24 and JHMDB name them)."""
    import cv2
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames, start=1):
        cv2.imwrite(str(folder / (name.format(i) + ext)), np.ascontiguousarray(frame[..., ::-1]))
    return folder


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_frame_folder_reads_like_a_video_file(tmp_path, ext):
    folder = write_frame_folder(tmp_path / "v_Basketball_g01_c01", numbered_frames(37), ext)
    (folder / "notes.txt").write_text("not a frame\n")
    assert video.is_frame_folder(folder) and video.is_video_input(folder) and not video.is_frame_folder(tmp_path / "x")
    info = video.probe_video(folder)
    assert (info.width, info.height, info.num_frames, info.fps) == (64, 48, 37, video.DEFAULT_FOLDER_FPS)
    assert video.probe_video(folder, fps=10).duration_sec == pytest.approx(3.7)
    frames, info2 = video.sample_clip(folder, 8)
    assert frames.shape == (8, 48, 64, 3) and numbers(frames) == video.sample_indices(37, 8).tolist()
    assert numbers(video.read_frames(folder, [36, 0, 5, 5])) == [36, 0, 5, 5]
    assert numbers(video.iter_frames(folder)) == list(range(37))
    spans = video.window_spans(37, 10.0, 1.2, 1.0)
    out = list(video.iter_windows(folder, 4, 1.2, 1.0, fps=10))
    assert [numbers(f) for f, _, _ in out] == [(s + video.sample_indices(e - s, 4)).tolist() for s, e in spans]
    assert [t for _, a, b in out for t in (a, b)] == pytest.approx([t / 10 for span in spans for t in span])


def test_frame_folder_names_sort_by_number_and_prefer_rgb(tmp_path):
    folder = write_frame_folder(tmp_path / "plain", numbered_frames(12), name="{}")   # 1.png ... 12.png
    assert [p.rsplit("/", 1)[1] for p in video.folder_frames(folder)][:3] == ["1.png", "2.png", "3.png"]
    assert numbers(video.iter_frames(folder)) == list(range(12))
    mixed = write_frame_folder(tmp_path / "mm", numbered_frames(6), ".jpg", name="img_{:05d}")
    write_frame_folder(mixed, np.zeros((6, 48, 64, 3), np.uint8), ".jpg", name="flow_x_{:05d}")  # MMAction2 rawframes
    assert all("/img_" in p for p in video.folder_frames(mixed))


def test_bad_frame_folders_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "words").mkdir()
    (tmp_path / "words" / "cover.jpg").write_bytes(b"x")
    broken = write_frame_folder(tmp_path / "broken", numbered_frames(5))
    (broken / "00003.png").write_bytes(b"not a png")
    first = write_frame_folder(tmp_path / "first", numbered_frames(3))
    (first / "00001.png").write_bytes(b"")
    for folder, text in ((empty, "without numbered images"), (tmp_path / "words", "without numbered images")):
        with pytest.raises(video.VideoError, match=text) as err:
            video.probe_video(folder)
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
        assert not video.is_frame_folder(folder)
    assert video.probe_video(broken).num_frames == 5    # the probe reads the first image only
    with pytest.raises(video.VideoError, match="00003.png: unreadable image"):
        video.read_frames(broken, [0, 2])
    assert numbers(video.read_frames(broken, [0, 1, 4])) == [0, 1, 4]   # images are read only when wanted
    with pytest.raises(video.VideoError, match="no decodable frame"):
        video.probe_video(first)


def _sequential(path, indices, monkeypatch):
    """decode_frames with seeking switched off: the reference."""
    with monkeypatch.context() as m:
        m.setattr(video, "SEEK_AFTER_FRAMES", 10 ** 9)
        return video.decode_frames(path, indices)


@pytest.mark.parametrize("indices", [[300, 310, 320], [699], [260, 261], [400, 500, 699], [100, 650], [705, 710]])
def test_a_clip_far_into_a_long_file_seeks_and_decodes_what_a_full_pass_does(make_video, monkeypatch, indices):
    """Long files: a clip past SEEK_AFTER_FRAMES seeks to a keyframe (no pass from the start) and gets the very frames
    a full sequential pass gives (x264's keyframes every 250 frames, B-frames), past the end too."""
    path = make_video("long.mp4", n=700)
    full, decoded_full = _sequential(path, indices, monkeypatch)
    passes = []
    real = video._iter_av_frames
    monkeypatch.setattr(video, "_iter_av_frames", lambda p: passes.append(p) or real(p))
    frames, decoded = video.decode_frames(path, indices)
    assert np.array_equal(frames, full) and decoded == decoded_full
    assert [frame_number(f) for f in frames] == [min(i, 699) % 256 for i in indices]
    assert passes == ([] if min(indices) > video.SEEK_AFTER_FRAMES else [path])


def test_a_file_off_its_frame_clock_is_decoded_from_the_start(tmp_path, monkeypatch):
    """Variable frame rate (timestamps between the average rate's ticks): the frames are numbered by a full pass."""
    path = tmp_path / "vfr.mp4"
    frames = numbered_frames(400)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        pts = 0
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
            pts += 30 if i % 3 else 57   # irregular gaps
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    indices = [300, 350, 399]
    passes = []
    real = video._iter_av_frames
    monkeypatch.setattr(video, "_iter_av_frames", lambda p: passes.append(p) or real(p))
    got, _ = video.decode_frames(path, indices)
    assert passes == [path]   # seeking gave up and a full pass numbered the frames
    assert np.array_equal(got, _sequential(path, indices, monkeypatch)[0])
    assert [frame_number(f) for f in got] == [i % 256 for i in indices]
