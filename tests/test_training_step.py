"""The simulated-annotator iteration: which parameters each optimizer step may change, reproducibility, the loss."""

from __future__ import annotations

import torch

from benchmarks.published_training_loop import published_loss
from lib.modeling.build import build_model
from lib.training.iteration import SimulatedAnnotator
from lib.training.losses import FocalDiceIoULoss
from lib.training.recipe import make_optimizer, parameter_groups, recipe


def _batch(b: int = 2, k: int = 3, s: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, s, s, generator=gen)
    labels = torch.zeros(b, k, s, s)
    boxes = torch.zeros(b, k, 4)
    for i in range(b):
        for j in range(k):
            y0, x0 = 20 + 30 * j, 40 + 10 * i
            labels[i, j, y0 : y0 + 60, x0 : x0 + 80] = 1
            boxes[i, j] = torch.tensor([x0, y0, x0 + 80, y0 + 60])
    return images, labels, boxes


class RecordingAnnotator(SimulatedAnnotator):
    """Records, for every optimizer step, which parameter groups changed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.changes: list[dict[str, int]] = []

    def _optimise(self, loss, optimizer, params) -> None:
        model_groups = self._groups
        before = {g: [p.detach().clone() for p in ps] for g, ps in model_groups.items()}
        super()._optimise(loss, optimizer, params)
        self.changes.append(
            {
                g: sum(int(not torch.equal(a, p.detach())) for a, p in zip(before[g], ps))
                for g, ps in model_groups.items()
            }
        )


def _model(golden_config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(golden_config)


def test_each_step_changes_exactly_the_groups_the_recipe_trains(golden_config: dict) -> None:
    model = _model(golden_config)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("image_encoder.")}
    config = recipe("continual", {"decoder_iterations": 3, "seed": 1})
    optimizer = make_optimizer(model, config)
    annotator = RecordingAnnotator(config)
    annotator._groups = parameter_groups(model)
    annotator(model, optimizer, *_batch())
    first, *decoder_steps = annotator.changes
    assert len(decoder_steps) == 3
    # Step 1 (first prompt): adapters, prompt encoder and decoder learn; the rest of the encoder does not move.
    assert first["adapters"] > 0 and first["prompt_encoder"] > 0 and first["mask_decoder"] > 0
    assert first["frozen_encoder"] == 0
    # Decoder-only steps: nothing but the mask decoder.
    for step in decoder_steps:
        assert step["mask_decoder"] > 0
        assert step["adapters"] == step["prompt_encoder"] == step["frozen_encoder"] == 0
    for key, value in model.state_dict().items():
        if key.startswith("image_encoder.") and ".Adapter." not in key:
            assert torch.equal(value, frozen_before[key]), f"frozen weight {key} changed"


def test_adam_never_sees_the_frozen_encoder(golden_config: dict) -> None:
    model = _model(golden_config)
    optimizer = make_optimizer(model, recipe("continual"))
    handed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    groups = parameter_groups(model)
    assert not handed & {id(p) for p in groups["frozen_encoder"]}
    assert handed == {id(p) for g in ("adapters", "prompt_encoder", "mask_decoder") for p in groups[g]}


def test_two_runs_with_one_seed_agree_and_the_loss_falls(golden_config: dict) -> None:
    results = []
    for _ in range(2):
        model = _model(golden_config)
        config = recipe("continual", {"decoder_iterations": 3, "seed": 3})
        annotator = SimulatedAnnotator(config)
        optimizer = make_optimizer(model, config)
        outs = [annotator(model, optimizer, *_batch(k=2)) for _ in range(2)]
        results.append((outs, {k: v.clone() for k, v in model.state_dict().items()}))
    (outs_a, state_a), (outs_b, state_b) = results
    assert outs_a == outs_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert outs_a[-1]["loss"] < outs_a[0]["loss"]


def test_loss_matches_the_published_formula_and_its_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 1, 32, 32, generator=gen) * 3).double().requires_grad_()
    targets = (torch.rand(6, 1, 32, 32, generator=gen) > 0.6).double()
    iou = torch.rand(6, 1, generator=gen).double().requires_grad_()
    ours = FocalDiceIoULoss()(logits, targets, iou)
    ref = published_loss(logits, targets, iou)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)
    g_ours = torch.autograd.grad(ours, (logits, iou))
    g_ref = torch.autograd.grad(published_loss(logits, targets, iou), (logits, iou))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-8)
    # Per-mask reduction: the mean of single-mask losses.
    per_mask = FocalDiceIoULoss(reduction="mask")(logits, targets, iou)
    singles = torch.stack([FocalDiceIoULoss()(logits[i : i + 1], targets[i : i + 1], iou[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(per_mask, singles.mean(), rtol=1e-5, atol=1e-6)
    g_mask = torch.autograd.grad(per_mask, (logits, iou))
    g_singles = torch.autograd.grad(singles.mean(), (logits, iou))
    for a, b in zip(g_mask, g_singles):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def _gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref)
    scale = max(float(g.abs().max()) for g in ref.values())
    # Some gradients (attention key biases) are zero in exact arithmetic: compare on the overall scale. The published
    # loss takes log(p + 1e-12) where ours takes logsigmoid: they differ by about 1e-12 / p on confident pixels.
    for name in ref:
        torch.testing.assert_close(
            ours[name], ref[name], rtol=1e-4, atol=1e-7 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_training_gradients_equal_the_published_loops(golden_config: dict) -> None:
    """The arithmetic a training step differentiates: our encoder's adapter gradients and our decoder + loss
    gradients equal those of the published forward math, for every prompt kind of the iteration. In float64, so that
    the comparison is of the mathematics and not of float32 rounding."""
    from benchmarks import published_reference
    from benchmarks.published_training_loop import _decode

    model = _model(golden_config).double()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 256, 256, generator=gen, dtype=torch.float64)
    for name, param in model.image_encoder.named_parameters():
        param.requires_grad_(".Adapter." in name)
    weight = torch.randn(model.encode(images).shape, generator=gen, dtype=torch.float64)
    ours = _gradients(model, (model.encode(images) * weight).sum())
    ref = _gradients(model, (published_reference.encode(model.image_encoder, images) * weight).sum())
    assert ours and all(".Adapter." in n for n in ours)
    _assert_same_gradients(ours, ref)

    for param in model.image_encoder.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        embeddings = model.encode(images).repeat_interleave(3, dim=0)
    targets = (torch.rand(6, 1, 256, 256, generator=gen) > 0.5).double()
    coords = torch.randint(0, 256, (6, 3, 2), generator=gen).double()
    labels = torch.randint(0, 2, (6, 3), generator=gen)
    boxes = torch.tensor([[30.0, 40.0, 200.0, 220.0]], dtype=torch.float64).repeat(6, 1)
    mask_inputs = torch.rand(6, 1, 64, 64, generator=gen, dtype=torch.float64)
    for prompts in (
        (None, None, boxes, None),
        (coords[:, :1], labels[:, :1], None, None),
        (coords, labels, None, mask_inputs),
        (None, None, None, mask_inputs),
    ):
        low_res, iou = model.decode(embeddings, *prompts, multimask_output=True)
        logits = torch.nn.functional.interpolate(low_res, (256, 256), mode="bilinear", align_corners=False)
        ours = _gradients(model, FocalDiceIoULoss()(logits, targets, iou))
        masks, _, ref_iou = _decode(model, embeddings, *prompts, grad_prompt=True)
        ref = _gradients(model, published_loss(masks, targets, ref_iou))
        _assert_same_gradients(ours, ref)
