"""Distiller: DATM-style initialization, divergence guards, exact continuation from a state dict."""

import pytest
import torch

from contra_ray.config import load_config
from contra_ray.distill.distiller import DistillationDiverged, Distiller
from contra_ray.models import ModelSpec, build_model, flat_params, functional_forward

SPEC = ModelSpec("convnet", num_classes=3, image_size=8, channels=3, width=4, depth=2)


class FakeStore:
    """An in-memory expert store: trajectory e = θ0 + 0.01·e·noise."""

    def __init__(self, epochs=6, experts=(0, 1)):
        torch.manual_seed(0)
        theta = flat_params(build_model(SPEC))
        noise = torch.randn_like(theta)
        self.traj = {i: [theta + 0.01 * (e + i) * noise for e in range(epochs + 1)] for i in experts}
        self.expert_ids = list(experts)

    def params(self, expert_id, epoch):
        return self.traj[expert_id][epoch]


def make(overrides=(), n_per_class=6):
    cfg = load_config("tiny_cpu", ["model.width=4", "model.depth=2", "distill.ipc=2", "distill.batch_syn=3",
                                   "distill.syn_steps=2", "distill.K=2", "distill.R=1", "distill.beta=0.5",
                                   "distill.max_start_epoch=2", "distill.expert_epochs=1", "experts.epochs=6",
                                   *overrides])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3 * n_per_class, 3, 8, 8, generator=g)
    y = torch.arange(3).repeat_interleave(n_per_class)
    return Distiller(cfg, FakeStore(), SPEC, x, y), x, y


def test_init_from_correctly_classified_real_images_with_expert_logits():
    dist, x, y = make()
    store = dist.store
    model = build_model(SPEC)
    logits = functional_forward(model, store.params(0, dist.d.max_start_epoch), x).detach()
    correct = logits.argmax(1) == y
    assert dist.hard_labels.tolist() == [0, 0, 1, 1, 2, 2]
    fell_back = {}
    for img, lab, c in zip(dist.images.detach(), dist.label_logits.detach(), dist.hard_labels):
        match = [i for i in range(len(x)) if torch.equal(x[i], img)]
        assert len(match) == 1 and y[match[0]] == c
        i = match[0]
        n_correct = int(correct[y == c].sum())
        if n_correct >= 2:  # enough correct images: only those are used
            assert correct[i]
        if correct[i]:
            assert torch.allclose(lab, logits[i], atol=1e-6)  # soft labels = the expert's logits
        else:  # a fall-back image: its true-class logit and the largest one are swapped
            fell_back[int(c)] = fell_back.get(int(c), 0) + 1
            expect = logits[i].clone()
            top = int(expect.argmax())
            expect[top], expect[int(c)] = logits[i][int(c)], logits[i][top]
            assert torch.allclose(lab, expect, atol=1e-6)
        assert int(lab.argmax()) == int(c)  # never a soft label pointing at another class
    assert fell_back, "this fixture has classes with fewer than IPC correctly classified images"
    assert dist.init_report.misclassified_per_class == fell_back
    assert dist.init_report.relabeled == sum(fell_back.values())
    line = dist.init_report.line(["a", "b", "c"], 2)
    assert "fewer than IPC=2 correct" in line and "relabeled" in line


def test_fallback_fills_up_with_misclassified_only_after_every_correct_one():
    """A class with 1 correct image at IPC 2 takes that one plus one misclassified one (the issue: the old
    code then drew from ALL images of the class and could skip the correct one)."""
    dist, x, y = make(n_per_class=6)
    model = build_model(SPEC)
    logits = functional_forward(model, dist.store.params(0, dist.d.max_start_epoch), x).detach()
    correct = logits.argmax(1) == y
    for c in range(3):
        chosen = [i for img in dist.images.detach()[dist.hard_labels == c]
                  for i in range(len(x)) if torch.equal(x[i], img)]
        n_correct = int(correct[y == c].sum())
        assert int(correct[chosen].sum()) == min(2, n_correct)


def test_step_is_exactly_reproducible_from_a_state_dict():
    a, _, _ = make()
    for _ in range(2):
        a.step()
    b, _, _ = make()
    b.load_state_dict(a.state_dict())
    ma, mb = a.step(), b.step()
    assert ma == mb
    assert torch.equal(a.images, b.images) and torch.equal(a.label_logits, b.label_logits)
    assert torch.equal(a.syn_lr, b.syn_lr) and a.iteration == b.iteration == 3


def test_syn_lr_guard_stops_with_iteration_and_value():
    dist, _, _ = make()
    dist.compute_gradients(dist.plan(0))
    dist.syn_lr.grad = torch.tensor(1e9)  # one SGD step drives syn_lr far below 0
    with pytest.raises(DistillationDiverged, match=r"iteration 0: syn_lr became -\d"):
        dist.apply_update(0)


def test_non_finite_loss_and_images_are_refused():
    dist, _, _ = make()
    with pytest.raises(DistillationDiverged, match="iteration 7: matching loss of student 1 is nan"):
        dist.apply_update(7, {1: float("nan")})
    dist.compute_gradients(dist.plan(0))
    dist.images.grad[0, 0, 0, 0] = float("inf")
    with pytest.raises(DistillationDiverged, match="gradient w.r.t. images is non-finite"):
        dist.apply_update(0)


def test_hard_labels_are_fixed_one_hot_targets():
    dist, _, _ = make(["distill.soft_labels=false"])
    assert not dist.label_logits.requires_grad
    assert torch.allclose(dist.targets(), torch.nn.functional.one_hot(dist.hard_labels, 3).float())
    before = dist.label_logits.clone()
    dist.step()
    assert torch.equal(dist.label_logits, before)
