"""Hungarian matching and the set criterion (CE with a weighted no-object class, L1, GIoU), as DETR.

Boxes in model outputs and targets are ``(cx, cy, w, h)`` normalised to [0, 1]. Targets: one dict per clip,
``{"labels": int64 (N,), "boxes": float32 (N, 4)}`` (N may be 0); tube mode also reads ``track_labels (M, K)``
(class, -1 = not acting) and ``track_boxes (M, K, 4)``. Everything here runs in float32, whatever autocast the
forward pass used: the matcher and the losses are cheap, and low precision there gives non-finite gradients
(DESIGN.md, "Environment facts").
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from model import acting_box_average

PUBLISHED_WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
LOCATE_WEIGHT = 1.0   # tube mode's locator cell loss (SetCriterion.loss_locate); absent from clip-mode outputs
ACTING_WEIGHT = 1.0   # tube mode's actionness map loss and presence loss (SetCriterion.loss_acting)
ACTOR_CLASS_WEIGHT = 2.0   # tube mode's class of the trunk under each true box (SetCriterion.loss_actor_class)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to target boxes minimising
    ``cost_class * -p(target class) + cost_bbox * L1(cxcywh) + cost_giou * -GIoU(xyxy)``."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: ``pred_logits (B, Q, C+1)``, ``pred_boxes (B, Q, 4)``; targets: B dicts with
        ``labels (N_i,)`` and ``boxes (N_i, 4)``. Returns B pairs ``(query_idx, target_idx)`` of
        length ``min(Q, N_i)`` (int64, CPU). Tube-mode outputs (``(B, Q, K, ...)``): :meth:`match_tubes`."""
        if is_tube_output(outputs):
            return self.match_tubes(outputs, targets)
        batch, num_queries = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)       # (B*Q, C+1)
        pred_boxes = outputs["pred_boxes"].flatten(0, 1).float()              # (B*Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets]).long()
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        sizes = [len(t["boxes"]) for t in targets]
        if tgt_labels.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in range(batch)]
        # One batched cost over all queries x all targets, split per video afterwards (as DETR).
        cost = (self.cost_bbox * torch.cdist(pred_boxes, tgt_boxes, p=1)
                - self.cost_class * prob[:, tgt_labels]
                - self.cost_giou * generalized_box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(tgt_boxes)))
        cost = cost.view(batch, num_queries, -1).cpu()
        indices = []
        for i, block in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(block[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    @torch.no_grad()
    def match_tubes(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One assignment of actor queries to tracks per clip. outputs: ``pred_logits (B, Q, K, C+1)``,
        ``pred_boxes (B, Q, K, 4)``; targets: ``track_labels (M_i, K)`` (class, -1 where the track does not
        act) and ``track_boxes (M_i, K, 4)`` cxcywh. The cost of query q for track m sums over the steps where
        m acts: ``-cost_class * p_qk(class) + cost_bbox * L1 + cost_giou * -GIoU``. Returns B pairs
        ``(query_idx, track_idx)`` of length ``min(Q, M_i)``."""
        prob = outputs["pred_logits"].float().softmax(-1)                     # (B, Q, K, C+1)
        pred_boxes = outputs["pred_boxes"].float()                            # (B, Q, K, 4)
        indices = []
        for b, t in enumerate(targets):
            labels, boxes = t["track_labels"].long(), t["track_boxes"].float()   # (M, K), (M, K, 4)
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = tube_costs(prob[b], pred_boxes[b], labels, boxes, self.cost_class, self.cost_bbox, self.cost_giou)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def is_tube_output(outputs: dict) -> bool:
    """Tube-mode outputs have a step axis: ``pred_logits (B, Q, K, C+1)``."""
    return outputs["pred_logits"].dim() == 4


def tube_costs(prob, pred_boxes, labels, boxes, cost_class: float, cost_bbox: float, cost_giou: float) -> torch.Tensor:
    """The (Q, M) matching cost of one clip: ``prob (Q, K, C+1)`` softmax, ``pred_boxes (Q, K, 4)``, ``labels (M, K)``
    (-1 = absent), ``boxes (M, K, 4)`` cxcywh; each term summed over the steps where the track acts."""
    present = (labels >= 0).float()                                           # (M, K)
    steps = torch.arange(labels.shape[1], device=labels.device)
    p_class = prob[:, steps[None, :], labels.clamp(min=0)]                    # (Q, M, K)
    l1 = (pred_boxes[:, None] - boxes[None]).abs().sum(-1)                    # (Q, M, K)
    giou = torch.stack([generalized_box_iou(cxcywh_to_xyxy(pred_boxes[:, k]), cxcywh_to_xyxy(boxes[:, k]))
                        for k in range(labels.shape[1])], -1)                 # (Q, M, K)
    per_step = cost_bbox * l1 - cost_class * p_class - cost_giou * giou
    return (per_step * present[None]).sum(-1)


def num_target_boxes(targets: list[dict], tube: bool) -> int:
    """What the box losses are normalised by: target boxes (clip mode) or (track, step) pairs where a track acts
    (tube mode)."""
    if tube:
        return sum(int((t["track_labels"] >= 0).sum()) for t in targets)
    return sum(len(t["labels"]) for t in targets)


class SetCriterion(nn.Module):
    """DETR's set loss: match, then CE over all queries (unmatched -> no_object, weighted ``eos_coef``),
    L1 and GIoU over matched pairs normalised by the number of target boxes; the same terms on every
    auxiliary decoder output (suffix ``_<layer>``).

    Returns named terms: ``loss_ce``, ``loss_bbox``, ``loss_giou`` (and ``loss_ce_0``... per auxiliary layer),
    ``loss_video``, and in tube mode ``loss_locate``, ``loss_acting``, ``loss_presence``, ``loss_actor_class`` (the
    last three once, not per layer); ``weight_dict`` says which are trained on and how much (:meth:`total`).
    ``class_error`` and ``matched_iou`` are for logging only (absent from ``weight_dict``)."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict,
                 eos_coef: float = 0.1, losses=("labels", "boxes")):
        super().__init__()
        self.num_classes, self.matcher, self.eos_coef, self.losses = num_classes, matcher, eos_coef, tuple(losses)
        self.weight_dict = dict(weight_dict)
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight)

    def loss_labels(self, outputs, targets, indices, num_boxes) -> dict:
        """Weighted CE over all ``B*Q`` queries; ``class_error`` = 100 - accuracy on matched queries."""
        if is_tube_output(outputs):
            return self.loss_tube_labels(outputs, targets, indices)
        logits = outputs["pred_logits"].float()                                  # (B, Q, C+1)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        batch_idx, query_idx = _flat_indices(indices)
        matched_labels = _matched(targets, indices, "labels", logits.device).long()
        target_classes[batch_idx, query_idx] = matched_labels
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.class_weight)
        if matched_labels.numel():
            accuracy = (logits[batch_idx, query_idx].argmax(-1) == matched_labels).float().mean() * 100
        else:
            accuracy = torch.tensor(100.0, device=logits.device)
        return {"loss_ce": loss, "class_error": 100 - accuracy.detach()}

    def loss_tube_labels(self, outputs, targets, indices) -> dict:
        """Tube mode: weighted CE over all ``B*Q*K`` (query, step) pairs; a matched query's target at step k is
        its track's class there, or no_object where the track does not act (weight 1: when the actor acts is a
        label, not filler); unmatched queries: no_object, weighted ``eos_coef``. Why: with ``eos_coef`` on a
        track's idle steps too, calling them acting would cost a tenth of the reverse (docs/EXPERIMENTS.md, "Tube mode",
        second session)."""
        logits = outputs["pred_logits"].float()                                  # (B, Q, K, C+1)
        target_classes = torch.full(logits.shape[:3], self.num_classes, dtype=torch.int64, device=logits.device)
        batch_idx, query_idx = _flat_indices(indices)
        labels = _matched(targets, indices, "track_labels", logits.device).long()
        target_classes[batch_idx, query_idx] = torch.where(labels >= 0, labels, self.num_classes)   # (matched, K)
        weights = self.class_weight[target_classes]                              # (B, Q, K)
        weights[batch_idx, query_idx] = 1.0
        per_pair = F.cross_entropy(logits.permute(0, 3, 1, 2), target_classes, reduction="none")
        loss = (per_pair * weights).sum() / weights.sum()
        acting = labels >= 0
        if acting.any():
            predicted = logits[batch_idx, query_idx].argmax(-1)
            accuracy = (predicted[acting] == labels[acting]).float().mean() * 100
        else:
            accuracy = torch.tensor(100.0, device=logits.device)
        return {"loss_ce": loss, "class_error": 100 - accuracy.detach()}

    def matched_boxes(self, outputs, targets, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted and target boxes ``(P, 4)`` cxcywh of the matched pairs: (query, target) in clip mode,
        (query, track, step) where the track acts in tube mode."""
        batch_idx, query_idx = _flat_indices(indices)
        src = outputs["pred_boxes"].float()[batch_idx, query_idx]                 # (P, 4) or (P, K, 4)
        if not is_tube_output(outputs):
            return src, _matched(targets, indices, "boxes", src.device).float()
        acting = _matched(targets, indices, "track_labels", src.device) >= 0
        return src[acting], _matched(targets, indices, "track_boxes", src.device).float()[acting]

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict:
        """L1 on ``cxcywh`` and ``1 - GIoU`` on ``xyxy`` of matched pairs, each summed / ``num_boxes``."""
        src, tgt = self.matched_boxes(outputs, targets, indices)
        if src.numel() == 0:
            zero = outputs["pred_boxes"].float().sum() * 0.0                      # keeps the graph connected
            return {"loss_bbox": zero, "loss_giou": zero, "matched_iou": torch.tensor(float("nan"))}
        src_xyxy, tgt_xyxy = cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)
        giou = torch.diag(generalized_box_iou(src_xyxy, tgt_xyxy))
        iou = torch.diag(box_iou(src_xyxy, tgt_xyxy))
        return {"loss_bbox": F.l1_loss(src, tgt, reduction="sum") / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes,
                "matched_iou": iou.mean().detach()}

    def loss_locate(self, outputs, targets, indices, num_boxes) -> dict:
        """Tube mode with a locator (``pred_cells (B, Q, K, G)``, logits over a square grid of G cells): CE of each
        matched (query, step) where its track acts towards the cell holding the track's box centre, summed /
        ``num_boxes``. Nothing without ``pred_cells``."""
        if "pred_cells" not in outputs:
            return {}
        logits = outputs["pred_cells"].float()
        acting = _matched(targets, indices, "track_labels", logits.device) >= 0   # (P, K)
        if not acting.any():
            return {"loss_locate": logits.sum() * 0.0}                         # keeps the graph connected
        batch_idx, query_idx = _flat_indices(indices)
        centres = _matched(targets, indices, "track_boxes", logits.device).float()[acting][:, :2]   # (A, 2) cx, cy
        side = math.isqrt(logits.shape[-1])
        place = (centres * side).long().clamp(0, side - 1)                     # column, row
        cell = place[:, 1] * side + place[:, 0]
        return {"loss_locate": F.cross_entropy(logits[batch_idx, query_idx][acting], cell, reduction="sum") / num_boxes}

    def loss_acting(self, outputs, targets, indices, num_boxes) -> dict:
        """Tube mode's actionness map (``pred_acting (B, K, G)`` logits over a square grid of G cells per step) and
        what the network reads from it (``pred_presence (B, Q, K)``, the map at the cells each (actor, step) attends
        to). ``loss_acting``: binary CE of every cell of every step towards 1 where the cell holds an actor that
        acts then (:func:`acting_cells`), summed / the number of such cells (at least ``B*K``). ``loss_presence``:
        binary CE of each matched (query, step) towards whether its track acts then, the mean. Why plain CE: the
        product with the class is thresholded at test time, so the map must be calibrated, which focal loss does not
        give (docs/EXPERIMENTS.md, "Tube mode", third session). Nothing without ``pred_acting``."""
        if "pred_acting" not in outputs:
            return {}
        logits = outputs["pred_acting"].float()
        side = math.isqrt(logits.shape[-1])
        target = torch.stack([acting_cells(t["track_labels"], t["track_boxes"], side) for t in targets]).to(logits.device)
        # at least one acting cell per step: a batch of clips without action would otherwise weigh hundreds of times more
        dense = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / max(float(target.sum()),
                                                                                       logits.shape[0] * logits.shape[1])
        batch_idx, query_idx = _flat_indices(indices)
        presence = outputs["pred_presence"].float()[batch_idx, query_idx].clamp(1e-6, 1 - 1e-6)   # (P, K)
        acting = (_matched(targets, indices, "track_labels", presence.device) >= 0).float()
        matched = F.binary_cross_entropy(presence, acting) if presence.numel() else presence.sum() * 0.0
        return {"loss_acting": dense, "loss_presence": matched}

    def loss_actor_class(self, outputs, targets, indices, num_boxes) -> dict:
        """Tube mode's class evidence under the box (``actor_map (B, G, C+1)``: ``actor_class`` of each cell of the
        trunk's square grid): at every (track, step) where the track acts, the map averaged over its true box
        (:func:`model.box_cell_weights`, as :meth:`model.STAR.box_features` reads it under a predicted box), CE over
        the C action classes only towards the track's class, the mean over those pairs. No matching: it reaches the
        trunk under each actor directly, as an AVA detector classifies the features under an actor's box. The
        actions only: whether the actor acts is the map's and the decoder's to say, and idle actors have no box.
        Nothing without ``actor_map``."""
        if "actor_map" not in outputs:
            return {}
        grid = outputs["actor_map"].float()                                      # (B, G, C+1)
        pairs = [acting_box_average(cells[:, :self.num_classes], t["track_labels"].to(grid.device),
                                    t["track_boxes"].to(grid.device)) for cells, t in zip(grid, targets)]
        logits, classes = (torch.cat(part) for part in zip(*pairs))
        if not classes.numel():
            return {"loss_actor_class": grid.sum() * 0.0}                         # keeps the graph connected
        return {"loss_actor_class": F.cross_entropy(logits, classes)}

    def loss_video(self, outputs, targets, indices, num_boxes) -> dict:
        """Video-level CE on ``video_logits (B, C+1)``: the target is spread evenly over the video's
        classes, or no_object for a video without action. No matching: it reaches the trunk directly.
        Nothing when the outputs have no ``video_logits`` (evaluation, auxiliary decoder outputs)."""
        if "video_logits" not in outputs:
            return {}
        logits = outputs["video_logits"].float()
        target = torch.zeros_like(logits)
        for row, t in zip(target, targets):
            labels = t["labels"].long().to(logits.device)
            if labels.numel():
                row.index_add_(0, labels, torch.full(labels.shape, 1.0 / labels.numel(), device=logits.device))
            else:
                row[-1] = 1.0
        return {"loss_video": F.cross_entropy(logits, target)}

    def get_loss(self, name, outputs, targets, indices, num_boxes) -> dict:
        loss_fns = {"labels": self.loss_labels, "boxes": self.loss_boxes, "video": self.loss_video,
                    "locate": self.loss_locate, "acting": self.loss_acting, "actor": self.loss_actor_class}
        return loss_fns[name](outputs, targets, indices, num_boxes)

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict:
        """``num_boxes``: total target boxes (across all processes under DDP); default counts ``targets``."""
        if num_boxes is None:
            num_boxes = num_target_boxes(targets, is_tube_output(outputs))
        num_boxes = max(float(num_boxes), 1.0)
        losses = {}
        indices = self.matcher(outputs, targets)
        for name in self.losses:
            losses.update(self.get_loss(name, outputs, targets, indices, num_boxes))
        for layer, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self.matcher(aux, targets)
            for name in (n for n in self.losses if n not in ("acting", "actor")):   # the maps are the same for every layer
                terms = self.get_loss(name, aux, targets, aux_indices, num_boxes)
                losses.update({f"{k}_{layer}": v for k, v in terms.items() if k.startswith("loss_")})
        return losses

    def total(self, losses: dict) -> torch.Tensor:
        """The weighted sum that is trained on."""
        return sum(losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict)


def acting_cells(labels: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """``(K, side*side)`` float, 1 at the cells (row-major, square grid over the frame) whose centre lies in the box of a
    track acting at that step, and at the cell holding that box's centre (a box smaller than a cell). ``labels (M,
    K)`` (-1 = not acting), ``boxes (M, K, 4)`` cxcywh normalised."""
    steps = labels.shape[1]
    target = torch.zeros(steps, side, side)
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    for (cx, cy, w, h), (m, k) in zip(boxes[labels >= 0].float().tolist(), (labels >= 0).nonzero().tolist()):
        inside_x = (centres - cx).abs() <= w / 2
        inside_y = (centres - cy).abs() <= h / 2
        target[k] = torch.maximum(target[k], (inside_y[:, None] & inside_x[None, :]).float())
        target[k, min(int(cy * side), side - 1), min(int(cx * side), side - 1)] = 1.0
    return target.flatten(1)


def _matched(targets: list[dict], indices, key: str, device) -> torch.Tensor:
    """``key`` of every target row the matcher assigned, in :func:`_flat_indices` order, on ``device``."""
    return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices)]).to(device)


def _flat_indices(indices):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


def build_criterion(num_classes: int, num_decoder_layers: int = 4, aux_loss: bool = True,
                    weights: dict = PUBLISHED_WEIGHTS, eos_coef: float = 0.1, video_loss_coef: float = 0.0,
                    cost_class: float | None = None, tube: bool = False) -> SetCriterion:
    """The published recipe: matcher costs and loss weights 2 / 5 / 2, no-object weight 0.1,
    auxiliary losses on every earlier decoder layer with the same weights. ``video_loss_coef`` > 0
    adds the video-level class loss (:meth:`SetCriterion.loss_video`) with that weight. The matcher's
    costs are the loss weights, except ``cost_class`` when given. ``tube``: the tube mode's locator, actionness,
    presence and actor-class losses too."""
    matcher = HungarianMatcher(weights["loss_ce"] if cost_class is None else cost_class,
                               weights["loss_bbox"], weights["loss_giou"])
    weight_dict = {**weights, **({"loss_locate": LOCATE_WEIGHT} if tube else {})}
    if aux_loss:
        for layer in range(num_decoder_layers - 1):
            weight_dict.update({f"{k}_{layer}": v for k, v in weight_dict.items() if not k[-1].isdigit()})
    if tube:   # the map is the same for every decoder layer: one term
        weight_dict.update(loss_acting=ACTING_WEIGHT, loss_presence=ACTING_WEIGHT, loss_actor_class=ACTOR_CLASS_WEIGHT)
    losses = ("labels", "boxes") + (("locate", "acting", "actor") if tube else ())
    if video_loss_coef > 0:
        weight_dict["loss_video"] = video_loss_coef
        losses += ("video",)
    return SetCriterion(num_classes, matcher, weight_dict, eos_coef, losses)
