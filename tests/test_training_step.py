"""The simulated-annotator iteration: which parameters each optimizer step may change, reproducibility, the loss."""

from __future__ import annotations

import torch

from benchmarks.published_training_loop import published_loss
from lib.build import build_model
from lib.losses import FocalDiceIoULoss
from lib.training import SimulatedAnnotator, make_optimizer, parameter_groups, recipe


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
