"""The STAR network: R(2+1)D-18 trunk -> tokens -> DETR-style decoder with learned queries. Its module names and
state-dict keys match the published ``best_model.pth`` exactly, so that file loads with ``strict=True``; checkpoint
files are read and written by checkpoint.py, and model_setup.py initialises, freezes and folds the network.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torchvision.models.video import r2plus1d_18

ANCHOR_SPREAD = 0.25   # tube mode: how far (in frame widths) an actor query's anchor reaches (Locator)
SIZE_EPS = 1e-4        # tube mode: box sizes are clamped to [eps, 1 - eps] before the SizeMap's logits are added


class TemporalConv3d(nn.Conv3d):
    """A ``(k, 1, 1)`` Conv3d (same parameters and keys) that pads time itself in bf16 CPU training.

    Why: oneDNN 3.12's bf16 backward-weights kernel (torch 2.14.1, AVX512-BF16 CPUs) reads uninitialised memory when
    the input has fewer steps than the kernel (R(2+1)D's layer3 at 8 frames, layer4 at 16); padded beforehand, the
    gradient is right (tools/check_bf16.py). fp32 and inference take the plain path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.padding[0]
        if not (pad and x.shape[2] < self.kernel_size[0] and x.device.type == "cpu" and torch.is_grad_enabled()
                and self.weight.requires_grad and _bf16_compute(x)):
            return super().forward(x)
        x = nn.functional.pad(x, (0, 0, 0, 0, pad, pad))
        return nn.functional.conv3d(x, self.weight, self.bias, self.stride, (0, *self.padding[1:]), self.dilation,
                                    self.groups)


def _bf16_compute(x: torch.Tensor) -> bool:
    """Whether a CPU conv on ``x`` runs in bf16 (a bf16 input, or bf16 CPU autocast)."""
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def use_temporal_convs(module: nn.Module) -> int:
    """Make every ``(k>1, 1, 1)`` Conv3d under ``module`` a :class:`TemporalConv3d` (its parameters kept, so
    state-dict keys and values are unchanged). Returns how many."""
    count = 0
    for conv in module.modules():
        if type(conv) is nn.Conv3d and conv.kernel_size[0] > 1 and conv.kernel_size[1:] == (1, 1):
            conv.__class__ = TemporalConv3d   # same attributes, new forward: no copy, optimiser state intact
            count += 1
    return count


class Backbone(nn.Module):
    """R(2+1)D-18 (stem + layer1..4) -> 1x1x1 conv to ``hidden_dim`` -> tokens -> LayerNorm -> dropout.

    Input ``(B, 3, T, H, W)``; output tokens ``(B, N, hidden_dim)`` flattened in ``(t, h, w)`` order,
    ``N = T/8 * H/16 * W/16`` (rounded up).

    With ``time_tokens`` (tube mode) ``T * (g*h) * (g*w)`` more tokens follow (``g = time_grid``): the stem's spatial
    conv, the stem's output and layer1's output at every frame, through a 1x1 conv + ReLU (``time_pixel``),
    average-pooled to ``time_steps`` x layer4's grid made ``g`` times finer, projected (``time_proj``) and normalised
    (``time_norm``); :meth:`STAR.split_tokens` divides them between decoder and locator. Why: at 8 frames layer4 has
    one time step, so none of its tokens is tied to one frame (docs/EXPERIMENTS.md, "Tube mode").
    """

    def __init__(self, hidden_dim: int = 256, dropout: float = 0.1, time_tokens: bool = False, time_grid: int = 1):
        super().__init__()
        trunk = r2plus1d_18(weights=None)
        self.stem = nn.Sequential(trunk.stem, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
        self.proj = nn.Conv3d(512, hidden_dim, kernel_size=1)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.time_grid = int(time_grid)   # the time tokens' grid is layer4's, this many times finer
        if time_tokens:
            spatial = _stem_parts(trunk.stem)[0]
            channels = _out_channels(nn.Sequential(*spatial)) + _out_channels(trunk.stem) + _out_channels(trunk.layer1)
            self.time_pixel = nn.Sequential(nn.Conv3d(channels, hidden_dim // 2, kernel_size=1), nn.ReLU())
            self.time_proj = nn.Conv3d(hidden_dim // 2, hidden_dim, kernel_size=1)
            self.time_norm = nn.LayerNorm(hidden_dim)
        else:
            self.time_pixel = self.time_proj = self.time_norm = None

    def forward(self, x: torch.Tensor, time_steps: int | None = None) -> torch.Tensor:
        """``time_steps``: the time tokens' steps (default: the stem's, the clip's frames)."""
        if self.time_proj is None:
            features = self.proj(self.stem(x))                 # (B, D, t, h, w)
            tokens = features.flatten(2).transpose(1, 2)       # (B, t*h*w, D)
            return self.dropout(self.norm(tokens))
        spatial, temporal = _stem_parts(self.stem[0])
        look = _run(spatial, x)                                # the stem's spatial conv: (B, 45, T, H/2, W/2)
        motion = _run(temporal, look)                          # the stem's output, frames k-1..k+1: (B, 64, T, H/2, W/2)
        early = self.stem[1](motion)                           # layer1: (B, 64, T, H/2, W/2)
        features = self.proj(self.stem[4](self.stem[3](self.stem[2](early))))
        if early.shape[2:] != look.shape[2:]:                  # a trunk whose layer1 strides (the tests' tiny one)
            early = nn.functional.interpolate(early, size=look.shape[2:])
        # plain ints: ONNX exports adaptive pooling only to a constant size
        size = (int(time_steps or look.shape[2]), *(int(n) * self.time_grid for n in features.shape[3:]))
        pooled = nn.functional.adaptive_avg_pool3d(self.time_pixel(torch.cat([look, motion, early], 1)), size)
        time_tokens = self.time_proj(pooled).flatten(2).transpose(1, 2)   # (B, T*h*w, D)
        tokens = torch.cat([self.norm(features.flatten(2).transpose(1, 2)), self.time_norm(time_tokens)], 1)
        return self.dropout(tokens)


def _stem_parts(stem: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """R(2+1)D's stem as (its spatial conv + BatchNorm + ReLU, one frame each; the rest: its temporal conv...)."""
    layers = list(stem)
    return layers[:3], layers[3:]


def _run(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``layers`` in order (a slice of R2Plus1dStem, which cannot slice itself)."""
    for layer in layers:
        x = layer(x)
    return x


def _out_channels(stage: nn.Module) -> int:
    """Channels a trunk stage puts out (R(2+1)D-18's layer1: 64): its last BatchNorm or conv says."""
    last = [m for m in stage.modules() if isinstance(m, (nn.BatchNorm3d, nn.Conv3d))][-1]
    return last.num_features if isinstance(last, nn.BatchNorm3d) else last.out_channels


class PositionEmbedding(nn.Module):
    """A learned table; row ``i`` is added to token ``i``."""

    def __init__(self, max_positions: int = 10000, hidden_dim: int = 256):
        super().__init__()
        self.embedding = nn.Embedding(max_positions, hidden_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        num_tokens = tokens.shape[1]
        if num_tokens > self.embedding.num_embeddings:
            raise ValueError(f"{num_tokens} tokens exceed the position table ({self.embedding.num_embeddings}); "
                             "use fewer frames or a smaller image size")
        return tokens + self.embedding.weight[:num_tokens].to(tokens.dtype)


class Decoder(nn.Module):
    """Post-norm ``nn.TransformerDecoder`` without final norm; can return every layer's output."""

    def __init__(self, hidden_dim, nheads, dim_feedforward, dropout, num_layers):
        super().__init__()
        layer = nn.TransformerDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, memory_mask=None) -> list[torch.Tensor]:
        """queries ``(B, Q, D)``, memory ``(B, N, D)`` -> list of ``(B, Q, D)``, one per layer.

        Same arithmetic as ``nn.TransformerDecoder.forward`` (no final norm; ``memory_mask`` ``(Q, N)`` bool,
        True = not attended, the tube mode's :meth:`STAR.step_mask`), but keeps the intermediate outputs for the
        auxiliary losses.
        """
        outputs, hidden = [], queries
        for layer in self.decoder.layers:
            hidden = layer(hidden, memory, memory_mask=memory_mask)
            outputs.append(hidden)
        return outputs


class Head(nn.Module):
    """Class MLP (``C+1`` logits, last = no_object) and box MLP (sigmoid ``cx, cy, w, h``)."""

    def __init__(self, hidden_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.class_head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes + 1))
        self.bbox_head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, 4), nn.Sigmoid())

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pred_logits": self.class_head(hidden), "pred_boxes": self.bbox_head(hidden)}


class Locator(nn.Module):
    """Tube mode with time tokens: where (actor q, step k) is, from the attention of its decoder output over its
    frame's time tokens.

    ``forward(hidden (B, Q, K, D), frame_memory (B, K, G, D))`` -> centres ``(B, Q, K, 2)`` (the attention-weighted
    mean ``(x, y)`` of the G cells' centres, a square grid) and the attention logits ``(B, Q, K, G)``. Each actor
    query has a learnt anchor (``anchors (Q, 2)``); the logits get ``-d^2 / (2 * ANCHOR_SPREAD^2)``, d a cell
    centre's distance from it, as in Anchor DETR. Why: a centre that is a mean of cell centres moves with what the
    query attends to from the first step, where a plain box head learns per-class mean places; the attention is
    trained towards the true centre's cell, since a mean over two actors' cells falls between them; the anchors make
    the queries of a two-actor clip look at different actors (docs/EXPERIMENTS.md, "Tube mode")."""

    def __init__(self, hidden_dim: int, num_queries: int):
        super().__init__()
        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.key = nn.Linear(hidden_dim, hidden_dim)
        columns = math.ceil(math.sqrt(num_queries))
        rows = math.ceil(num_queries / columns)
        place = torch.arange(num_queries, dtype=torch.float32)
        self.anchors = nn.Parameter(torch.stack([(place % columns + 0.5) / columns, (place // columns + 0.5) / rows], -1))

    def forward(self, hidden: torch.Tensor, frame_memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the centres ``(B, Q, K, 2)`` and the attention logits ``(B, Q, K, G)`` (trained towards the cell
        of the true centre: losses.SetCriterion.loss_locate)."""
        side = math.isqrt(frame_memory.shape[2])
        scores = torch.einsum("bqkd,bkgd->bqkg", self.query(hidden), self.key(frame_memory)) / math.sqrt(hidden.shape[-1])
        cells = (torch.arange(side, device=hidden.device, dtype=scores.dtype) + 0.5) / side
        ys, xs = torch.meshgrid(cells, cells, indexing="ij")
        centres = torch.stack([xs.flatten(), ys.flatten()], -1)                 # (G, 2) in (t, y, x) token order
        distance = ((centres[None] - self.anchors[:, None].to(scores.dtype)) ** 2).sum(-1)   # (Q, G)
        scores = scores - (distance / (2 * ANCHOR_SPREAD ** 2))[None, :, None]
        return scores.softmax(-1) @ centres, scores


class Actionness(nn.Module):
    """Tube mode with time tokens: how likely each cell of each step's frame holds an actor that acts then.

    ``forward(frame_memory (B, K, G, D))`` -> logits ``(B, K, G)``: each fine time token through a linear layer and
    ReLU, a conv over the cell's steps k-1..k+1, ReLU, a linear layer; trained by losses.SetCriterion.loss_acting,
    read by :meth:`STAR.read`. Why: the decoder's step scores are clip-wide, while a cell of a few frames knows only
    that stretch of time; the conv over steps because one frame's motion alone is ambiguous (a hop stands still at
    its top) (docs/EXPERIMENTS.md, "Tube mode")."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        width = hidden_dim // 4
        self.cell = nn.Sequential(nn.Linear(hidden_dim, width), nn.ReLU())
        # each cell with its steps k-1..k+1: a (3, 1, 1) conv over (steps, cells, 1), with no reshape for ONNX to fix the
        # batch size in, and a 5-D weight as channels_last_3d wants
        self.time = nn.Conv3d(width, width, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.out = nn.Linear(width, 1)
        nn.init.constant_(self.out.bias, -math.log(99.0))   # RetinaNet's prior: 1 % of the cells act, so the loss starts small

    def forward(self, frame_memory: torch.Tensor) -> torch.Tensor:
        x = self.cell(frame_memory).permute(0, 3, 1, 2).unsqueeze(-1)            # (B, width, K, G, 1)
        return self.out(torch.relu(self.time(x)).squeeze(-1).permute(0, 2, 3, 1)).squeeze(-1)


class SizeMap(nn.Module):
    """Tube mode with time tokens: a box size correction at each cell of each step's frame.

    ``forward(frame_memory (B, K, G, D))`` -> ``(B, K, G, 2)`` logits added to the box head's (w, h) logits where
    the :class:`Locator` attends (:meth:`STAR.read`): a linear layer and ReLU per fine time token, two 3x3 convs
    over the frame's grid, the last at zero so the network starts as the box head alone. Why: the box head reads
    the whole clip and gives about the clip's mean size; a frame's own tokens see the actor's extent in that frame
    (a wave's height swings) (docs/EXPERIMENTS.md, "Tube mode")."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        width = hidden_dim // 4
        self.cell = nn.Sequential(nn.Linear(hidden_dim, width), nn.ReLU())
        # (1, 3, 3) convs over (steps, rows, columns): no reshape of the batch, which ONNX would fix
        self.space = nn.Conv3d(width, width, kernel_size=(1, 3, 3), padding=(0, 1, 1))
        self.out = nn.Conv3d(width, 2, kernel_size=(1, 3, 3), padding=(0, 1, 1))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, frame_memory: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(frame_memory.shape[2])
        x = self.cell(frame_memory).permute(0, 3, 1, 2).unflatten(3, (side, side))   # (B, width, K, side, side)
        return self.out(torch.relu(self.space(x))).flatten(3).permute(0, 2, 3, 1)


def _neighbourhood_max(cells: torch.Tensor) -> torch.Tensor:
    """``cells (B, K, G)`` on a square grid -> the maximum over each cell's 3x3 neighbourhood, same shape. Why: a
    swelling (wave) moves the actor's edges, not its centre, where the locator looks (docs/EXPERIMENTS.md, "Tube
    mode", third session)."""
    side = math.isqrt(cells.shape[-1])
    grid = cells.reshape(-1, 1, side, side)
    return nn.functional.max_pool2d(grid, 3, stride=1, padding=1).reshape_as(cells)   # reshape_as: ONNX keeps B free


def box_cell_weights(boxes: torch.Tensor, side: int) -> torch.Tensor:
    """``boxes (..., 4)`` normalised cxcywh -> ``(..., side*side)``: the share of each cell of a square grid (row-major,
    ``(y, x)``) that the box covers, normalised to sum 1 (a box inside one cell gives that cell 1)."""
    edges = torch.arange(side + 1, device=boxes.device, dtype=boxes.dtype) / side
    lo, hi = edges[:-1], edges[1:]

    def cover(centre, size):   # (...,) -> (..., side): length of each cell's interval inside [centre -+ size/2]
        a, b = (centre - size / 2).unsqueeze(-1), (centre + size / 2).unsqueeze(-1)
        return (torch.minimum(b, hi) - torch.maximum(a, lo)).clamp(min=0)
    area = cover(boxes[..., 1], boxes[..., 3]).unsqueeze(-1) * cover(boxes[..., 0], boxes[..., 2]).unsqueeze(-2)
    area = area.flatten(-2)
    return area / area.sum(-1, keepdim=True).clamp(min=1e-12)


def acting_box_average(cells: torch.Tensor, track_labels: torch.Tensor, track_boxes: torch.Tensor):
    """``cells (G, X)`` of a square grid averaged over the box of every (track, step) where a track acts
    (:func:`box_cell_weights`; ``track_labels (M, K)``, -1 = not acting; ``track_boxes (M, K, 4)`` cxcywh) ->
    ``(A, X)`` and those pairs' classes ``(A,)``."""
    acting = track_labels >= 0
    weights = box_cell_weights(track_boxes[acting].to(cells), math.isqrt(cells.shape[0]))   # (A, G)
    return weights @ cells, track_labels[acting].long()


def step_log_probs(logits: torch.Tensor, acting: torch.Tensor) -> torch.Tensor:
    """Class log-probabilities ``(..., C+1)`` of (actor, step) pairs from the decoder's ``logits (..., C+1)`` and
    the probability ``acting (...)`` that the actor acts at that step: ``P(c) = acting * p(c)``, ``P(no_object) =
    1 - acting * (1 - p(no_object))``; softmax of the result gives these back."""
    log_p = logits.float().log_softmax(-1)
    acting = acting.float().clamp(1e-6, 1.0).unsqueeze(-1)
    idle = (1 - acting * (1 - log_p[..., -1:].exp())).clamp(min=1e-6)
    return torch.cat([log_p[..., :-1] + acting.log(), idle.log()], -1).to(logits.dtype)


class STAR(nn.Module):
    """End-to-end action detector.

    ``forward(x)``: ``x`` is ``(B, T, 3, H, W)``, preprocessed (RGB, /255, ImageNet mean/std).
    Returns ``{"pred_logits": (B, Q, C+1), "pred_boxes": (B, Q, 4)}`` with boxes ``(cx, cy, w, h)``
    normalised to [0, 1], plus ``"aux_outputs"`` (one such dict per earlier decoder layer) when
    ``return_aux`` (default: training with ``aux_loss``), plus in training ``"video_logits" (B, C+1)``:
    the class head applied to the mean trunk token (for the criterion's optional video-level loss).

    Tube mode (``tube_steps = K > 0``, K = the clip's T; the STAR paper's factorised queries): ``Q x K`` queries,
    actor query ``q`` plus time query ``k`` (``time_queries``), read by the same heads: ``pred_logits (B, Q, K,
    C+1)`` (no_object = not acting then) and ``pred_boxes (B, Q, K, 4)``; in training also ``pred_cells (B, Q, K,
    G)``, ``pred_acting (B, K, G)``, ``pred_presence (B, Q, K)`` and ``actor_map (B, G, C+1)`` for the criterion
    (:meth:`read`, :meth:`decode`). ``time_tokens`` (default on in tube mode) adds frame-rate tokens
    (:class:`Backbone`). Why one shared head: the published keys stay and every (actor, step) is the same question.
    ``tube_steps = 0`` is the published network, key for key.
    """

    def __init__(self, num_classes: int, num_queries: int = 12, hidden_dim: int = 256,
                 num_decoder_layers: int = 4, nheads: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1, max_positions: int = 10000, aux_loss: bool = True,
                 tube_steps: int = 0, time_tokens: bool | None = None, time_grid: int = 2):
        super().__init__()
        if tube_steps < 0:
            raise ValueError(f"tube_steps must be >= 0, got {tube_steps}")
        self.num_classes = num_classes
        self.aux_loss = aux_loss
        self.channels_last = False
        self.tube_steps = int(tube_steps)
        time_tokens = bool(tube_steps) if time_tokens is None else bool(time_tokens)
        if time_tokens and not tube_steps:
            raise ValueError("time_tokens are for the tube mode (tube_steps > 0)")
        self.backbone = Backbone(hidden_dim, dropout, time_tokens, time_grid)
        self.pos_embedding = PositionEmbedding(max_positions, hidden_dim)
        self.queries = nn.Embedding(num_queries, hidden_dim)
        if self.tube_steps:
            self.time_queries = nn.Embedding(self.tube_steps, hidden_dim)
        # the trunk's own time steps at K frames: where the time tokens start in the memory (see step_mask)
        self.trunk_steps = token_grid(self, self.tube_steps, 32)[0] if time_tokens else 0
        self.locate = Locator(hidden_dim, num_queries) if time_tokens else None
        self.acting = Actionness(hidden_dim) if time_tokens else None
        # class evidence of the trunk's tokens under each (actor, step)'s box (see read); zero: starts as the decoder alone.
        # Trained under the true boxes too (losses.SetCriterion.loss_actor_class), fitted in the decoder phase (engine)
        self.actor_class = nn.Linear(hidden_dim, num_classes + 1) if time_tokens else None
        if self.actor_class is not None:
            nn.init.zeros_(self.actor_class.weight)
            nn.init.zeros_(self.actor_class.bias)
        self.actor_size = SizeMap(hidden_dim) if time_tokens else None
        self.decoder = Decoder(hidden_dim, nheads, dim_feedforward, dropout, num_decoder_layers)
        self.head = Head(hidden_dim, num_classes, dropout)
        use_temporal_convs(self)

    def forward(self, x: torch.Tensor, return_aux: bool | None = None) -> dict:
        """Clips ``x (B, T, 3, H, W)``, preprocessed -> the outputs dict (see the class); ``decode(encode(x))`` in
        eval mode. ``return_aux`` None: the earlier decoder layers' outputs in training with ``aux_loss``."""
        if self.tube_steps and x.shape[1] != self.tube_steps:
            raise ValueError(f"this tube-mode network reads clips of {self.tube_steps} frames (one time query each), "
                             f"got {x.shape[1]}")
        tokens = self.encode(x)
        out = self.decode(tokens, return_aux)
        if self.training:   # the class head on the mean trunk token: a direct training signal for the trunk
            out["video_logits"] = self.head.class_head(tokens.mean(1))
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's tokens ``(B, N, hidden_dim)`` of clips ``x`` ``(B, T, 3, H, W)``."""
        video = x.transpose(1, 2)                                         # (B, 3, T, H, W) for Conv3d
        if self.channels_last:   # match the weights' layout, else every conv converts on its own
            video = video.contiguous(memory_format=torch.channels_last_3d)
        return self.backbone(video, self.tube_steps or None)

    def decode(self, tokens: torch.Tensor, return_aux: bool | None = None) -> dict:
        """Everything after the backbone on its tokens ``(B, N, hidden_dim)``: position table, queries,
        decoder, heads. Returns ``pred_logits``, ``pred_boxes`` and, when ``return_aux`` (default:
        training with ``aux_loss``), ``aux_outputs``. tools/decoder_probe.py trains it on cached tokens."""
        if return_aux is None:
            return_aux = self.training and self.aux_loss
        memory_tokens, fine = self.split_tokens(tokens)
        memory = self.pos_embedding(memory_tokens)
        queries = self.queries.weight
        if self.tube_steps:   # (Q, K, D) -> Q*K queries, actor-major
            queries = (queries[:, None] + self.time_queries.weight[None]).flatten(0, 1)
        layer_outputs = self.decoder(queries.unsqueeze(0).expand(tokens.shape[0], -1, -1), memory,
                                     self.step_mask(memory.shape[1]))
        frames = None if fine is None else self.frame_memory(fine, memory.shape[1])
        acting_map = None if frames is None else self.acting(frames)   # (B, K, G) logits: once, every layer reads it
        size_map = None if frames is None else self.actor_size(frames)   # (B, K, G, 2) logits: once, likewise
        trunk = None if frames is None else self.trunk_tokens(memory_tokens, fine)
        out = self.read(layer_outputs[-1], frames, acting_map, trunk, size_map)
        if self.training and trunk is not None:   # per-cell class evidence, for the criterion's loss_actor_class
            out["actor_map"] = self.actor_class(self.trunk_grid(trunk))
        if return_aux:
            out["aux_outputs"] = [self.read(hidden, frames, acting_map, trunk, size_map) for hidden in layer_outputs[:-1]]
        return out

    def split_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's memory tokens and, with time tokens, the fine ones ``(B, K, g*g*h*w, D)`` the
        :class:`Locator` reads (``g = time_grid``). The memory is the trunk's ``t*h*w`` tokens and the time
        tokens average-pooled back to the trunk's ``h x w`` grid (``K*h*w``). Why two grids: the locator's cells
        set how precisely a box centre can follow a small actor, and the decoder's cost grows with its memory."""
        if self.locate is None:
            return tokens, None
        g, K = self.backbone.time_grid, self.tube_steps
        places = tokens.shape[1] // (self.trunk_steps + K * g * g)           # h * w (a square grid)
        side, trunk = math.isqrt(places), self.trunk_steps * places
        fine = tokens[:, trunk:].unflatten(1, (K, side, g, side, g))          # (B, K, h, g, w, g, D)
        coarse = fine.mean((3, 5)).flatten(1, 3)                              # (B, K*h*w, D)
        return torch.cat([tokens[:, :trunk], coarse], 1), fine.flatten(2, 5)

    def trunk_tokens(self, memory_tokens: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """The trunk's own tokens ``(B, t*h*w, D)``: the memory before the ``K*h*w`` pooled time tokens (:meth:`split_tokens`'
        outputs)."""
        return memory_tokens[:, :self.trunk_steps * fine.shape[2] // self.backbone.time_grid ** 2]

    def frame_memory(self, fine: torch.Tensor, offset: int) -> torch.Tensor:
        """The fine time tokens ``(B, K, G, D)`` plus their rows of the position table (after the memory's
        ``offset`` rows)."""
        count = fine.shape[1] * fine.shape[2]
        table = self.pos_embedding.embedding.weight
        if offset + count > table.shape[0]:
            raise ValueError(f"{offset + count} tokens exceed the position table ({table.shape[0]}); "
                             "use fewer frames or a smaller image size")
        return fine + table[offset:offset + count].view(fine.shape[1:]).to(fine.dtype)

    def step_mask(self, num_tokens: int) -> torch.Tensor | None:
        """With time tokens: ``(Q*K, N)`` bool, True where (actor q, step k) may NOT look: at the time tokens of
        the other steps. Each step's query reads the trunk's tokens (the whole clip) and its own frame's time
        tokens. Why: the box of step k is where the actor is in frame k; without the mask the decoder must first
        learn which of the K*h*w time tokens belong to its step (docs/EXPERIMENTS.md, "Tube mode")."""
        if not self.trunk_steps:
            return None
        K = self.tube_steps
        places = num_tokens // (self.trunk_steps + K)                       # h * w of the trunk's grid
        token_step = torch.arange(num_tokens, device=self.queries.weight.device) - self.trunk_steps * places
        token_step = torch.where(token_step >= 0, token_step // places, -1)   # -1: a trunk token, seen by all
        query_step = torch.arange(K, device=token_step.device).repeat(self.queries.num_embeddings)   # actor-major
        return (token_step[None] >= 0) & (token_step[None] != query_step[:, None])

    def read(self, hidden: torch.Tensor, frames: torch.Tensor | None = None,
             acting_map: torch.Tensor | None = None, trunk: torch.Tensor | None = None,
             size_map: torch.Tensor | None = None) -> dict:
        """The heads on decoder output ``(B, Q[*K], D)``; tube mode reshapes to ``(B, Q, K, ...)``.

        With time tokens (``frames`` from :meth:`frame_memory`, ``acting_map`` and ``size_map`` their
        :class:`Actionness` and :class:`SizeMap` logits, ``trunk`` the trunk's tokens): box centre = the
        :class:`Locator`'s plus the box head's offset, size = the box head's plus ``size_map`` where the locator
        attends, class logits + ``actor_class`` of :meth:`box_features`. In evaluation the logits become
        :func:`step_log_probs` with the presence read as the 3x3-max map averaged over the box; in training they stay
        the decoder's (its no_object keeps saying which queries are actors) and ``pred_cells``, ``pred_acting``,
        ``pred_presence`` (the map where the locator attends) go to the criterion. Why the box at test time: the map
        is trained on every cell of an acting box, and a wave's centre hardly moves (docs/EXPERIMENTS.md, "Tube
        mode", seventh session)."""
        out = self.head(hidden)
        if not self.tube_steps:
            return out
        out = {k: v.unflatten(1, (-1, self.tube_steps)) for k, v in out.items()}
        if frames is not None:
            boxes = out["pred_boxes"]
            centres, cells = self.locate(hidden.unflatten(1, (-1, self.tube_steps)), frames)
            # in training the attention is detached: a step is idle because the map says so, not because the
            # locator looks away; and its size is what the frame shows there
            attention = (cells.detach() if self.training else cells).softmax(-1)
            size = torch.einsum("bqkg,bkgc->bqkc", attention, size_map)
            size = (torch.logit(boxes[..., 2:].clamp(SIZE_EPS, 1 - SIZE_EPS)) + size).sigmoid()
            out["pred_boxes"] = torch.cat([(centres + boxes[..., :2] - 0.5).clamp(0.0, 1.0), size], -1)
            out["pred_logits"] = out["pred_logits"] + self.actor_class(self.box_features(trunk, out["pred_boxes"]))
            acting = _neighbourhood_max(acting_map.sigmoid())
            if self.training:   # the criterion trains the decoder's classes and the map apart (loss_acting)
                presence = torch.einsum("bqkg,bkg->bqk", attention, acting)
                out.update(pred_cells=cells, pred_acting=acting_map, pred_presence=presence)
            else:   # read over the whole box: a wave's edges move, its centre hardly
                weights = box_cell_weights(out["pred_boxes"].to(acting.dtype), math.isqrt(acting.shape[-1]))
                out["pred_logits"] = step_log_probs(out["pred_logits"], torch.einsum("bqkg,bkg->bqk", weights, acting))
        return out

    def box_features(self, trunk: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The trunk's tokens ``(B, t*h*w, D)`` (mean over its t steps) averaged under each box ``(B, Q, K, 4)``
        (cxcywh, detached: this trains the classes, not the boxes) -> ``(B, Q, K, D)``. Why: the trunk under the
        actor's box tells actions apart that the decoder, reading the trunk through attention, confuses
        (docs/EXPERIMENTS.md, "Tube mode", fourth session)."""
        grid = self.trunk_grid(trunk)                                                   # (B, h*w, D)
        weights = box_cell_weights(boxes.detach().to(grid.dtype), math.isqrt(grid.shape[1]))   # (B, Q, K, h*w)
        return torch.einsum("bqkg,bgd->bqkd", weights, grid)

    def trunk_grid(self, trunk: torch.Tensor) -> torch.Tensor:
        """The trunk's tokens ``(B, t*h*w, D)`` averaged over its t steps -> ``(B, h*w, D)``, row-major cells."""
        return trunk.unflatten(1, (self.trunk_steps, trunk.shape[1] // self.trunk_steps)).mean(1)

    def use_channels_last(self) -> "STAR":
        """channels_last_3d weights, and the input converted to match inside ``forward``."""
        self.to(memory_format=torch.channels_last_3d)
        self.channels_last = True
        return self


def token_grid(model: STAR, num_frames: int, img_size: int) -> tuple[int, int, int]:
    """``(t, h, w)`` of the trunk's token grid for clips of ``num_frames`` frames of ``img_size`` px
    (R(2+1)D-18: time / 8, space / 16, rounded up), read from one forward pass of the trunk."""
    trunk = model.backbone.stem
    was_training = trunk.training
    trunk.eval()   # no BatchNorm statistics from this dummy clip
    try:
        with torch.no_grad():
            weight = next(trunk.parameters())
            features = trunk(torch.zeros(1, 3, num_frames, img_size, img_size, dtype=weight.dtype, device=weight.device))
    finally:
        trunk.train(was_training)
    return tuple(features.shape[2:])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_checkpoint(path, device="cpu", class_names=None) -> tuple[STAR, dict]:
    """Load a STAR checkpoint (this project's, or the published raw ``state_dict``) for inference: ``(model, info)``
    as :func:`checkpoint.load_checkpoint` returns them, for users who call ``model.load_checkpoint``."""
    from checkpoint import load_checkpoint as load   # here, not at the top: checkpoint.py imports this module
    return load(path, device, class_names)
