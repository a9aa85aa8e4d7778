"""Post-processing: the network's raw outputs as per-video predictions (DETR's PostProcess), and the decisions
read from them. A prediction is a dict of CPU tensors ``{"scores": float32 (Q,), "labels": int64 (Q,), "boxes":
float32 (Q, 4) normalised xyxy}``: ``scores[q]`` is query ``q``'s best foreground softmax probability and
``labels[q]`` its class (tube mode adds per-step keys, :func:`tube_prediction`); a no_object decision is
:data:`NO_OBJECT` (``-1``).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_convert

NO_OBJECT = -1
NO_OBJECT_NAME = "no_object"


# --------------------------------------------------------------------------- conversion


def outputs_to_predictions(outputs: dict) -> list[dict]:
    """Turn raw model outputs into per-video predictions.

    Args:
        outputs: ``{"pred_logits": (B, Q, C+1), "pred_boxes": (B, Q, 4) cxcywh normalised}``;
            the last logit is ``no_object``. Other keys (``aux_outputs``) are ignored. Tube-mode outputs
            (``(B, Q, K, C+1)`` logits) go to :func:`tube_outputs_to_predictions`.

    Returns:
        ``B`` dicts ``{"scores": float32 (Q,), "labels": int64 (Q,), "boxes": float32 (Q, 4)}``
        on the CPU; boxes are normalised xyxy clamped to [0, 1]. The softmax runs over all
        ``C+1`` logits (so a confident ``no_object`` lowers every foreground score), then the
        no_object column is dropped: score = max foreground probability, label = its argmax.
    """
    logits = outputs["pred_logits"].detach().float().cpu()
    boxes = outputs["pred_boxes"].detach().float().cpu()
    if logits.dim() == 4:
        return tube_outputs_to_predictions(logits, boxes)
    probs = logits.softmax(-1)[..., :-1]
    scores, labels = probs.max(-1)
    xyxy = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy").clamp(0.0, 1.0)
    return [
        {"scores": scores[b].contiguous(), "labels": labels[b].long().contiguous(), "boxes": xyxy[b].contiguous()}
        for b in range(logits.shape[0])
    ]


def tube_outputs_to_predictions(logits: torch.Tensor, boxes: torch.Tensor) -> list[dict]:
    """Tube-mode outputs ``(B, Q, K, C+1)`` logits and ``(B, Q, K, 4)`` cxcywh boxes as per-clip predictions.

    How a tube is read: its class is the foreground class with the highest probability summed over the K
    steps (softmax over C+1 at each step); ``step_scores (Q, K)`` is that class's probability at each step (the
    actor acts there when it passes the score threshold); ``step_boxes (Q, K, 4)`` normalised xyxy. Why one class
    per tube: the tube is one actor doing one thing, and summing over steps lets the steps where it clearly acts
    outvote the uncertain ones. The clip view that the clip-mode metrics read: ``scores (Q,)`` the best step score
    (a query is a detection when it acts at one step at least), ``labels (Q,)``, ``boxes (Q, 4)`` its box at that
    step. ``step_probs (Q, K, C)``: every class's probability (tubes.join_tubes reads a joined tube's class from
    them); ``step_acting (Q, K)`` their sum, the probability that the actor acts at each step (the tube's extent)."""
    probs = logits.softmax(-1)[..., :-1]                                   # (B, Q, K, C)
    labels = probs.sum(2).argmax(-1)                                       # (B, Q)
    xyxy = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy").clamp(0.0, 1.0)                  # (B, Q, K, 4)
    return [tube_prediction(probs[b], labels[b], xyxy[b]) for b in range(logits.shape[0])]


def tube_prediction(step_probs: torch.Tensor, labels: torch.Tensor, step_boxes: torch.Tensor) -> dict:
    """One clip's tube-mode prediction (the keys of :func:`tube_outputs_to_predictions`) from every class's
    probability ``step_probs (Q, K, C)``, each query's class ``labels (Q,)`` and normalised xyxy ``step_boxes
    (Q, K, 4)``: ``step_scores`` is the class's probability at each step, ``step_acting`` the sum of all classes'
    (the actor acts, whatever it does), the clip view its best step."""
    labels = labels.long()
    step_scores = step_probs.gather(-1, labels[:, None, None].expand(*step_probs.shape[:2], 1)).squeeze(-1)   # (Q, K)
    scores, best_step = step_scores.max(-1)
    best_boxes = step_boxes[torch.arange(len(labels)), best_step]                                   # (Q, 4)
    return {"scores": scores.contiguous(), "labels": labels.contiguous(), "boxes": best_boxes.contiguous(),
            "step_scores": step_scores.contiguous(), "step_boxes": step_boxes.contiguous(),
            "step_probs": step_probs.contiguous(), "step_acting": step_probs.sum(-1).contiguous()}


def _as_tensor(x, dtype) -> torch.Tensor:
    """Tensor of ``dtype`` on the CPU from a tensor, numpy array or list."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _pred(pred: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores float32 (Q,), labels int64 (Q,), boxes float32 (Q, 4)) of a prediction dict."""
    scores = _as_tensor(pred["scores"], torch.float32).reshape(-1)
    labels = _as_tensor(pred["labels"], torch.int64).reshape(-1)
    boxes = _as_tensor(pred["boxes"], torch.float32).reshape(-1, 4)
    return scores, labels, boxes


# --------------------------------------------------------------------------- video level


def video_prediction(pred: dict, threshold: float = 0.5) -> tuple[int, float, torch.Tensor | None]:
    """The video's decision: its top-scoring query.

    Args:
        pred: one prediction dict (see module docstring).
        threshold: minimum score for a foreground decision.

    Returns:
        ``(label, score, box)``: ``label`` is the top query's class, or ``-1`` (no_object) when
        ``score < threshold``; ``score`` is the top query's score either way; ``box`` is the top
        query's normalised xyxy box ``(4,)`` either way (callers ignore it for no_object), or
        ``None`` when the prediction has no queries.
    """
    scores, labels, boxes = _pred(pred)
    if scores.numel() == 0:
        return NO_OBJECT, 0.0, None
    top = int(scores.argmax())
    score = float(scores[top])
    label = int(labels[top]) if score >= threshold else NO_OBJECT
    return label, score, boxes[top]


def detections(pred: dict, threshold: float) -> list[tuple[int, float, list[float]]]:
    """The published detection rule: every query whose score (best foreground probability) is at
    least ``threshold``, as ``(label, score, [x1, y1, x2, y2] normalised)``, best first."""
    scores, labels, boxes = _pred(pred)
    keep = (scores >= threshold).nonzero().flatten().tolist()
    keep.sort(key=lambda q: -float(scores[q]))
    return [(int(labels[q]), float(scores[q]), [float(v) for v in boxes[q]]) for q in keep]
