"""The training data (labels.py, problems.py, records.py, augment.py, dataset.py) and synthetic_data.py:
parsing, class map, validation, split, sampler, augmentation, the dataset itself, and the synthetic data generator."""
import json
import logging

import numpy as np
import pytest
import torch

import dataset
import video
from augment import (MIN_BOX_KEEP, STILL_NOISE, _kept_fraction, augment_clip, hflip_boxes, jittered_indices,
                     random_crop, still_clip)
from conftest import frame_number, numbered_frames, write_video
from labels import build_class_map, normalise_box, parse_label_lines
from problems import DatasetError, format_problems
from records import VideoRecord, load_dataset, split_dataset
from synthetic_data import make_sample_dataset

# ---------------------------------------------------------------- parsing and class map


def test_parse_several_lines_comments_and_bad_lines():
    text = ["# class x1 y1 x2 y2", "", "1 10 20 30 40", "  2 5.5 6 7 8.25  # trailing comment",
            "3,1,2,3,4", "1 10 20 30", "x 1 2 3 4", "1.5 1 2 3 4", "1 nan 2 3 4", "2.0 0 0 9 9"]
    inst, problems, data_lines = parse_label_lines(text, "a.txt")
    assert [(i.raw_id, i.box, i.line) for i in inst] == [
        (1, (10, 20, 30, 40), 3), (2, (5.5, 6, 7, 8.25), 4), (3, (1, 2, 3, 4), 5), (2, (0, 0, 9, 9), 10)]
    assert [p.line for p in problems] == [6, 7, 8, 9]
    assert all(p.file == "a.txt" and "malformed label line" in p.message for p in problems)
    assert data_lines == 8


@pytest.mark.parametrize("raw,expected", [([0, 1, 0], {0: 0, 1: 1}), ([1, 2, 2], {1: 0, 2: 1}),
                                          ([10, 3, 7], {3: 0, 7: 1, 10: 2})])
def test_class_ids_map_to_contiguous_indices(raw, expected):
    """0-based, 1-based and gapped raw ids all become 0..C-1 in sorted order."""
    cmap, problems = build_class_map(raw)
    assert {r: cmap.index(r) for r in raw} == expected and len(cmap) == len(expected)
    assert cmap.names == [f"action_{r}" for r in sorted(set(raw))] and not problems


def test_class_names_sources(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("fight\n\ncollapse\n")
    assert build_class_map([1, 2], classes_file=classes)[0].names == ["fight", "collapse"]
    assert build_class_map([1, 2], "a,b", classes)[0].names == ["a", "b"]  # --class_names wins
    assert build_class_map([1, 2], ["a", "b"])[0].names == ["a", "b"]
    with pytest.raises(DatasetError, match="3 names"):
        build_class_map([1, 2], "a,b,c")
    cmap, problems = build_class_map([1, 2, 3], classes_file=classes)  # 2 names, 3 ids
    assert cmap.names == ["action_1", "action_2", "action_3"] and "2 names for 3 class ids" in problems[0].message


def test_box_normalisation_and_clipping():
    assert np.allclose(normalise_box((16, 12, 48, 36), 64, 48), [0.25, 0.25, 0.75, 0.75])
    assert np.allclose(normalise_box((-10, 10, 80, 60), 64, 48), [0, 10 / 48, 1, 1])
    assert np.allclose(normalise_box((48, 36, 16, 12), 64, 48), [0.25, 0.25, 0.75, 0.75])  # swapped
    assert normalise_box((70, 10, 90, 20), 64, 48) is None  # outside the frame
    assert normalise_box((10, 10, 10, 20), 64, 48) is None  # zero width


# ---------------------------------------------------------------- load_dataset


def _write_dataset(root, rows, labels):
    """rows: [(video_file, label_file)], labels: {name: text}."""
    root.mkdir(exist_ok=True)
    for name, text in labels.items():
        (root / name).write_text(text)
    lines = ["video_file,label_file"] + [f"{v},{l}" for v, l in rows]
    (root / "action_challenge.csv").write_text("\n".join(lines) + "\n")


def test_load_dataset_reads_all_lines_and_normalises_by_real_size(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_video(root / "a.mp4", numbered_frames(12, 64, 48))
    write_video(root / "B.AVI", numbered_frames(9, 96, 64), codec="mjpeg")
    write_video(root / "neg.mkv", numbered_frames(7, 64, 48))
    _write_dataset(root, [("a.mp4", "a.txt"), ("B.AVI", "b.txt"), ("neg.mkv", "")],
                   {"a.txt": "# two actors\n1 0 0 32 24\n2 32 24 64 48\n", "b.txt": "2 -5 16 48 80\n"})
    (root / "classes.txt").write_text("walk\njump\n")
    records, cmap, problems = load_dataset(root)
    assert not problems and cmap.names == ["walk", "jump"] and cmap.raw_ids == [1, 2]
    a, b, neg = records
    assert a.labels == [0, 1] and np.allclose(a.boxes, [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    assert (b.width, b.height, b.num_frames) == (96, 64, 9)
    assert b.labels == [1] and np.allclose(b.boxes, [[0, 0.25, 0.5, 1.0]])
    assert neg.labels == [] and neg.boxes.shape == (0, 4) and not neg.has_action
    assert a.video == "a.mp4" and a.path == str((root / "a.mp4").resolve())


def test_each_bad_input_is_reported_and_skipped(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("good.mp4", "good2.mp4", "badlines.mp4", "emptybox.mp4", "nolabel.mp4", "dup.mp4"):
        write_video(root / name, numbered_frames(10))
    write_video(root / "zero.avi", np.zeros((0, 48, 64, 3), np.uint8), codec="mjpeg")
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "empty.mp4").write_bytes(b"")
    rows = [("good.mp4", "good.txt"), ("good2.mp4", "partly.txt"), ("missing.mp4", ""),
            ("corrupt.mp4", ""), ("empty.mp4", ""), ("zero.avi", ""), ("nolabel.mp4", "nolabel.txt"),
            ("badlines.mp4", "bad.txt"), ("emptybox.mp4", "box.txt"), ("dup.mp4", ""), ("dup.mp4", "")]
    labels = {"good.txt": "0 1 1 20 20\n", "partly.txt": "0 1 1 20 20\nfoo\n",
              "bad.txt": "0 1 2\n", "box.txt": "0 100 100 120 120\n"}
    _write_dataset(root, rows, labels)
    records, cmap, problems = load_dataset(root)
    assert [r.video for r in records] == ["good.mp4", "good2.mp4", "dup.mp4"]
    assert records[1].labels == [0]  # the malformed line is skipped, the good one kept
    found = {(p.file, p.line): p.message for p in problems}
    expect = {("partly.txt", 2): "malformed label line", ("missing.mp4", None): "missing video",
              ("corrupt.mp4", None): "unreadable or corrupt video", ("empty.mp4", None): "empty file",
              ("zero.avi", None): "zero frames", ("nolabel.txt", None): "missing label file",
              ("bad.txt", 1): "malformed label line", ("bad.txt", None): "no usable instance",
              ("box.txt", 1): "empty box", ("action_challenge.csv", 12): "duplicate row"}
    for key, text in expect.items():
        assert text in found.get(key, ""), (key, found)
    table = format_problems(problems)
    assert len(table.splitlines()) == len(problems) + 3
    for key in expect:
        assert key[0] in table
    assert all("\n" not in p.message for p in problems)


def test_nothing_usable_or_no_csv_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no action_challenge.csv"):
        load_dataset(tmp_path)
    _write_dataset(tmp_path, [("missing.mp4", "")], {})
    with pytest.raises(DatasetError, match="no usable videos") as err:
        load_dataset(tmp_path)
    assert "missing video" in format_problems(err.value.problems)
    (tmp_path / "action_challenge.csv").write_text("path,label\nx.mp4,\n")
    with pytest.raises(DatasetError, match="header"):
        load_dataset(tmp_path)


def test_quick_probe_and_a_lying_container(tmp_path):
    """probe=False trusts the AVI header (500 frames); the dataset still samples the 20 real ones."""
    import struct
    write_video(tmp_path / "a.mp4", numbered_frames(11))
    path = write_video(tmp_path / "lie.avi", numbered_frames(20), codec="mjpeg")
    data = bytearray(path.read_bytes())
    for tag, offset in ((b"avih", 16), (b"strh", 32)):  # dwTotalFrames, dwLength
        struct.pack_into("<I", data, data.find(tag) + 8 + offset, 500)
    path.write_bytes(bytes(data))
    _write_dataset(tmp_path, [("a.mp4", ""), ("lie.avi", "")], {})
    quick = load_dataset(tmp_path, probe=False)[0]
    assert [r.num_frames for r in quick] == [11, 500]
    assert [r.num_frames for r in load_dataset(tmp_path)[0]] == [11, 20]
    clip, _ = dataset.ActionDataset(quick, 8, 64, mean=(0, 0, 0), std=(1, 1, 1))[1]
    frames = (clip.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert [frame_number(f) for f in frames] == video.sample_indices(20, 8).tolist()


# ---------------------------------------------------------------- split


def _records(classes):
    """Fake records: one per entry of classes (-1 = no action)."""
    return [VideoRecord(f"v{i:03d}.mp4", f"/x/v{i:03d}.mp4", [] if c < 0 else [c],
                        np.zeros((0 if c < 0 else 1, 4), np.float32), 64, 48, 10, 25.0)
            for i, c in enumerate(classes)]


def test_split_is_stratified_reproducible_and_saved(tmp_path):
    recs = _records([0] * 20 + [1] * 10 + [-1] * 15)
    train, val, note = split_dataset(recs, 0.2, seed=3)
    assert "stratified" in note and len(val) == 4 + 2 + 3 and len(train) + len(val) == 45
    assert not {r.video for r in train} & {r.video for r in val}
    again = split_dataset(recs, 0.2, seed=3)[1]
    assert [r.video for r in again] == [r.video for r in val]
    assert [r.video for r in split_dataset(recs, 0.2, seed=4)[1]] != [r.video for r in val]
    path = tmp_path / "out" / "split.json"
    val1 = split_dataset(recs, 0.2, seed=3, split_path=path)[1]
    saved = json.loads(path.read_text())
    assert sorted(saved["val"]) == sorted(r.video for r in val1)
    # resume: the saved split is reused, whatever the record order
    saved["val"], saved["train"] = saved["val"][1:], saved["train"] + saved["val"][:1]
    path.write_text(json.dumps(saved))
    train2, val2, note2 = split_dataset(recs[::-1], 0.2, seed=3, split_path=path)
    assert "reused" in note2 and sorted(r.video for r in val2) == sorted(saved["val"])
    # other videos: a new split replaces it, and says so
    _, _, note3 = split_dataset(recs[:-1], 0.2, seed=3, split_path=path)
    assert "replaced" in note3


def test_split_falls_back_to_random_for_tiny_classes():
    recs = _records([0] * 10 + [1] + [-1] * 5)
    train, val, note = split_dataset(recs, 0.25, seed=0)
    assert "random split" in note and "class 1" in note and len(val) == 4


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("n_pos,n_neg,batch", [(10, 30, 4), (3, 40, 4), (25, 0, 3), (1, 5, 2), (12, 9, 1)])
def test_every_batch_has_a_positive(n_pos, n_neg, batch):
    has_action = [True] * n_pos + [False] * n_neg
    order = np.random.default_rng(0).permutation(len(has_action))
    has_action = [has_action[i] for i in order]
    sampler = dataset.BalancedBatchSampler(has_action, batch, seed=1)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(any(has_action[i] for i in b) and len(b) <= batch for b in batches)
        seen = {i for b in batches for i in b}
        usable = {i for i, a in enumerate(has_action) if a or batch > 1}
        assert seen == usable  # every usable sample, every epoch
    first = list(dataset.BalancedBatchSampler(has_action, batch, seed=1))
    sampler.set_epoch(0)
    assert list(sampler) == first  # deterministic in (seed, epoch)


@pytest.mark.parametrize("every", [3, 4])
def test_sampler_shards_disjointly_across_processes(every):
    """Ranks get the same number of batches and disjoint samples; with too few positives for
    one per batch (every=4: 13 positives, 15 batches) positives are reused, nothing else."""
    has_action = [i % every == 0 for i in range(50)]
    shards = []
    for rank in range(3):
        s = dataset.BalancedBatchSampler(has_action, 4, seed=7, num_replicas=3, rank=rank)
        s.set_epoch(2)
        shards.append(list(s))
    assert len({len(b) for b in shards}) == 1  # same number of steps on every rank
    flat = [[i for b in shard for i in b] for shard in shards]
    shared = {i for k, a in enumerate(flat) for b in flat[k + 1:] for i in set(a) & set(b)}
    assert all(has_action[i] for i in shared) and (not shared if every == 3 else True)
    assert set().union(*map(set, flat)) == set(range(50))
    assert all(any(has_action[i] for i in b) for shard in shards for b in shard)


def test_sampler_without_positives_is_a_clear_error():
    with pytest.raises(DatasetError, match="no training video has an action"):
        dataset.BalancedBatchSampler([False] * 5, 2)


# ---------------------------------------------------------------- augmentation


def test_flipped_box_by_hand():
    assert np.allclose(hflip_boxes(np.array([[0.1, 0.2, 0.3, 0.6]], np.float32)),
                       [[0.7, 0.2, 0.9, 0.6]])


def _actor_clip(box_px, size=(60, 80), T=4):
    """Black frames with a white rectangle (the actor) at pixel xyxy box_px."""
    frames = np.zeros((T, *size, 3), np.uint8)
    x1, y1, x2, y2 = box_px
    frames[:, y1:y2, x1:x2] = 255
    return frames


def test_augmentation_keeps_the_box_on_the_actor():
    h, w, S = 60, 80, 64
    box_px = (50, 10, 70, 40)  # right half: a flip must move it left
    frames = _actor_clip(box_px, (h, w))
    box = np.array([[50 / w, 10 / h, 70 / w, 40 / h]], np.float32)
    flips = 0
    for seed in range(40):
        out, out_box = augment_clip(frames, box, np.random.default_rng(seed), S)
        assert out.shape == (4, S, S, 3) and out_box.shape == (1, 4)
        ys, xs = np.nonzero(out[0].mean(axis=-1) > 100)
        actor = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / S
        assert np.allclose(out_box[0], actor, atol=2.5 / S), (seed, out_box, actor)
        flips += out_box[0, 0] < 0.5
    assert 5 < flips < 35  # both flipped and unflipped happened


def test_channel_swap_changes_colour_but_not_the_box():
    frames = np.zeros((4, 60, 80, 3), np.uint8)
    frames[:, 10:40, 50:70, 0] = 200                      # a red actor
    box = np.array([[50 / 80, 10 / 60, 70 / 80, 40 / 60]], np.float32)
    dominant = set()
    for seed in range(30):
        out, out_box = augment_clip(frames, box, np.random.default_rng(seed), 64)
        ys, xs = np.nonzero(out[0].max(axis=-1) > 100)
        actor = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / 64
        assert np.allclose(out_box[0], actor, atol=2.5 / 64)
        dominant.add(int(out[0, ys[0], xs[0]].argmax()))
    assert dominant == {0, 1, 2}                          # red stayed red sometimes, moved other times


def test_still_clip_is_one_frame_with_faint_noise():
    frames = np.stack([np.full((6, 8, 3), 20 * t, np.uint8) for t in range(5)])   # brightness = time
    out = still_clip(frames, np.random.default_rng(0))
    assert out.shape == frames.shape and out.dtype == np.uint8
    source = round(float(out.mean()) / 20)
    assert 0 <= source < 5 and abs(float(out.mean()) - 20 * source) < 1     # one of the frames
    diffs = np.diff(out.astype(np.float32), axis=0)
    assert 0 < diffs.std() < 4 * STILL_NOISE       # only noise moves


def test_crop_keeps_most_of_every_box():
    box = np.array([[0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 1.0, 1.0]], np.float32)
    for seed in range(30):
        crop = random_crop(box, np.random.default_rng(seed))
        assert (_kept_fraction(box, crop) >= MIN_BOX_KEEP).all()


def test_temporal_jitter_stays_near_the_grid():
    base = video.sample_indices(100, 8)
    step = 99 / 7
    seen = set()
    for seed in range(20):
        idx = jittered_indices(100, 8, np.random.default_rng(seed))
        assert idx.min() >= 0 and idx.max() <= 99 and np.all(np.diff(idx) >= 0)
        assert np.abs(idx - base).max() <= step / 2 + 1
        seen.add(tuple(idx))
    assert len(seen) > 5


def _small_dataset(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for k in range(4):
        write_video(root / f"v{k}.mp4", numbered_frames(20 + k))
    _write_dataset(root, [(f"v{k}.mp4", "l.txt" if k % 2 else "") for k in range(4)], {"l.txt": "3 8 8 40 40\n"})
    return load_dataset(root)[0]


def test_action_dataset_items_and_seeded_augmentation(tmp_path):
    records = _small_dataset(tmp_path)
    plain = dataset.ActionDataset(records, 8, 32)
    clip, target = plain[1]
    assert clip.shape == (8, 3, 32, 32) and clip.dtype == torch.float32
    assert target["labels"].tolist() == [0] and target["video"] == "v1.mp4"
    assert torch.allclose(target["boxes"], torch.tensor([[24 / 64, 24 / 48, 32 / 64, 32 / 48]]))
    frames, _ = video.sample_clip(records[1].path, 8)  # no augmentation = inference preprocessing
    assert torch.equal(clip, video.preprocess(frames, 32))
    assert plain[0][1]["boxes"].shape == (0, 4)

    aug = dataset.ActionDataset(records, 8, 32, augment=True, seed=5)
    aug.set_epoch(3)
    a1, t1 = aug[1]
    other = dataset.ActionDataset(records, 8, 32, augment=True, seed=5)
    other.set_epoch(3)
    b1, u1 = other[1]
    assert torch.equal(a1, b1) and torch.equal(t1["boxes"], u1["boxes"])  # same (seed, epoch, index)
    other.set_epoch(4)
    assert not torch.equal(other[1][0], a1)


def test_persistent_workers_get_each_epochs_augmentation(tmp_path):
    """Batches tagged with the epoch give, through long-lived workers, the clips that set_epoch gives
    in-process: persistent workers never see the main process's set_epoch."""
    records = _small_dataset(tmp_path)
    aug = dataset.ActionDataset(records, 8, 32, augment=True, seed=5)
    sampler = dataset.EpochTaggedBatches(dataset.BalancedBatchSampler(aug.has_action, 2, seed=0))
    loader = torch.utils.data.DataLoader(aug, batch_sampler=sampler, num_workers=1, persistent_workers=True,
                                         collate_fn=dataset.collate)
    reference = dataset.ActionDataset(records, 8, 32, augment=True, seed=5)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        batches = list(sampler.batch_sampler)
        assert len(sampler) == len(batches)
        for (clips, targets), batch in zip(loader, batches):
            assert torch.equal(clips, torch.stack([reference[i][0] for i in batch]))
            assert [t["video"] for t in targets] == [records[i].video for i in batch]


def test_still_prob_turns_actions_into_still_negatives(tmp_path):
    records = _small_dataset(tmp_path)
    always = dataset.ActionDataset(records, 8, 32, augment=True, seed=1, still_prob=1.0)
    clip, target = always[1]                               # v1 has an action
    assert target["labels"].shape == (0,) and target["boxes"].shape == (0, 4)
    assert (clip - clip[0:1]).abs().mean() < 0.1           # no motion left (numbered frames differ a lot)
    assert always[0][1]["labels"].shape == (0,)             # negatives stay negatives
    never = dataset.ActionDataset(records, 8, 32, augment=True, seed=1, still_prob=0.0)
    assert never[1][1]["labels"].tolist() == [0]
    plain = dataset.ActionDataset(records, 8, 32, augment=False, still_prob=1.0)
    assert plain[1][1]["labels"].tolist() == [0]            # validation is never altered


def test_undecodable_video_at_training_time_is_skipped(tmp_path, caplog):
    records = _small_dataset(tmp_path)
    (tmp_path / "data" / "v2.mp4").write_bytes(b"gone bad")
    ds = dataset.ActionDataset(records, 4, 16)
    with caplog.at_level(logging.WARNING, logger="dataset"):
        clip, target = ds[2]
    assert target["video"] == "v3.mp4" and "v2.mp4" in caplog.text


def test_collate(tmp_path):
    ds = dataset.ActionDataset(_small_dataset(tmp_path), 4, 16)
    clips, targets = dataset.collate([ds[0], ds[1], ds[3]])
    assert clips.shape == (3, 4, 3, 16, 16) and [t["video"] for t in targets] == ["v0.mp4", "v1.mp4", "v3.mp4"]


# ---------------------------------------------------------------- sample data


def test_sample_data_is_valid_deterministic_and_labelled(tmp_path):
    kwargs = dict(num_videos=12, num_frames=16, width=96, height=72, seed=3, two_actor_fraction=0.5)
    summary = make_sample_dataset(tmp_path / "a", **kwargs)
    records, cmap, problems = load_dataset(tmp_path / "a")
    assert not problems and len(records) == 12 and cmap.names == ["jump", "walk", "wave"]
    assert summary["negatives"] == 4 and summary["two_actor"] >= 1
    assert {r.video.rsplit(".", 1)[1] for r in records} == {"mp4", "avi", "MOV", "mkv"}
    assert any(len(r.labels) == 2 for r in records)
    make_sample_dataset(tmp_path / "b", **kwargs)
    for name in ("action_challenge.csv", "classes.txt"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    for r in records:  # same pixels for the same seed
        if r.has_action:
            label = (tmp_path / "a" / r.video).with_suffix(".txt").name
            assert (tmp_path / "a" / label).read_text() == (tmp_path / "b" / label).read_text()
    first = records[0]
    assert np.array_equal(video.sample_clip(first.path, 4)[0],
                          video.sample_clip(str(tmp_path / "b" / first.video), 4)[0])
    # the actor (bright, saturated) lies inside its box in every frame
    for r in records:
        if len(r.labels) == 1:
            for frame in video.iter_frames(r.path):
                sat = frame.max(axis=-1).astype(int) - frame.min(axis=-1)
                ys, xs = np.nonzero((sat > 120) & (frame.max(axis=-1) > 170))
                x1, y1, x2, y2 = r.boxes[0] * [r.width, r.height, r.width, r.height]
                assert xs.min() >= x1 - 1 and xs.max() <= x2 and ys.min() >= y1 - 1 and ys.max() <= y2


def test_odd_boxes_are_used_and_listed_as_warnings(tmp_path):
    """Swapped corners (an x y w h box, often) and a box mostly outside the frame are used as
    before (sorted, clipped) and listed as warnings with file and line; a box a little over the
    border (an actor at the edge) is not listed."""
    root = tmp_path / "data"
    root.mkdir()
    write_video(root / "a.mp4", numbered_frames(10, 64, 48))
    _write_dataset(root, [("a.mp4", "a.txt")], {"a.txt": "0 40 30 10 12\n0 -2 0 20 20\n1 50 30 130 90\n"})
    records, _, problems = load_dataset(root)
    assert np.allclose(records[0].boxes, [[10 / 64, 12 / 48, 40 / 64, 30 / 48], [0, 0, 20 / 64, 20 / 48],
                                          [50 / 64, 30 / 48, 1, 1]])
    assert [(p.file, p.line, p.severity) for p in problems] == [("a.txt", 1, "warning"), ("a.txt", 3, "warning")]
    assert "swapped corners" in problems[0].message and "x y w h" in problems[0].message
    assert "outside the 64x48 frame" in problems[1].message
    table = format_problems(problems)
    assert "severity" in table.splitlines()[1] and "0 skipped, 2 warning(s)" in table
    assert all(line.split()[2] == "warning" for line in table.splitlines()[3:])
