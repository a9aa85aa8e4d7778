"""Tube mode of the network (model.STAR(tube_steps=K)), its per-tube matching and per-step losses, how tubes
are read from its outputs, and that the published layout is untouched by it."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

import checkpoint
import model as M
import model_setup
import postprocess
import tube_metrics
from losses import HungarianMatcher, acting_cells, build_criterion, num_target_boxes
from records import VideoRecord
from targets import clip_target, tube_target

TUBE_KEYS = {"backbone.time_pixel.0.weight", "backbone.time_pixel.0.bias", "backbone.time_proj.weight", "backbone.time_proj.bias", "backbone.time_norm.weight",
             "backbone.time_norm.bias", "time_queries.weight", "locate.query.weight", "locate.query.bias",
             "locate.key.weight", "locate.key.bias", "locate.anchors", "acting.cell.0.weight", "acting.cell.0.bias",
             "acting.time.weight", "acting.time.bias", "acting.out.weight", "acting.out.bias", "actor_class.weight",
             "actor_class.bias", "actor_size.cell.0.weight", "actor_size.cell.0.bias", "actor_size.space.weight",
             "actor_size.space.bias", "actor_size.out.weight", "actor_size.out.bias"}
SMALL = dict(num_queries=3, dim_feedforward=64, num_decoder_layers=2, max_positions=600)


def xyxy(boxes):
    return box_convert(boxes, "cxcywh", "xyxy")


def test_tube_mode_shapes_aux_outputs_and_tokens():
    torch.manual_seed(0)
    net = M.STAR(2, tube_steps=4, **SMALL)
    x = torch.randn(2, 4, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        out = net(x, return_aux=True)
        tokens = net.encode(x)
    assert out["pred_logits"].shape == (2, 3, 4, 3) and out["pred_boxes"].shape == (2, 3, 4, 4)
    assert [a["pred_logits"].shape for a in out["aux_outputs"]] == [(2, 3, 4, 3)]
    t, h, w = M.token_grid(net, 4, 64)
    time_steps = 4                                          # the time tokens keep every frame (one per time query)
    assert tokens.shape == (2, t * h * w + time_steps * 4 * h * w, 256)   # trunk tokens, then time tokens (2x finer)
    net.train()
    out = net(x)
    assert out["video_logits"].shape == (2, 3) and len(out["aux_outputs"]) == 1
    out["pred_logits"].sum().backward()
    assert net.time_queries.weight.grad.abs().sum() > 0 and net.backbone.time_proj.weight.grad.abs().sum() > 0


def test_each_actor_step_query_is_actor_plus_time_and_the_step_order_is_kept():
    torch.manual_seed(0)
    net = M.STAR(2, tube_steps=3, time_tokens=False, **SMALL).eval()
    seen = {}
    net.decoder.register_forward_pre_hook(lambda module, args: seen.update(queries=args[0], memory=args[1]))
    with torch.no_grad():
        out = net(torch.randn(1, 3, 3, 32, 32))
        hidden = net.decoder(seen["queries"], seen["memory"])[-1]            # (1, Q*K, D), actor-major
        flat = net.head(hidden)["pred_logits"]
    expected = net.queries.weight[:, None] + net.time_queries.weight[None]   # (Q, K, D)
    assert torch.equal(seen["queries"][0].view(3, 3, -1), expected)
    assert torch.equal(out["pred_logits"][0, 1, 2], flat[0, 1 * 3 + 2])      # actor 1, step 2


def test_tube_layout_is_the_published_one_plus_the_tube_keys_and_records_its_mode(tmp_path):
    clip, tube = M.STAR(2).state_dict(), M.STAR(2, tube_steps=8).state_dict()
    assert set(tube) - set(clip) == TUBE_KEYS and set(clip) <= set(tube)
    assert all(clip[k].shape == tube[k].shape for k in clip)
    assert tube["time_queries.weight"].shape == (8, 256) and tube["backbone.time_proj.weight"].shape == (256, 128, 1, 1, 1)
    # per pixel: the stem's spatial conv (45 channels, one frame each), its output (64) and layer1 (64)
    assert tube["backbone.time_pixel.0.weight"].shape == (128, 45 + 64 + 64, 1, 1, 1)
    args = checkpoint.model_args_from(2, tube_steps=4, **SMALL)
    net = M.STAR(**args).eval()
    path = tmp_path / "tube.pth"
    checkpoint.save_checkpoint(checkpoint.make_checkpoint(net, args, ["a", "b"], {"num_frames": 4, "img_size": 64, "window_sec": 1.0}), path)
    loaded, info = checkpoint.load_checkpoint(path)
    assert info["model_args"]["tube_steps"] == 4 and loaded.tube_steps == 4
    x = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["pred_boxes"], net(x)["pred_boxes"])
    # a clip-mode checkpoint written before tube mode existed (no tube keys in model_args) loads as clip mode
    old_args = {k: v for k, v in checkpoint.model_args_from(2, **SMALL).items() if k not in ("tube_steps", "time_tokens")}
    checkpoint.save_checkpoint(checkpoint.make_checkpoint(M.STAR(2, **SMALL), old_args, ["a", "b"], {"num_frames": 4, "img_size": 64}), path)
    loaded, info = checkpoint.load_checkpoint(path)
    assert loaded.tube_steps == 0 and not hasattr(loaded, "time_queries") and loaded.backbone.time_proj is None


def test_position_init_covers_the_time_tokens():
    net = M.STAR(2, tube_steps=4, **SMALL)
    model_setup.init_positions(net, 4, 64)
    t, h, w = M.token_grid(net, 4, 64)
    table = net.pos_embedding.embedding.weight.detach()
    reference, fine = M.STAR(2, **SMALL), M.STAR(2, **SMALL)
    model_setup.init_position_table(reference, (4, h, w))                    # the decoder's pooled time tokens
    model_setup.init_position_table(fine, (4, 2 * h, 2 * w))                 # the locator's
    n = t * h * w
    assert torch.equal(table[n:n + 4 * h * w], reference.pos_embedding.embedding.weight.detach()[:4 * h * w])
    n += 4 * h * w
    assert torch.equal(table[n:n + 16 * h * w], fine.pos_embedding.embedding.weight.detach()[:16 * h * w])


# ----------------------------------------------------------------------------- matching and losses

def _tube_case(seed, Q=4, K=3, C=3, M_=3, absent=0.3):
    g = torch.Generator().manual_seed(seed)
    out = {"pred_logits": torch.randn(1, Q, K, C + 1, generator=g),
           "pred_boxes": torch.rand(1, Q, K, 4, generator=g) * 0.5 + 0.2}
    labels = torch.randint(0, C, (M_, K), generator=g)
    labels[torch.rand(M_, K, generator=g) < absent] = -1
    labels[:, 0] = labels[:, 0].clamp(min=0)               # every track acts at one step at least
    boxes = torch.rand(M_, K, 4, generator=g) * 0.4 + 0.2
    boxes[labels < 0] = 0
    return out, {"track_labels": labels, "track_boxes": boxes, "labels": labels[:, 0], "boxes": boxes[:, 0]}


@pytest.mark.parametrize("seed", range(12))
def test_tube_matching_equals_brute_force(seed):
    out, target = _tube_case(seed, M_=1 + seed % 4)
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    (rows, cols), = matcher(out, [target])
    prob = out["pred_logits"][0].softmax(-1)
    labels, boxes = target["track_labels"], target["track_boxes"]

    def cost(q, m):   # written out step by step, as the issue states it
        total = 0.0
        for k in range(labels.shape[1]):
            if labels[m, k] < 0:
                continue
            pred, true = out["pred_boxes"][0, q, k], boxes[m, k]
            giou = generalized_box_iou(xyxy(pred[None]), xyxy(true[None]))[0, 0]
            total += 5 * float((pred - true).abs().sum()) - 2 * float(prob[q, k, labels[m, k]]) - 2 * float(giou)
        return total
    num_tracks = len(labels)
    best = min(sum(cost(q, m) for m, q in enumerate(perm)) for perm in itertools.permutations(range(4), num_tracks))
    assert len(rows) == num_tracks and sorted(cols.tolist()) == list(range(num_tracks))
    assert sum(cost(q, m) for q, m in zip(rows.tolist(), cols.tolist())) == pytest.approx(best, abs=1e-4)


def test_a_track_absent_at_a_step_supervises_no_object_there_and_no_box():
    C, K = 2, 3
    out = {"pred_logits": torch.randn(1, 2, K, C + 1), "pred_boxes": torch.full((1, 2, K, 4), 0.3)}
    labels = torch.tensor([[1, -1, 1]])                    # the actor pauses at step 1
    boxes = torch.tensor([[[0.3, 0.3, 0.3, 0.3], [0, 0, 0, 0], [0.3, 0.3, 0.3, 0.3]]])
    target = {"track_labels": labels, "track_boxes": boxes, "labels": torch.tensor([1]), "boxes": boxes[:, 0]}
    criterion = build_criterion(C, aux_loss=False, eos_coef=0.1)
    (rows, _), = criterion.matcher(out, [target])
    losses = criterion(out, [target])
    expected_classes = torch.full((1, 2, K), C)
    expected_classes[0, rows[0]] = torch.tensor([1, C, 1])
    # the matched query's every step weighs 1, its idle step 1 too; the unmatched query's no_object steps 0.1
    weight = torch.full((1, 2, K), 0.1)
    weight[0, rows[0]] = 1.0
    per_pair = torch.stack([F.cross_entropy(out["pred_logits"][0, q, k][None], expected_classes[0, q, k][None])
                            for q in range(2) for k in range(K)]).view(1, 2, K)
    expected = (per_pair * weight).sum() / weight.sum()
    assert float(losses["loss_ce"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(losses["loss_bbox"]) == pytest.approx(0.0, abs=1e-7)     # the step-1 box (0.3 vs 0) is not a target
    assert num_target_boxes([target], tube=True) == 2 and num_target_boxes([target], tube=False) == 1
    out["pred_boxes"][0, :, 0] = 0.4                        # a wrong box at an acting step costs 4 * 0.1 / 2 boxes
    assert float(criterion(out, [target])["loss_bbox"]) == pytest.approx(0.2, rel=1e-5)


def test_tube_criterion_trains_on_whole_video_targets_and_empty_clips():
    C, K = 3, 4
    record = VideoRecord(video="v.mp4", path="v.mp4", labels=np.array([2]), boxes=np.array([[0.1, 0.2, 0.5, 0.6]]),
                         width=10, height=10, num_frames=20, fps=10.0)
    target = clip_target(record, np.arange(K))
    assert target["track_labels"].tolist() == [[2] * K]    # 5-field labels: the same class at every step
    empty = tube_target("e.mp4", np.arange(K), [], [], np.zeros((0, K), bool), np.zeros((0, K, 4)))
    out = {"pred_logits": torch.randn(2, 3, K, C + 1, requires_grad=True),
           "pred_boxes": torch.rand(2, 3, K, 4, requires_grad=True)}
    criterion = build_criterion(C, aux_loss=False)
    targets = [{k: v for k, v in t.items() if k != "video"} for t in (target, empty)]
    losses = criterion(out, targets)
    total = criterion.total(losses)
    total.backward()
    assert torch.isfinite(total) and out["pred_boxes"].grad.abs().sum() > 0


# ----------------------------------------------------------------------------- reading tubes

def test_tube_class_is_the_best_summed_over_steps_and_step_scores_follow_it():
    # one query, 3 steps, classes a, b (+ no_object): a wins over the steps though b is the best at step 0
    probs = torch.tensor([[[0.1, 0.6, 0.3], [0.7, 0.1, 0.2], [0.6, 0.1, 0.3]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.4, 0.5, 0.2, 0.2], [0.3, 0.5, 0.2, 0.2]]])
    (pred,) = postprocess.outputs_to_predictions({"pred_logits": probs.log()[None], "pred_boxes": boxes[None]})
    assert pred["labels"].tolist() == [0]
    assert torch.allclose(pred["step_scores"], torch.tensor([[0.1, 0.7, 0.6]]))
    assert torch.allclose(pred["step_acting"], torch.tensor([[0.7, 0.8, 0.7]]))   # any class: 1 - p(no_object)
    assert pred["scores"].tolist() == pytest.approx([0.7])                # the clip view: the best step
    assert torch.allclose(pred["boxes"], torch.tensor([[0.3, 0.4, 0.5, 0.6]]))   # its box there, xyxy
    assert pred["step_boxes"].shape == (1, 3, 4)


def test_tube_scorer_takes_a_detection_per_step_and_a_tube_of_the_steps_where_it_acts():
    pred = {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]),
            "step_scores": torch.tensor([[0.9, 0.2, 0.4]]), "step_acting": torch.tensor([[0.95, 0.3, 0.6]]),
            "step_boxes": torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.1, 0.0, 0.6, 0.5], [0.2, 0.0, 0.7, 0.5]]])}
    scorer = tube_metrics.TubeScorer(2)
    scorer.add_clip_predictions("v", [0, 5, 10], pred, 100, 10, threshold=0.5)
    assert [(d[1], d[2], round(d[3], 2), round(d[4], 4)) for d in scorer.detections] == [(0, 1, 0.9, 0.0), (5, 1, 0.2, 10.0),
                                                                               (10, 1, 0.4, 20.0)]
    (tube,) = scorer.pred_tubes   # step 2 acts (0.6) though its class says 0.4: in the tube, scored by the class
    assert tube.frames.tolist() == [0, 10] and tube.score == pytest.approx(0.65) and tube.class_id == 1


def test_each_step_reads_only_its_own_frames_time_tokens():
    torch.manual_seed(0)
    net = M.STAR(2, num_queries=2, tube_steps=4, dim_feedforward=32, num_decoder_layers=1, max_positions=400).eval()
    x = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        tokens = net.encode(x)
        places = tokens.shape[1] // (net.trunk_steps + 4 * 4)                  # h * w; time tokens on a 2x finer grid
        before = net.decode(tokens)["pred_boxes"]
        changed = tokens.clone()
        start = (net.trunk_steps + 2 * 4) * places                             # frame 2's time tokens
        changed[:, start:start + 4 * places] += 1.0
        after = net.decode(changed)["pred_boxes"]
        changed_trunk = tokens.clone()
        changed_trunk[:, :places] += 1.0                                       # a trunk token: every step sees it
        after_trunk = net.decode(changed_trunk)["pred_boxes"]
    moved = (after - before).abs().amax(dim=(0, 1, 3))                         # per step
    assert moved[2] > 1e-4 and moved[[0, 1, 3]].max() == 0                     # one layer: no self-attention mixing yet
    assert ((after_trunk - before).abs().amax(dim=(0, 1, 3)) > 1e-4).all()
    assert M.STAR(2, num_queries=2, tube_steps=4, time_tokens=False).step_mask(10) is None


def test_locate_loss_is_the_cross_entropy_towards_the_true_centres_cell_where_the_track_acts():
    K, side = 2, 3
    labels = torch.tensor([[0, -1]])                                       # acts at step 0 only
    boxes = torch.tensor([[[0.8, 0.4, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]])  # centre (0.8, 0.4): column 2, row 1
    target = {"track_labels": labels, "track_boxes": boxes, "labels": torch.tensor([0]), "boxes": boxes[:, 0]}
    cells = torch.randn(1, 1, K, side * side)
    out = {"pred_logits": torch.randn(1, 1, K, 2), "pred_boxes": torch.full((1, 1, K, 4), 0.5), "pred_cells": cells}
    criterion = build_criterion(1, aux_loss=False, tube=True)
    loss = criterion(out, [target])["loss_locate"]
    assert float(loss) == pytest.approx(float(F.cross_entropy(cells[0, 0, :1], torch.tensor([1 * side + 2]))), rel=1e-6)
    assert "loss_locate" in criterion.weight_dict and "loss_locate" not in build_criterion(1).weight_dict
    net = M.STAR(2, tube_steps=4, **SMALL).train()
    assert net(torch.randn(1, 4, 3, 64, 64))["pred_cells"].shape == (1, 3, 4, 64)   # the locator's 8x8 grid at 64 px
    assert "pred_cells" not in net.eval()(torch.randn(1, 4, 3, 64, 64))


def test_step_probabilities_are_the_decoders_class_times_the_actionness():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])                 # two (actor, step) pairs, C = 2
    acting = torch.tensor([0.8, 0.1])
    got = M.step_log_probs(logits, acting).softmax(-1)
    p = logits.softmax(-1)
    want = torch.stack([acting * p[:, 0], acting * p[:, 1], 1 - acting * (1 - p[:, 2])], -1)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got.sum(-1), torch.ones(2))
    # the network applies it: a map that says "not acting" everywhere leaves only no_object
    torch.manual_seed(0)
    net = M.STAR(2, tube_steps=4, **SMALL).eval()
    with torch.no_grad():
        net.acting.out.weight.zero_()
        net.acting.out.bias.fill_(-20.0)
        plain = net(torch.randn(1, 4, 3, 64, 64))["pred_logits"].softmax(-1)
    assert torch.allclose(plain[..., -1], torch.ones(()), atol=1e-6)          # nothing acts: no_object everywhere


def test_presence_at_test_time_is_the_map_averaged_over_each_box(monkeypatch):
    """In evaluation the (actor, step)'s presence is the map's 3x3 maximum averaged over its predicted box (the
    cells' shares of it), not where the locator looks."""
    torch.manual_seed(0)
    net = M.STAR(2, tube_steps=4, **SMALL).eval()
    maps = torch.randn(1, 4, 64) * 3                                           # 8x8 grid at 64 px
    monkeypatch.setattr(net.acting, "forward", lambda memory: maps)
    seen, real = [], M.step_log_probs
    monkeypatch.setattr(M, "step_log_probs", lambda logits, acting: seen.append(acting) or real(logits, acting))
    with torch.no_grad():
        out = net(torch.randn(1, 4, 3, 64, 64))
    weights = M.box_cell_weights(out["pred_boxes"], 8)                         # (1, Q, K, 64)
    want = torch.einsum("bqkg,bkg->bqk", weights, M._neighbourhood_max(maps.sigmoid()))
    assert len(seen) == 1 and torch.allclose(seen[0], want, atol=1e-6)
    assert want.std() > 0.01                                  # boxes in different places read differently


def test_acting_cells_mark_the_cells_inside_an_acting_box_and_its_centre_cell():
    labels = torch.tensor([[1, -1], [0, 0]])
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.3], [0.5, 0.5, 1.0, 1.0]],       # track 0 idle at step 1: not marked
                          [[0.9, 0.9, 0.01, 0.01], [0.9, 0.9, 0.01, 0.01]]])   # smaller than a cell: its centre cell
    got = acting_cells(labels, boxes, 4).view(2, 4, 4)
    want = torch.zeros(2, 4, 4)
    want[0, 1, 1] = 1.0                              # cell centres 0.125 / 0.375 / ...: x in [0.2, 0.4], y in [0.25, 0.55]
    want[:, 3, 3] = 1.0
    assert torch.equal(got, want)


def test_acting_losses_are_the_cells_binary_ce_and_the_matched_steps_presence_ce_one_term_each():
    labels, boxes = torch.tensor([[0, -1]]), torch.tensor([[[0.3, 0.4, 0.2, 0.3]] * 2])
    target = {"track_labels": labels, "track_boxes": boxes, "labels": torch.tensor([0]), "boxes": boxes[:, 0]}
    acting, presence = torch.randn(1, 2, 16), torch.tensor([[[0.9, 0.2], [0.5, 0.5]]])   # 2 queries x 2 steps
    aux = {"pred_logits": torch.tensor([[[[3.0, 0.0]] * 2, [[0.0, 3.0]] * 2]]), "pred_boxes": torch.full((1, 2, 2, 4), 0.5),
           "pred_acting": acting, "pred_presence": presence}
    out = {**aux, "aux_outputs": [dict(aux)]}
    criterion = build_criterion(1, num_decoder_layers=2, tube=True)
    got = criterion(out, [target])
    cells = acting_cells(labels, boxes, 4)[None]
    assert float(cells.sum()) == 1.0
    want = F.binary_cross_entropy_with_logits(acting, cells, reduction="sum") / 2.0   # 1 acting cell: the floor, B*K = 2
    assert float(got["loss_acting"]) == pytest.approx(float(want), rel=1e-6)
    # query 0 says the class of the track: it is matched; its track acts at step 0 only
    assert float(got["loss_presence"]) == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2, rel=1e-5)
    assert not {"loss_acting_0", "loss_presence_0"} & set(got)
    assert {"loss_acting", "loss_presence"} <= set(criterion.weight_dict)
    assert "loss_acting" not in build_criterion(1).weight_dict
    net = M.STAR(2, tube_steps=4, **SMALL).train()
    out = net(torch.randn(1, 4, 3, 64, 64))
    assert out["pred_acting"].shape == (1, 4, 64) and out["pred_presence"].shape == (1, 3, 4)
    assert not {"pred_acting", "pred_presence"} & set(net.eval()(torch.randn(1, 4, 3, 64, 64)))


def test_presence_reads_the_maps_3x3_maximum_brute_force():
    torch.manual_seed(0)
    cells = torch.rand(2, 3, 25)
    got = M._neighbourhood_max(cells).view(2, 3, 5, 5)
    grid = cells.view(2, 3, 5, 5)
    for r, c in itertools.product(range(5), range(5)):
        want = grid[..., max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].amax((-2, -1))
        assert torch.equal(got[..., r, c], want)


def test_each_actor_query_has_an_anchor_that_biases_where_it_looks():
    torch.manual_seed(0)
    locate = M.Locator(8, num_queries=12)
    assert locate.anchors.shape == (12, 2) and len({tuple(a) for a in locate.anchors.tolist()}) == 12
    assert ((locate.anchors > 0) & (locate.anchors < 1)).all()
    with torch.no_grad():
        locate.query.weight.zero_()
        locate.query.bias.zero_()                                          # no content: only the anchors speak
        centres, logits = locate(torch.randn(1, 12, 2, 8), torch.randn(1, 2, 16, 8))
    grid = (torch.arange(4) + 0.5) / 4
    cells = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(16, 2)    # (x, y), row-major
    want = -((cells[None] - locate.anchors[:, None]) ** 2).sum(-1) / (2 * M.ANCHOR_SPREAD ** 2)
    assert torch.allclose(logits[0, :, 0], want.detach(), atol=1e-5) and torch.allclose(logits[0, :, 1], want.detach(), atol=1e-5)
    # the located centre leans towards each query's own anchor
    assert ((centres[0, :, 0] - 0.5) * (locate.anchors - 0.5) >= -1e-6).all()


def test_box_cell_weights_are_the_boxs_share_of_each_cell_brute_force():
    torch.manual_seed(0)
    boxes = torch.cat([torch.rand(20, 2), torch.rand(20, 2) * 0.6 + 0.01], -1)   # cxcywh, some past the frame's edge
    side, fine = 5, 200                                                          # count a 200 x 200 pixel grid
    centres = (torch.arange(fine) + 0.5) / fine
    got = M.box_cell_weights(boxes, side)
    for box, weights in zip(boxes, got):
        cx, cy, w, h = box.tolist()
        inside = ((centres[:, None] - cy).abs() <= h / 2) & ((centres[None] - cx).abs() <= w / 2)   # (y, x)
        per_cell = inside.float().view(side, fine // side, side, fine // side).sum((1, 3)).flatten()
        assert torch.allclose(weights, per_cell / per_cell.sum(), atol=0.02)
    assert torch.equal(M.box_cell_weights(torch.tensor([0.1, 0.1, 0.02, 0.02]), 4), torch.eye(16)[0])   # inside one cell


def test_the_trunk_under_each_box_adds_class_evidence_that_starts_at_zero():
    torch.manual_seed(0)
    net = M.STAR(2, tube_steps=4, **{**SMALL, "dropout": 0.0}).train()             # train: the raw class logits
    assert not net.actor_class.weight.any() and not net.actor_class.bias.any()
    x = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        tokens = net.encode(x)
        before = net.decode(tokens)
        net.actor_class.weight.normal_()
        after = net.decode(tokens)
    # by hand: the trunk's tokens averaged under each predicted box, through the linear layer, added to the decoder's
    places = tokens.shape[1] - 4 * 4 * 16                                        # before the time tokens
    weights = M.box_cell_weights(after["pred_boxes"], int(places ** 0.5))
    features = torch.einsum("bqkg,bgd->bqkd", weights, tokens[:, :places])
    assert torch.allclose(net.box_features(tokens[:, :places], after["pred_boxes"]), features, atol=1e-6)
    assert torch.allclose(after["pred_logits"] - before["pred_logits"], net.actor_class(features), atol=1e-5)
    net.zero_grad()
    net(x)["pred_logits"].sum().backward()
    assert net.actor_class.weight.grad.abs().sum() > 0                            # the class loss trains it
    assert M.STAR(2, tube_steps=4, time_tokens=False, **SMALL).actor_class is None


def test_actor_class_loss_is_the_ce_of_the_map_under_each_true_box_over_the_actions_only():
    torch.manual_seed(0)
    net = M.STAR(3, tube_steps=4, **{**SMALL, "dropout": 0.0}).train()
    with torch.no_grad():
        net.actor_class.weight.normal_()
        net.actor_class.bias.normal_()
    out = net(torch.randn(2, 4, 3, 64, 64))
    grid = out["actor_map"]                                                      # (B, G, C+1)
    assert grid.shape == (2, 16, 4)                                              # 64 px: a 4x4 trunk grid, 3 + 1 classes
    labels = torch.tensor([[2, 2, -1, 0], [1, -1, -1, -1]])                      # clip 0: two tracks, one idle at 3 steps
    boxes = torch.rand(2, 4, 4) * 0.5 + 0.25
    targets = [{"track_labels": labels, "track_boxes": boxes, "labels": torch.tensor([2, 1]), "boxes": boxes[:, 0]},
               {"track_labels": torch.zeros(0, 4, dtype=torch.long), "track_boxes": torch.zeros(0, 4, 4),
                "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    got = build_criterion(3, num_decoder_layers=2, tube=True)(out, targets)
    # by hand: each acting (track, step)'s true box over the 4x4 cells, the map's 3 action logits, log-softmax
    terms = []
    for (m, k) in (labels >= 0).nonzero().tolist():
        weights = M.box_cell_weights(boxes[m, k], 4)
        logits = (weights[:, None] * grid[0, :, :3]).sum(0)
        terms.append(-logits.log_softmax(-1)[labels[m, k]])
    assert float(got["loss_actor_class"]) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    assert not any(k.startswith("loss_actor_class_") for k in got)               # one term: the map is every layer's
    net.zero_grad()
    got["loss_actor_class"].backward()
    assert net.backbone.proj.weight.grad.abs().sum() > 0                         # it reaches the trunk
    assert "actor_map" not in net.eval()(torch.randn(1, 4, 3, 64, 64))
    assert "loss_actor_class" not in build_criterion(3).weight_dict


def test_the_decoder_phase_fits_the_class_under_the_true_box_to_convergence():
    import engine
    torch.manual_seed(0)
    net = M.STAR(3, tube_steps=4, **{**SMALL, "dropout": 0.0}).eval()
    places = 16                                                                  # 64 px: a 4x4 trunk grid, 1 trunk step
    tokens = torch.randn(24, places + 4 * 4 * places, 256) * 0.5
    direction = torch.randn(3, 256)
    targets = []
    for i in range(len(tokens)):
        c = i % 3
        tokens[i, :places] += direction[c]                                       # the trunk says the class everywhere
        labels = torch.tensor([[c, c, -1, c]])
        boxes = torch.rand(1, 4, 4) * 0.4 + 0.3
        targets.append({"track_labels": labels, "track_boxes": boxes})
    assert engine.fit_actor_class(net, tokens, targets) == 1.0
    assert not net.actor_class.weight[-1].any() and not net.actor_class.bias[-1].any()   # no_object: the decoder's
    features, classes = engine.actor_box_features(net, tokens, targets)
    assert features.shape == (24 * 3, 256) and classes.tolist() == [i % 3 for i in range(24) for _ in range(3)]
    # the features are what the network reads under a box at inference: box_features on the true boxes
    memory, fine = net.split_tokens(tokens[:1])
    want = net.box_features(net.trunk_tokens(memory, fine), targets[0]["track_boxes"][None])[0, 0, [0, 1, 3]]
    assert torch.allclose(features[:3], want, atol=1e-5)
    assert (net.actor_class(features)[:, :3].argmax(-1) == classes).all()
    assert math.isnan(engine.fit_actor_class(net, tokens[:2], [{"track_labels": torch.full((0, 4), -1),
                                                                 "track_boxes": torch.zeros(0, 4, 4)}] * 2))


def test_each_frames_tokens_where_the_locator_looks_correct_the_box_size_from_zero():
    """The SizeMap starts at zero (the box head's sizes unchanged); set, each (actor, step)'s (w, h) logits gain its
    map read under the locator's attention, by hand: a 3x3 neighbourhood sum of each cell for the convolutions."""
    torch.manual_seed(0)
    net = M.STAR(2, tube_steps=4, **{**SMALL, "dropout": 0.0}).train()
    size_map = net.actor_size
    assert not size_map.out.weight.any() and not size_map.out.bias.any()
    x = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        tokens = net.encode(x)
        before = net.decode(tokens)
        size_map.out.weight.normal_(std=0.1)
        size_map.out.bias.normal_()
        seen = []
        hook = net.locate.register_forward_hook(lambda module, args, out: seen.append(out[1]))
        after = net.decode(tokens)
        hook.remove()
        memory, fine = net.split_tokens(tokens)
        frames = net.frame_memory(fine, memory.shape[1])                         # (1, K, G, D)
        side = int(frames.shape[2] ** 0.5)
        cells = size_map.cell(frames).unflatten(2, (side, side))                 # (1, K, side, side, width)
        padded = torch.nn.functional.pad(cells.permute(0, 1, 4, 2, 3), (1, 1, 1, 1))   # (1, K, width, side+2, side+2)
        w = size_map.space.weight[:, :, 0]                                      # (out, in, 3, 3)
        hidden = torch.stack([torch.stack([torch.einsum("kcij,ocij->ko", padded[0, :, :, r:r + 3, c:c + 3], w)
                                           for c in range(side)], -1) for r in range(side)], -2)
        hidden = torch.relu(hidden + size_map.space.bias[None, :, None, None])   # (K, width, side, side)
        padded = torch.nn.functional.pad(hidden, (1, 1, 1, 1))
        w = size_map.out.weight[:, :, 0]
        by_hand = torch.stack([torch.stack([torch.einsum("kcij,ocij->ko", padded[:, :, r:r + 3, c:c + 3], w)
                                            for c in range(side)], -1) for r in range(side)], -2)
        by_hand = (by_hand + size_map.out.bias[None, :, None, None]).flatten(2).transpose(1, 2)   # (K, G, 2)
        assert torch.allclose(size_map(frames)[0], by_hand, atol=1e-5)
    attention = seen[0].softmax(-1)                # the last layer (read first, then the auxiliary ones): (1, Q, K, G)
    old_wh, new_wh = before["pred_boxes"][..., 2:], after["pred_boxes"][..., 2:]
    assert torch.equal(before["pred_boxes"][..., :2], after["pred_boxes"][..., :2])   # centres untouched
    gained = torch.logit(new_wh.double()) - torch.logit(old_wh.double())          # (1, Q, K, 2)
    expected = torch.einsum("bqkg,kgc->bqkc", attention, by_hand)
    assert torch.allclose(gained.float(), expected, atol=2e-3) and expected.std() > 0.05
    net.zero_grad()
    net(x)["pred_boxes"].sum().backward()
    assert size_map.out.weight.grad.abs().sum() > 0 and net.locate.query.weight.grad is not None
    assert M.STAR(2, tube_steps=4, time_tokens=False, **SMALL).actor_size is None


def test_the_decoder_phase_steps_under_the_runs_autocast_and_says_how_many_it_skipped(monkeypatch, caplog):
    import logging
    import engine
    from losses import build_criterion
    torch.manual_seed(0)
    net = M.STAR(2, **SMALL)
    with torch.no_grad():
        tokens = net.encode(torch.randn(4, 4, 3, 64, 64))
    targets = [{"labels": torch.tensor([i % 2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])} for i in range(4)]
    params = [p for name, p in net.named_parameters() if not name.startswith("backbone.")]
    seen, decode = [], net.decode

    def recording_decode(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return decode(*args, **kwargs)
    monkeypatch.setattr(net, "decode", recording_decode)
    fit = dict(steps=2, lr=1e-4, weight_decay=1e-4, batch_size=2, grad_clip=0.1, seed=0, device=torch.device("cpu"),
               on_eval=lambda step, loss: None)
    engine.fit_decoder(net, params, build_criterion(2), tokens, targets, amp_dtype=torch.bfloat16, **fit)
    engine.fit_decoder(net, params, build_criterion(2), tokens, targets, amp_dtype=None, **fit)
    assert seen == [torch.bfloat16] * 2 + [None] * 2
    monkeypatch.setattr(engine, "optimizer_step", lambda *a, **k: False)          # every gradient norm non-finite
    with caplog.at_level(logging.WARNING, logger="star"):
        engine.fit_decoder(net, params, build_criterion(2), tokens, targets, amp_dtype=None, **fit)
    assert "decoder phase: 2 of 2 steps had a non-finite gradient norm and were skipped" in caplog.text
