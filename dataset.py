"""Training data: :class:`ActionDataset` (clips and targets of the records, augmented for training), :func:`collate`,
and the batch samplers (:class:`BalancedBatchSampler`, :class:`EpochTaggedBatches`).
"""
from __future__ import annotations

import bisect
import logging
import math
from typing import Iterator, Sequence

import numpy as np
import torch

import video
from augment import draw_augmentation, jittered_indices, side_by_side, still_clip
from problems import DatasetError
from records import VideoRecord
from targets import NEGATIVE_PROB, clip_tubes, training_window, tube_target, validation_window, window_length

log = logging.getLogger(__name__)


class ActionDataset(torch.utils.data.Dataset):
    """Clips and targets for training/validation.

    ``__getitem__(i) -> (clip (T, 3, S, S) float32 preprocessed, target)`` with target::

        labels        int64 (N,)          classes acting at the middle step T // 2
        boxes         float32 (N, 4)      their boxes there, cxcywh normalised
        video         str
        track_ids     int64 (M,)          one row per (track, class) acting at any step
        track_labels  int64 (M, T)        the row's class where it acts at that step, else -1
        track_boxes   float32 (M, T, 4)   its box at each step, cxcywh normalised, zeros where -1
        frame_indices int64 (T,)          the decoded frame each step shows (0-based)

    Per-video records (5-field labels): T frames uniformly over the whole video, every row acting at every step
    with the same box (N = M). Per-frame records (``record.tracks``): a window of ``window_frames`` frames (or
    ``window_sec``; None: the whole video), T frames uniform in it; training windows from :func:`training_window`
    (``negative_prob`` of them away from every track), validation's from :func:`validation_window`.

    Augmentation (``augment=True``) is seeded by (seed, epoch, index), so a sample is the same in any worker and
    after a resume; one crop, flip and colour for every frame and box of the clip. ``still_prob``: a clip with an
    action becomes a still clip without one (:func:`still_clip`). ``clips_per_video = n``: index ``copy *
    len(records) + i`` is record i with its own window and augmentation. ``pair_prob``: a per-frame training window
    is shown beside another record's (:func:`side_by_side`). A video that fails to decode is logged and another
    sample is returned.
    """

    def __init__(self, records, num_frames: int, img_size: int, augment: bool = False, seed: int = 0,
                 mean=video.IMAGENET_MEAN, std=video.IMAGENET_STD, still_prob: float = 0.0,
                 window_frames: int | None = None, window_sec: float | None = None,
                 negative_prob: float = NEGATIVE_PROB, clips_per_video: int = 1, pair_prob: float = 0.0):
        if clips_per_video < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
        if window_frames is not None and window_sec is not None:
            raise ValueError("give window_frames or window_sec, not both")
        for name, value in (("negative_prob", negative_prob), ("pair_prob", pair_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.records = list(records)
        self.num_frames, self.img_size = int(num_frames), int(img_size)
        self.augment, self.seed, self.epoch = bool(augment), int(seed), 0
        self.still_prob = float(still_prob)
        self.mean, self.std = tuple(mean), tuple(std)
        self.window_frames = None if window_frames is None else int(window_frames)
        self.window_sec = None if window_sec is None else float(window_sec)
        self.negative_prob = float(negative_prob)
        self.clips_per_video = int(clips_per_video)
        self.pair_prob = float(pair_prob)
        self.per_frame = [j for j, r in enumerate(self.records) if r.tracks is not None]   # _paired's partners

    def __len__(self) -> int:
        return len(self.records) * self.clips_per_video

    @property
    def has_action(self) -> list[bool]:
        """Per-sample flag for :class:`BalancedBatchSampler`."""
        return [r.has_action for r in self.records] * self.clips_per_video

    def set_epoch(self, epoch: int) -> None:
        """The epoch that seeds augmentation and windows (with the seed and the index)."""
        self.epoch = int(epoch)

    def __getitem__(self, index):
        """``index``: an int (augmented as of ``set_epoch``) or ``(index, epoch)`` from
        :class:`EpochTaggedBatches` (persistent workers keep their own copy of this dataset, so
        ``set_epoch`` in the main process does not reach them)."""
        index, epoch = index if isinstance(index, tuple) else (index, self.epoch)
        copy, index = divmod(index, len(self.records))
        # A video that fails now (disk, codec) must not kill a long run: log and use the next.
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            try:
                return self._load(i, epoch, copy)
            except video.VideoError as exc:
                log.warning("skipping %s at training time: %s", self.records[i].video, exc)
        raise DatasetError("no video of the dataset could be decoded")

    def _indices(self, num_frames: int, rng) -> np.ndarray:
        if rng is None:
            return video.sample_indices(num_frames, self.num_frames)
        return jittered_indices(num_frames, self.num_frames, rng)

    def _window_indices(self, record: VideoRecord, num_frames: int, rng) -> np.ndarray:
        """The clip's frames (T,) in a window of a per-frame record (``num_frames``: its length)."""
        win = window_length(record, self.window_frames, self.window_sec, num_frames)
        if rng is None:
            start, _ = validation_window(record, win, num_frames)
            return start + video.sample_indices(win, self.num_frames)
        start, _ = training_window(record, win, rng, self.negative_prob, num_frames)
        return start + jittered_indices(win, self.num_frames, rng)

    def _decode(self, record: VideoRecord, plan) -> tuple[np.ndarray, np.ndarray]:
        """Frames at ``plan(num_frames)``; planned again on the true length when the stream ends
        early (a quick probe of a lying container)."""
        idx = plan(record.num_frames)
        frames, decoded = video.decode_frames(record.path, idx)
        if decoded <= idx.max():
            idx = plan(decoded)
            frames, _ = video.decode_frames(record.path, idx)
        return frames, np.asarray(idx, np.int64)

    def _load(self, i: int, epoch: int, copy: int = 0):
        record = self.records[i]
        rng = np.random.default_rng([self.seed, epoch, i, *([copy] if copy else [])]) if self.augment else None
        frames, idx, (track_ids, classes, acting, boxes) = self._sample(record, rng)
        if rng is not None and record.tracks is not None and self.pair_prob and rng.random() < self.pair_prob:
            frames, track_ids, classes, acting, boxes = self._paired(i, rng, frames, track_ids, classes, acting, boxes)
        clip = video.preprocess(frames, self.img_size, self.mean, self.std)
        return clip, tube_target(record.video, idx, track_ids, classes, acting, boxes)

    def _sample(self, record: VideoRecord, rng) -> tuple[np.ndarray, np.ndarray, tuple]:
        """A record's frames (augmented to S x S with ``rng``), their indices and :func:`clip_tubes`' arrays."""
        if record.tracks is None:
            frames, idx = self._decode(record, lambda n: self._indices(n, rng))
        else:
            frames, idx = self._decode(record, lambda n: self._window_indices(record, n, rng))
        track_ids, classes, acting, boxes = clip_tubes(record, idx)
        if rng is not None:
            # every box of the clip (all tracks, all steps) gets the frames' crop and flip
            aug = draw_augmentation(boxes[acting], frames.shape[1:3], rng, self.img_size)
            frames, boxes = aug.apply_frames(frames), boxes.copy()
            boxes[acting] = aug.apply_boxes(boxes[acting])
            if len(classes) and rng.random() < self.still_prob:
                frames, track_ids, classes = still_clip(frames, rng), track_ids[:0], classes[:0]
                acting, boxes = acting[:0], boxes[:0]
        return frames, idx, (track_ids, classes, acting, boxes)

    def _paired(self, i: int, rng, frames, track_ids, classes, acting, boxes) -> tuple:
        """The sample beside a window of another per-frame video (:func:`side_by_side`); unchanged when none fits
        or the other video cannot be decoded. Its tracks get ids after the sample's own."""
        if len(self.per_frame) < 2:
            return frames, track_ids, classes, acting, boxes
        pick = int(rng.integers(len(self.per_frame) - 1))   # any per-frame record but record i (one of them)
        other = self.records[self.per_frame[pick + (pick >= bisect.bisect_left(self.per_frame, i))]]
        try:
            o_frames, _, (o_ids, o_classes, o_acting, o_boxes) = self._sample(other, rng)
        except video.VideoError as exc:
            log.warning("not pairing with %s: %s", other.video, exc)
            return frames, track_ids, classes, acting, boxes
        joined = side_by_side((frames, acting, boxes), (o_frames, o_acting, o_boxes), rng)
        if joined is None:
            return frames, track_ids, classes, acting, boxes
        first_free = int(track_ids.max()) + 1 if len(track_ids) else 0
        return (joined[0], np.concatenate([track_ids, o_ids + first_free]), np.concatenate([classes, o_classes]),
                joined[1], joined[2])


def collate(batch):
    """``[(clip, target), ...] -> (clips (B, T, 3, S, S), [target, ...])``."""
    clips, targets = zip(*batch)
    return torch.stack(clips), list(targets)


# ---------------------------------------------------------------------------- sampler


class BalancedBatchSampler(torch.utils.data.Sampler):
    """Batches of indices in which every batch holds at least one video with an action.

    Per epoch (``set_epoch``), the order is shuffled with (seed, epoch): every process
    computes the same global batches. Each batch first gets one positive, then the other
    samples are dealt round-robin (at most ``batch_size`` each). There are enough batches
    for every sample to appear once per epoch; the count is a multiple of ``num_replicas``
    and batch b goes to rank ``b % num_replicas``, so ranks get disjoint samples and the same
    number of steps. Only when there are fewer positives than batches are positives reused.
    With ``batch_size=1`` only positives can be used (said in a warning).
    """

    def __init__(self, has_action: Sequence[bool], batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        self.has_action = [bool(a) for a in has_action]
        if not any(self.has_action):
            raise DatasetError("no training video has an action: cannot build batches with a positive")
        if batch_size < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad batch_size {batch_size} or rank {rank}/{num_replicas}")
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.num_replicas, self.rank, self.epoch = int(num_replicas), int(rank), 0
        if self.batch_size == 1 and not all(self.has_action):
            log.warning("batch size 1: every batch must hold a positive, so videos without action are not used")

    def set_epoch(self, epoch: int) -> None:
        """The epoch that seeds the shuffle (every rank computes the same batches)."""
        self.epoch = int(epoch)

    def _num_batches(self) -> int:
        """Enough batches for every sample, and for the negatives to fit next to one positive
        each without exceeding batch_size; a multiple of num_replicas."""
        n, pos = len(self.has_action), sum(self.has_action)
        if self.batch_size == 1:  # a batch of one must be a positive: negatives cannot be used
            needed = pos
        else:
            needed = max(math.ceil(n / self.batch_size), math.ceil((n - pos) / (self.batch_size - 1)))
        return math.ceil(needed / self.num_replicas) * self.num_replicas

    def __len__(self) -> int:
        return self._num_batches() // self.num_replicas

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pos = rng.permutation([i for i, a in enumerate(self.has_action) if a]).tolist()
        neg = [i for i, a in enumerate(self.has_action) if not a]
        n_batches = self._num_batches()
        anchors = [pos[b % len(pos)] for b in range(n_batches)]  # cycles only if too few positives
        rest = rng.permutation(pos[n_batches:] + (neg if self.batch_size > 1 else [])).tolist()
        batches = [[a] for a in anchors]
        for k, i in enumerate(rest):
            batches[k % n_batches].append(i)
        return [rng.permutation(b).tolist() for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.rank::self.num_replicas]


class EpochTaggedBatches(torch.utils.data.Sampler):
    """Wraps a batch sampler: yields ``[(index, epoch), ...]`` so that the dataset's workers know the
    epoch (for its augmentation seed) without being restarted: DataLoader's persistent workers.
    ``set_epoch`` and ``len`` go to the wrapped sampler."""

    def __init__(self, batch_sampler):
        self.batch_sampler, self.epoch = batch_sampler, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch for the wrapped sampler and for the indices yielded."""
        self.epoch = int(epoch)
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batch_sampler:
            yield [(i, self.epoch) for i in batch]
