"""Tests for losses.py: the Hungarian matcher against brute force (cost written independently here),
and every SetCriterion term against a hand computation with torchvision / torch.nn.functional."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou

from losses import PUBLISHED_WEIGHTS, HungarianMatcher, SetCriterion, build_criterion


def random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, 4)`` valid ``cx, cy, w, h`` boxes inside [0, 1]."""
    wh = 0.05 + 0.45 * torch.rand(n, 2, generator=gen)
    centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    return torch.cat([centre, wh], 1)


def random_outputs(batch: int, queries: int, num_classes: int, gen: torch.Generator) -> dict:
    return {"pred_logits": 2 * torch.randn(batch, queries, num_classes + 1, generator=gen),
            "pred_boxes": random_boxes(batch * queries, gen).view(batch, queries, 4)}


def random_targets(sizes, num_classes: int, gen: torch.Generator) -> list[dict]:
    return [{"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": random_boxes(n, gen)}
            for n in sizes]


# ---- the matching cost, written independently (plain Python floats) -----------------------------
def to_xyxy(box):
    cx, cy, w, h = box
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def giou(a, b) -> float:
    ax1, ay1, ax2, ay2 = to_xyxy(a)
    bx1, by1, bx2, by2 = to_xyxy(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def pair_cost(logits, box, label, tgt_box, w_class, w_bbox, w_giou) -> float:
    p = torch.softmax(logits.double(), -1)[label].item()
    l1 = sum(abs(u - v) for u, v in zip(box.tolist(), tgt_box.tolist()))
    return w_bbox * l1 - w_class * p - w_giou * giou(box.tolist(), tgt_box.tolist())


def brute_force_min(logits, boxes, target, weights) -> float:
    """Minimum total cost over all injective assignments of targets to queries."""
    n, q = len(target["labels"]), len(boxes)
    cost = [[pair_cost(logits[i], boxes[i], target["labels"][j].item(), target["boxes"][j], *weights)
             for j in range(n)] for i in range(q)]
    return min(sum(cost[perm[j]][j] for j in range(n)) for perm in itertools.permutations(range(q), n)), cost


# ---- matcher --------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(2.0, 5.0, 2.0), (1.0, 0.0, 3.0), (0.5, 2.0, 0.0)])
def test_matcher_equals_brute_force(weights):
    gen = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(*weights)
    for trial in range(15):
        num_queries = int(torch.randint(3, 6, (1,), generator=gen))
        sizes = [int(torch.randint(1, 4, (1,), generator=gen)) for _ in range(2)]
        outputs = random_outputs(2, num_queries, 3, gen)
        targets = random_targets(sizes, 3, gen)
        indices = matcher(outputs, targets)
        assert len(indices) == 2
        for b, (rows, cols) in enumerate(indices):
            assert rows.dtype == torch.int64 and cols.dtype == torch.int64
            assert len(rows) == len(cols) == sizes[b]
            assert sorted(cols.tolist()) == list(range(sizes[b]))             # every target once
            assert len(set(rows.tolist())) == sizes[b] and rows.max() < num_queries
            best, cost = brute_force_min(outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b], weights)
            got = sum(cost[i][j] for i, j in zip(rows.tolist(), cols.tolist()))
            assert got == pytest.approx(best, abs=1e-4), (trial, b)


def test_matcher_empty_and_mixed_targets():
    gen = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher()
    outputs = random_outputs(3, 5, 2, gen)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(3)]
    for rows, cols in matcher(outputs, empty):
        assert rows.numel() == 0 and cols.numel() == 0
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64

    targets = random_targets([0, 1, 3], 2, gen)
    indices = matcher(outputs, targets)
    assert [len(r) for r, _ in indices] == [0, 1, 3]
    assert all(r.dtype == torch.int64 and c.dtype == torch.int64 for r, c in indices)
    # each non-empty video is matched as if it were alone
    for b in (1, 2):
        alone = matcher({k: v[b:b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        pairs = sorted(zip(*[t.tolist() for t in indices[b]]))
        assert pairs == sorted(zip(*[t.tolist() for t in alone]))
        best, cost = brute_force_min(outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b], (2, 5, 2))
        assert sum(cost[i][j] for i, j in pairs) == pytest.approx(best, abs=1e-4)


# ---- criterion ------------------------------------------------------------------------------------
def cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def hand_losses(outputs, targets, indices, num_classes, num_boxes):
    logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    batch, queries = logits.shape[:2]
    target_classes = torch.full((batch, queries), num_classes, dtype=torch.int64)
    src, tgt = [], []
    for b, (rows, cols) in enumerate(indices):
        target_classes[b, rows] = targets[b]["labels"][cols]
        src.append(boxes[b, rows])
        tgt.append(targets[b]["boxes"][cols])
    src, tgt = torch.cat(src), torch.cat(tgt)
    weight = torch.tensor([1.0] * num_classes + [0.1])
    ce = F.cross_entropy(logits.reshape(-1, num_classes + 1), target_classes.reshape(-1), weight=weight)
    l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
    g = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))
    return {"loss_ce": ce, "loss_bbox": l1, "loss_giou": (1 - g).sum() / num_boxes}


def test_criterion_terms_equal_hand_computation():
    gen = torch.Generator().manual_seed(2)
    criterion = build_criterion(2, aux_loss=False)
    outputs = random_outputs(3, 6, 2, gen)
    targets = random_targets([2, 0, 3], 2, gen)
    losses = criterion(outputs, targets)
    indices = criterion.matcher(outputs, targets)
    expected = hand_losses(outputs, targets, indices, 2, num_boxes=5)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
        assert losses[key].dtype == torch.float32
    # class_error: 100 - accuracy of the matched queries
    matched_logits = torch.cat([outputs["pred_logits"][b, r] for b, (r, _) in enumerate(indices)])
    matched_labels = torch.cat([targets[b]["labels"][c] for b, (_, c) in enumerate(indices)])
    accuracy = (matched_logits.argmax(-1) == matched_labels).float().mean().item() * 100
    assert losses["class_error"].item() == pytest.approx(100 - accuracy)
    # an explicit num_boxes (e.g. summed over processes) is the divisor
    halved = criterion(outputs, targets, num_boxes=10)
    assert halved["loss_bbox"].item() == pytest.approx(expected["loss_bbox"].item() / 2, rel=1e-5)
    assert halved["loss_giou"].item() == pytest.approx(expected["loss_giou"].item() / 2, rel=1e-5)
    # the trained total is the weighted sum 2 CE + 5 L1 + 2 GIoU
    total = 2 * expected["loss_ce"] + 5 * expected["loss_bbox"] + 2 * expected["loss_giou"]
    assert criterion.total(losses).item() == pytest.approx(total.item(), rel=1e-5)


def test_video_loss_equals_hand_computation():
    gen = torch.Generator().manual_seed(5)
    outputs = random_outputs(3, 4, 3, gen)
    outputs["video_logits"] = torch.randn(3, 4, generator=gen)
    targets = random_targets([1, 2, 0], 3, gen)
    targets[1]["labels"] = torch.tensor([0, 2])            # two actors, two classes: half each
    criterion = build_criterion(3, aux_loss=False, video_loss_coef=1.5)
    losses = criterion(outputs, targets)
    log_p = torch.log_softmax(outputs["video_logits"], -1)
    first = -log_p[0, targets[0]["labels"][0]]
    expected = (first - 0.5 * (log_p[1, 0] + log_p[1, 2]) - log_p[2, 3]) / 3   # video 3: no_object
    assert losses["loss_video"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert criterion.weight_dict["loss_video"] == 1.5
    without = {k: v for k, v in losses.items() if k != "loss_video"}
    assert criterion.total(losses).item() == pytest.approx((criterion.total(without) + 1.5 * expected).item(), rel=1e-5)
    del outputs["video_logits"]                                # evaluation outputs: the term is left out
    assert "loss_video" not in criterion(outputs, targets)
    assert "loss_video" not in build_criterion(3, aux_loss=False).weight_dict   # the published recipe: off


def test_criterion_without_any_target_is_finite_and_differentiable():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 3, generator=gen, requires_grad=True)
    raw_boxes = torch.randn(2, 5, 4, generator=gen, requires_grad=True)
    outputs = {"pred_logits": logits, "pred_boxes": raw_boxes.sigmoid()}
    outputs["aux_outputs"] = [{"pred_logits": logits * 0.5, "pred_boxes": raw_boxes.sigmoid()} for _ in range(3)]
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    criterion = build_criterion(2)
    losses = criterion(outputs, targets)
    total = criterion.total(losses)
    assert torch.isfinite(total)
    assert all(torch.isfinite(losses[k]) for k in criterion.weight_dict)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    everything_no_object = torch.full((10,), 2, dtype=torch.int64)
    expected_ce = F.cross_entropy(logits.detach().reshape(-1, 3), everything_no_object)
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert raw_boxes.grad is not None and torch.isfinite(raw_boxes.grad).all()


def test_aux_terms_and_weight_dict():
    gen = torch.Generator().manual_seed(4)
    criterion = build_criterion(2)
    outputs = random_outputs(2, 6, 2, gen)
    outputs["aux_outputs"] = [random_outputs(2, 6, 2, gen) for _ in range(3)]
    targets = random_targets([1, 3], 2, gen)
    losses = criterion(outputs, targets)

    main = {"loss_ce", "loss_bbox", "loss_giou"}
    aux = {f"{k}_{i}" for k in main for i in range(3)}
    assert main | aux <= set(losses)
    assert {k for k in losses if k.startswith("loss_")} == main | aux
    assert set(criterion.weight_dict) == main | aux
    assert all(criterion.weight_dict[f"{k}_{i}"] == PUBLISHED_WEIGHTS[k] for k in main for i in range(3))
    assert PUBLISHED_WEIGHTS == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    for logging_only in ("class_error", "matched_iou"):
        assert logging_only in losses and logging_only not in criterion.weight_dict
    assert not any(k.startswith(("class_error_", "matched_iou_")) for k in losses)
    # each aux term is the criterion applied to that decoder layer's output alone (own matching)
    for i, aux_out in enumerate(outputs["aux_outputs"]):
        alone = criterion(aux_out, targets)
        for k in main:
            assert losses[f"{k}_{i}"].item() == pytest.approx(alone[k].item(), rel=1e-6)
    expected_total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    assert criterion.total(losses).item() == pytest.approx(expected_total.item(), rel=1e-6)
    # without aux_loss, no aux weights
    assert set(build_criterion(2, aux_loss=False).weight_dict) == main


def test_bf16_inputs_give_finite_fp32_losses():
    gen = torch.Generator().manual_seed(5)
    outputs = random_outputs(2, 6, 2, gen)
    outputs["aux_outputs"] = [random_outputs(2, 6, 2, gen) for _ in range(3)]
    bf16 = {"pred_logits": outputs["pred_logits"].bfloat16().requires_grad_(),
            "pred_boxes": outputs["pred_boxes"].bfloat16().requires_grad_(),
            "aux_outputs": [{k: v.bfloat16() for k, v in a.items()} for a in outputs["aux_outputs"]]}
    targets = random_targets([2, 1], 2, gen)
    criterion = build_criterion(2)
    losses = criterion(bf16, targets)
    for key, value in losses.items():
        assert value.dtype == torch.float32, key
        assert torch.isfinite(value), key
    criterion.total(losses).backward()
    assert torch.isfinite(bf16["pred_logits"].grad.float()).all()
    assert torch.isfinite(bf16["pred_boxes"].grad.float()).all()


def test_matcher_rejects_all_zero_costs_and_criterion_class_weight():
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)
    criterion = SetCriterion(3, HungarianMatcher(), {"loss_ce": 1.0}, eos_coef=0.1)
    assert criterion.class_weight.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])
