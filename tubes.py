"""Predicted tubes: one actor doing one action, a box in every video frame where it acts (DESIGN.md "Tubes").

Frames are 0-based indices over the whole video; boxes are normalised xyxy in [0, 1].

- A tube-mode prediction of one clip (:func:`postprocess.outputs_to_predictions`: ``labels (Q,)``, ``step_scores
  (Q, K)``, ``step_boxes (Q, K, 4)``) whose step ``k`` shows video frame ``frame_indices[k]`` becomes, per query
  acting at one step at least, a tube over the frames of the clip's span (:func:`clip_tubes`; its queries on one
  actor first made one by :func:`merge_duplicate_queries`): a frame belongs to it when its nearest step (ties: the
  earlier) is present (the actor acts there: ``step_acting >= threshold``); its box and score are the linear
  interpolation of the two surrounding steps' (held constant before the first / after the last step).
- The clips of a long video (windows) are joined (:func:`join_tubes`): one actor keeps one ``tube_id``.
- A clip-mode prediction (one box per query per clip) is a tube with one constant box (:func:`constant_tube`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

import postprocess

# A joined actor changes class only where its windows' class probabilities outweigh this many nats (tubes.part_classes).
CLASS_SWITCH_COST = 3.0
# Two queries of one clip whose boxes overlap this much (mean IoU over the steps) are one actor
# (merge_duplicate_queries).
DUPLICATE_IOU = 0.5


@dataclasses.dataclass(eq=False)   # equal only to itself: numpy fields make == ambiguous
class PredTube:
    """One predicted tube.

    Attributes:
        class_id, class_name: its class.
        score: the mean step score over its present steps (``step_scores``).
        frames: int64 ``(n,)`` video frames where it is present, ascending, no repeats.
        boxes: float ``(n, 4)`` normalised xyxy, row i at ``frames[i]``.
        frame_scores: float ``(n,)`` the interpolated step score at each frame.
        step_frames, step_scores: ``(s,)`` the video frame and score of each present step it is made of
            (a joined tube pools those of its parts).
        tube_id: unique in its video, numbered from 1 in order of first frame (:func:`number_tubes`); 0 = not yet.
        step_probs, frame_probs: ``(s, C)`` and ``(n, C)`` every class's probability at its present steps and
            frames (tube mode; None for a clip-mode detection, whose class is final), and ``class_names`` their
            names: :func:`join_tubes` may give the tube another class from them.
    """

    class_id: int
    class_name: str
    score: float
    frames: np.ndarray
    boxes: np.ndarray
    frame_scores: np.ndarray
    step_frames: np.ndarray
    step_scores: np.ndarray
    tube_id: int = 0
    step_probs: np.ndarray | None = None
    frame_probs: np.ndarray | None = None
    class_names: tuple = ()

    def middle_box(self) -> tuple:
        """The box at its middle frame (``frames[(n - 1) // 2]``): the one box of its predictions.csv row."""
        return tuple(float(v) for v in self.boxes[(len(self.frames) - 1) // 2])


def _steps(frame_indices) -> tuple[np.ndarray, np.ndarray]:
    """``(unique step frames (u,), index of the first step showing each)``; frames repeat when a video has fewer
    frames than T, and the earlier step then speaks for its frame."""
    return np.unique(np.asarray(frame_indices, dtype=np.int64), return_index=True)


def nearest_step(frame_indices, frames) -> np.ndarray:
    """For each video frame of ``frames (n,)`` the index (into ``frame_indices (K,)``) of its nearest step; a frame
    halfway between two steps takes the earlier one."""
    unique, first = _steps(frame_indices)
    frames = np.asarray(frames, dtype=np.int64)
    right = np.clip(np.searchsorted(unique, frames), 0, len(unique) - 1)
    left = np.clip(right - 1, 0, None)
    near = np.where(np.abs(frames - unique[left]) <= np.abs(unique[right] - frames), left, right)
    return first[near]


def interpolate(frame_indices, values, frames) -> np.ndarray:
    """Per-step ``values (K, D)`` (or ``(K,)``) at video ``frames (n,)``: linear between the two surrounding steps,
    held constant before the first and after the last. Returns ``(n, D)`` (or ``(n,)``)."""
    unique, first = _steps(frame_indices)
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(len(values), -1)[first]
    out = np.stack([np.interp(frames, unique, flat[:, d]) for d in range(flat.shape[1])], axis=1)
    return out.reshape(len(frames), *values.shape[1:])


def dense(pred: dict, frame_indices, span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every query of a tube-mode prediction at every frame of the clip's ``span = [first, end)``.

    Returns ``(frames (n,), scores (Q, n), boxes (Q, n, 4))``: interpolated step scores of each query's class and
    normalised xyxy boxes (:func:`interpolate`)."""
    frames = np.arange(int(span[0]), int(span[1]), dtype=np.int64)
    step_scores = pred["step_scores"].float().numpy()
    step_boxes = pred["step_boxes"].float().numpy()
    scores = np.stack([interpolate(frame_indices, s, frames) for s in step_scores])
    boxes = np.stack([interpolate(frame_indices, b, frames) for b in step_boxes])
    return frames, scores, boxes


def _class_probs(pred: dict, frame_indices, frames) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Every class's probability ``(Q, K, C)`` at the steps and ``(Q, n, C)`` at ``frames`` (interpolated), or
    Nones when the prediction has no ``step_probs``."""
    if "step_probs" not in pred:
        return None, None
    step_probs = pred["step_probs"].float().numpy()
    return step_probs, np.stack([interpolate(frame_indices, p, frames) for p in step_probs])


def clip_tubes(pred: dict, frame_indices, span: tuple[int, int], threshold: float,
               class_names: Sequence[str]) -> list[PredTube]:
    """The tubes of one clip: one per query present at one step at least, where it acts (``step_acting >=
    threshold``, whatever class).

    ``frame_indices (K,)``: the video frame step k shows; ``span = [first, end)``: the video frames the clip
    covers. A frame of the span is present when its :func:`nearest_step` is; the tube's score is the mean step
    score (its class's probability) over its present steps. Why the extent from acting, not the class: an actor whose
    steps split between two classes passes the threshold for neither, and its tube falls apart (docs/EXPERIMENTS.md,
    "Tube mode", ninth session)."""
    frame_indices = np.asarray(frame_indices, dtype=np.int64)
    present = pred["step_acting"].float().numpy() >= threshold            # (Q, K)
    frames, scores, boxes = dense(pred, frame_indices, span)
    step_probs, frame_probs = _class_probs(pred, frame_indices, frames)
    near = nearest_step(frame_indices, frames)                             # (n,)
    out = []
    for q in np.flatnonzero(present.any(1)):
        on = present[q, near]
        if not on.any():   # present only at a repeated step that an earlier one speaks for
            continue
        steps = np.flatnonzero(present[q])
        step_scores = pred["step_scores"][q, steps].float().numpy()
        label = int(pred["labels"][q])
        probs = {} if step_probs is None else {"step_probs": step_probs[q, steps], "frame_probs": frame_probs[q, on],
                                               "class_names": tuple(class_names)}
        out.append(PredTube(label, class_names[label], float(step_scores.mean()), frames[on], boxes[q, on],
                            scores[q, on], frame_indices[steps], step_scores, **probs))
    return out


def constant_tube(class_id: int, class_name: str, score: float, box, frames) -> PredTube:
    """A clip-mode detection as a tube: one normalised xyxy ``box`` and one ``score`` at every frame of ``frames``."""
    frames = np.asarray(frames, dtype=np.int64)
    return PredTube(int(class_id), class_name, float(score), frames, np.tile(np.asarray(box, float), (len(frames), 1)),
                    np.full(len(frames), float(score)), frames[:1], np.array([float(score)]))


def merge(parts: Sequence[PredTube]) -> PredTube:
    """One tube from tubes of one actor (the class of the first part): the union of their frames. On a frame several
    of them have, the box (and frame score) of the highest-scoring one: a box the network predicted, not a blend of
    two that may disagree (the mean of two boxes on different parts of a moving actor frames neither); score: the
    mean of all their present steps."""
    ranked = sorted(parts, key=lambda t: -t.score)
    frames = np.concatenate([t.frames for t in ranked])
    unique, first = np.unique(frames, return_index=True)   # first occurrence = the highest-scoring part's
    boxes = np.concatenate([t.boxes for t in ranked])[first]
    frame_scores = np.concatenate([t.frame_scores for t in ranked])[first]
    step_frames = np.concatenate([t.step_frames for t in parts])
    step_scores = np.concatenate([t.step_scores for t in parts])
    probs = {}
    if all(t.step_probs is not None for t in parts):
        probs = {"step_probs": np.concatenate([t.step_probs for t in parts]),
                 "frame_probs": np.concatenate([t.frame_probs for t in ranked])[first], "class_names": parts[0].class_names}
    return PredTube(parts[0].class_id, parts[0].class_name, float(step_scores.mean()), unique, boxes, frame_scores,
                    step_frames, step_scores, **probs)


def merge_duplicate_queries(pred: dict, threshold: float, iou_threshold: float = DUPLICATE_IOU) -> dict:
    """A tube-mode clip prediction (:func:`postprocess.tube_outputs_to_predictions`) with each actor's duplicate queries
    merged into one query: the same keys, fewer queries, the best first.

    The queries go best first (the mean of their step scores at the steps present at ``threshold``; then the best step
    score), and each joins the first group whose leader's boxes it overlaps by ``iou_threshold`` on average over the
    clip's steps (box IoU at each step), else leads a group of its own. A group is one query of its leader's class:
    at each step the box and probabilities of the member most confident of that class. Tubes merge across classes
    (one actor, one tube); frame-mAP reads every class of every query (:func:`class_detections`). Why: two queries
    often follow one actor; in frame-mAP the second is a false positive at a high score, and linked apart they are
    two tubes (docs/EXPERIMENTS.md, "Tube mode", sixth and seventh sessions)."""
    scores, boxes, probs = pred["step_scores"].float(), pred["step_boxes"].float(), pred["step_probs"].float()
    present = scores >= threshold
    tube_score = (scores * present).sum(1) / present.sum(1).clamp(min=1)
    order = np.lexsort((-scores.max(1).values.numpy(), -tube_score.numpy()))
    overlap = torch.stack([box_iou(step, step) for step in boxes.unbind(1)]).mean(0)   # (Q, Q) mean over steps
    groups: list[list[int]] = []
    for q in order.tolist():
        group = next((g for g in groups if overlap[g[0], q] >= iou_threshold), None)
        groups.append([q]) if group is None else group.append(q)
    labels = pred["labels"][[g[0] for g in groups]]
    steps = torch.arange(scores.shape[1])
    chosen = torch.stack([torch.tensor(g)[probs[g][:, :, c].argmax(0)] for g, c in zip(groups, labels.tolist())])
    return postprocess.tube_prediction(probs[chosen, steps], labels, boxes[chosen, steps])   # (G, K) member per step


def class_detections(pred: dict, threshold: float) -> list[dict]:
    """A tube-mode clip prediction as frame-mAP reads it: for each class c, the prediction with every query a
    detection of c, scored at each step by its probability of c, each actor's queries merged
    (:func:`merge_duplicate_queries`). Why every class: the field scores each box for every class (ACT's and YOWO's
    frame detections), so an actor whose query leans to another class still ranks in c by its probability of c
    (docs/EXPERIMENTS.md, "Tube mode", ninth session)."""
    step_probs = pred["step_probs"]
    classes = torch.zeros(step_probs.shape[0], dtype=torch.long)
    return [merge_duplicate_queries(postprocess.tube_prediction(step_probs, classes + c, pred["step_boxes"]), threshold)
            for c in range(step_probs.shape[-1])]


def relabel(tube: PredTube, class_id: int) -> PredTube:
    """``tube`` as class ``class_id``: its scores become that class's probabilities (needs ``step_probs``)."""
    if class_id == tube.class_id:
        return tube
    step_scores = tube.step_probs[:, class_id]
    return dataclasses.replace(tube, class_id=int(class_id), class_name=tube.class_names[class_id],
                               score=float(step_scores.mean()), step_scores=step_scores,
                               frame_scores=tube.frame_probs[:, class_id])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired normalised xyxy boxes ``(n, 4)`` and ``(n, 4)`` -> ``(n,)``."""
    return box_iou(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).diagonal().numpy()


def link_iou(track: PredTube, tube: PredTube, max_gap: int) -> float:
    """How well ``tube`` continues ``track``: the mean box IoU over their shared frames; without shared frames, the
    IoU of their boxes on the two frames (one of each) nearest each other, when at most ``max_gap`` frames lie
    between those (else 0)."""
    _, it, iu = np.intersect1d(track.frames, tube.frames, assume_unique=True, return_indices=True)
    if len(it):
        return float(_iou(track.boxes[it], tube.boxes[iu]).mean())
    # each of tube's frames with track's frames on either side of it (a tube may lie inside the other's pause)
    right = np.searchsorted(track.frames, tube.frames)
    near = np.clip(np.stack([right - 1, right], 1), 0, len(track.frames) - 1)      # (m, 2) indices into track
    distance = np.abs(track.frames[near] - tube.frames[:, None])
    j, side = np.unravel_index(distance.argmin(), distance.shape)
    i = near[j, side]
    return float(_iou(track.boxes[i:i + 1], tube.boxes[j:j + 1])[0]) if distance[j, side] - 1 <= max_gap else 0.0


def split_gaps(tube: PredTube, max_gap: int) -> list[PredTube]:
    """``tube`` cut where more than ``max_gap`` frames in a row are missing: the actor stopped, a new tube starts
    (the rule of the labels' tracks)."""
    cuts = np.flatnonzero(np.diff(tube.frames) - 1 > max_gap) + 1
    if not len(cuts):
        return [tube]
    pieces = []
    for idx in np.split(np.arange(len(tube.frames)), cuts):
        frames = tube.frames[idx]
        mine = (tube.step_frames >= frames[0]) & (tube.step_frames <= frames[-1])
        step_scores = tube.step_scores[mine] if mine.any() else tube.frame_scores[idx]
        probs = {} if tube.step_probs is None else {"step_probs": tube.step_probs[mine],
                                                    "frame_probs": tube.frame_probs[idx]}
        pieces.append(dataclasses.replace(tube, score=float(step_scores.mean()), frames=frames, boxes=tube.boxes[idx],
                                          frame_scores=tube.frame_scores[idx], step_frames=tube.step_frames[mine],
                                          step_scores=step_scores, tube_id=0, **probs))
    return pieces


def number_tubes(tubes: Sequence[PredTube]) -> list[PredTube]:
    """``tubes`` ordered by first frame (then score, highest first), ``tube_id`` 1, 2, ... in that order."""
    ordered = sorted(tubes, key=lambda t: (int(t.frames[0]), -t.score))
    for k, t in enumerate(ordered, 1):
        t.tube_id = k
    return ordered


def _may_link(track: PredTube, tube: PredTube) -> bool:
    """Tubes of one class may join; tubes of two classes too when both carry every class's probabilities (tube
    mode), since :func:`action_runs` then decides the class of each part."""
    return track.class_id == tube.class_id or (track.step_probs is not None and tube.step_probs is not None)


@dataclasses.dataclass(eq=False)
class Actor:
    """One actor being linked: its ``parts`` (clip tubes, window order), their :func:`merge` as ``track``, and
    ``key``, its order of appearance (what keeps the joined tubes in the batch order)."""

    key: int
    parts: list
    track: PredTube


class TubeLinker:
    """Window-by-window joining of a video's clip tubes into actors and tubes: the one code path of test.py (a whole
    file, :func:`join_tubes`) and stream.py (live, one clip at a time).

    :meth:`add` links a clip's tubes greedily, best score first: each joins the open actor (not already extended by
    this clip: two tubes of one clip are two queries, never one) it may link to (:func:`_may_link`) with the highest
    :func:`link_iou`, when that is at least ``iou_threshold``, else starts its own. Given where the next clip can
    start, :meth:`add` retires the actors no later tube can reach (more than ``max_gap`` frames behind): their tubes
    are final (:meth:`actor_tubes`) and memory stays bounded on a stream. :meth:`finish` ends every actor and numbers
    the tubes; retiring early changes nothing in the result.
    """

    def __init__(self, iou_threshold: float, max_gap: int, switch_cost: float = CLASS_SWITCH_COST,
                 min_frames: int = 1):
        if iou_threshold <= 0:
            raise ValueError("iou_threshold must be positive: an actor out of reach must not link")
        self.iou_threshold, self.max_gap = float(iou_threshold), int(max_gap)
        self.switch_cost, self.min_frames = float(switch_cost), int(min_frames)
        self.open: list[Actor] = []
        self.retired: list[tuple[int, list[PredTube]]] = []   # (actor key, its final tubes)
        self._keys = 0

    def add(self, clip: Sequence[PredTube], next_first: int | None = None) -> list[Actor]:
        """Link one clip's tubes (clips in window order); ``next_first``: the first video frame any later clip can
        show (None: unknown, nothing retires). Returns the actors retired by this call."""
        taken: set[int] = set()
        for tube in sorted(clip, key=lambda t: -t.score):
            best, best_iou = None, -1.0
            for k, actor in enumerate(self.open):
                if k in taken or not _may_link(actor.track, tube):
                    continue
                iou = link_iou(actor.track, tube, self.max_gap)
                if iou >= self.iou_threshold and iou > best_iou:
                    best, best_iou = k, iou
            if best is None:
                self.open.append(Actor(self._keys, [tube], tube))
                self._keys += 1
                best = len(self.open) - 1
            else:
                actor = self.open[best]
                actor.parts.append(tube)
                actor.track = merge(actor.parts)
            taken.add(best)
        return [] if next_first is None else self._retire(lambda a: a.track.frames[-1] < next_first - self.max_gap - 1)

    def _retire(self, done) -> list[Actor]:
        gone = [a for a in self.open if done(a)]
        self.open = [a for a in self.open if not done(a)]
        self.retired += [(a.key, self.actor_tubes(a)) for a in gone]
        return gone

    def provisional_tubes(self, actor: Actor) -> list[PredTube]:
        """``actor``'s tubes as its parts so far say (:func:`action_runs`, then :func:`split_gaps`), in time order,
        before the ``min_frames`` rule; later clips may still extend or relabel them while it is open."""
        return [piece for run in action_runs(actor.parts, self.switch_cost) for piece in split_gaps(run, self.max_gap)]

    def actor_tubes(self, actor: Actor) -> list[PredTube]:
        """``actor``'s tubes spanning at least ``min_frames`` frames (first to last), as ACT's tube builder drops
        those under 15 frames."""
        return [p for p in self.provisional_tubes(actor) if p.frames[-1] - p.frames[0] + 1 >= self.min_frames]

    def finish(self) -> list[PredTube]:
        """Every actor ended: the video's tubes, numbered (:func:`number_tubes`)."""
        self._retire(lambda a: True)
        return number_tubes([t for _, tubes in sorted(self.retired, key=lambda kt: kt[0]) for t in tubes])

    def join(self, clips: Sequence[Sequence[PredTube]]) -> list[PredTube]:
        """A whole video's clip tubes (window order) linked, then :meth:`finish`."""
        for clip in clips:
            self.add(clip)
        return self.finish()


def part_classes(parts: Sequence[PredTube], switch_cost: float) -> np.ndarray:
    """The class of each part of one actor (window order): the sequence of classes that best explains every
    part's mean class probabilities (log-likelihood, one vote per part) less ``switch_cost`` nats per change of
    class (Viterbi). Why: one window's class is a guess from ~1 s of motion; a lone window that disagrees with its
    neighbours is noise, while a change the windows keep showing is a new action (a new tube)."""
    evidence = np.stack([np.log(np.clip(p.step_probs.mean(0), 1e-6, None)) for p in parts])   # (n, C)
    score, back = evidence[0].copy(), []
    for row in evidence[1:]:
        stay_or_switch = score[:, None] - switch_cost * (1 - np.eye(len(score)))   # (from, to)
        back.append(stay_or_switch.argmax(0))
        score = stay_or_switch.max(0) + row
    classes = [int(score.argmax())]
    for pointers in reversed(back):
        classes.append(int(pointers[classes[-1]]))
    return np.array(classes[::-1])


def action_runs(parts: Sequence[PredTube], switch_cost: float) -> list[PredTube]:
    """One actor's parts as tubes: each part takes its class from :func:`part_classes`, and consecutive parts of one
    class become one tube (:func:`merge`)."""
    if len(parts) == 1 or any(p.step_probs is None for p in parts):   # clip mode: one class, final
        return [merge(parts)]
    classes = part_classes(parts, switch_cost)
    runs, start = [], 0
    for i in range(1, len(parts) + 1):
        if i == len(parts) or classes[i] != classes[start]:
            runs.append(merge([relabel(p, classes[start]) for p in parts[start:i]]))
            start = i
    return runs


def join_tubes(clips: Sequence[Sequence[PredTube]], iou_threshold: float, max_gap: int,
               switch_cost: float = CLASS_SWITCH_COST, min_frames: int = 1) -> list[PredTube]:
    """The tubes of a video's clips (in window order) joined into one tube per actor and action, numbered
    (:class:`TubeLinker`): the parts of one actor take their classes from :func:`action_runs`, parts of one class in a
    row become one tube, a tube missing for more than ``max_gap`` frames is cut (:func:`split_gaps`: a short pause
    keeps the id, a long one gives a new one), and tubes spanning fewer than ``min_frames`` frames are dropped."""
    return TubeLinker(iou_threshold, max_gap, switch_cost, min_frames).join(clips)
