"""Constant-memory unroll, batched students and the memory planner: same gradients as the full unroll."""

import pytest
import torch

from contra_ray.augment import DSA
from contra_ray.config import ConfigError, load_config
from contra_ray.distill.matching import (
    accumulate_matching_gradients,
    constant_memory_gradients,
    make_plan,
    matching_loss,
    step_gradient,
    unroll,
)
from contra_ray.distill.memory import MemoryPlan, measure_step_memory, plan_unroll_memory
from contra_ray.models import MODEL_NAMES, ModelSpec, build_model, flat_params, functional_forward, is_distillable

SPEC = ModelSpec("convnet", num_classes=4, image_size=8, channels=3, width=8, depth=2)
N_SYN, N_STEPS, M = 8, 5, 2


def problem(spec=SPEC, n=N_SYN, seed=0):
    """float64 ConvNet, a fake expert trajectory, synthetic images, soft label logits, learnable syn_lr."""
    torch.manual_seed(seed)
    model = build_model(spec).to(torch.float64)
    theta0 = flat_params(model)
    traj = [theta0 + 0.02 * k * torch.randn_like(theta0) for k in range(8)]
    images = torch.randn(n, spec.channels, spec.image_size, spec.image_size, dtype=torch.float64)
    logits = torch.randn(n, spec.num_classes, dtype=torch.float64)
    fwd = lambda t, x: functional_forward(model, t, x)  # noqa: E731
    dsa = DSA()
    return model, fwd, traj, images, logits, (lambda x, seed: dsa(x, seed=seed))


def plan_b02_k3(iteration=0):
    return make_plan(seed=1, iteration=iteration, expert_ids=[0], n_syn=N_SYN, batch_syn=5, syn_steps=N_STEPS,
                     beta=0.2, K=3, R=1, min_start=0, max_start=4)


def gradients(unroll_memory, student_execution, iteration=0, students=None):
    _, fwd, traj, images, logits, aug = problem()
    imgs, labs = images.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    losses = accumulate_matching_gradients(plan_b02_k3(iteration), lambda s, m: (traj[s], traj[s + m]), fwd, imgs,
                                           labs, lr, M, aug, students, unroll_memory=unroll_memory,
                                           student_execution=student_execution)
    return losses, (imgs.grad, labs.grad, lr.grad)


def assert_close(got, want, rel=1e-10):
    for g, w, name in zip(got, want, ("images", "label_logits", "syn_lr")):
        err = (g - w).abs().max() / w.abs().max()
        assert err <= rel, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("mode,execution", [("constant", "sequential"), ("full", "batched"), ("constant", "batched")])
def test_gradients_equal_full_sequential_unroll(mode, execution):
    """β = 0.2, K = 3, N = 5, DSA, soft labels, learnable syn_lr: every mode gives the full-unroll gradient."""
    for iteration in (0, 1):
        ref_losses, ref = gradients("full", "sequential", iteration)
        losses, got = gradients(mode, execution, iteration)
        assert sorted(losses) == sorted(ref_losses) == [0, 1, 2, 3]
        for k in ref_losses:
            assert abs(losses[k] - ref_losses[k]) <= 1e-12 * abs(ref_losses[k])
        assert_close(got, ref)


def test_batched_worker_share_equals_sequential_share():
    ref_losses, ref = gradients("full", "sequential", students=[1, 3])
    for mode in ("full", "constant"):
        losses, got = gradients(mode, "batched", students=[1, 3])
        assert sorted(losses) == [1, 3]
        assert_close(got, ref)


def test_plan_uses_several_augmentation_families():
    """The equality tests above replay DSA through more than one family (so the replay is exercised)."""
    dsa = DSA()
    fams = {dsa.sample(5, torch.Generator().manual_seed(s)).family
            for it in (0, 1) for s in plan_b02_k3(it).aug_seeds}
    assert len(fams) >= 3


def test_vmapped_convnet_instance_norm_matches_per_student_forward():
    """ConvNet's instance norm (GroupNorm(width, width)) normalizes per sample and channel: vmap over
    stacked parameters gives each student its own statistics, equal to running it alone."""
    model, fwd, traj, images, logits, _ = problem()
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    thetas = torch.stack(traj[:3]).requires_grad_(True)
    targets = torch.softmax(logits, 1)
    g = step_gradient(fwd, thetas, images, targets, create_graph=False)
    for s in range(3):
        t = traj[s].clone().requires_grad_(True)
        assert torch.allclose(g[s], step_gradient(fwd, t, images, targets, create_graph=False), rtol=1e-12, atol=1e-15)


class _ConstantMemoryLoss(torch.autograd.Function):
    """L(images, label_logits, syn_lr) whose backward is the constant-memory walk (for gradcheck)."""

    @staticmethod
    def forward(ctx, images, logits, lr, fwd, start, target, batches, aug, seeds):
        ctx.save_for_backward(images, logits, lr)
        ctx.args = fwd, start, target, batches, aug, seeds
        with torch.enable_grad():  # the inner gradients of Eq. 1 need autograd (Function.forward disables it)
            th = unroll(fwd, start, images, torch.softmax(logits, 1), lr, batches, aug, seeds, differentiable=False)
        return matching_loss(th, start, target)

    @staticmethod
    def backward(ctx, grad_out):
        images, logits, lr = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        fwd, start, target, batches, aug, seeds = ctx.args
        with torch.enable_grad():
            constant_memory_gradients(fwd, start, target, 1.0, images, logits, lr, batches, aug, seeds)
        return images.grad * grad_out, logits.grad * grad_out, lr.grad * grad_out, *[None] * 6


def test_constant_memory_gradient_matches_finite_differences():
    spec = ModelSpec("convnet", num_classes=3, image_size=4, channels=2, width=4, depth=2)
    _, fwd, traj, images, logits, aug = problem(spec, n=4)
    plan = make_plan(seed=2, iteration=0, expert_ids=[0], n_syn=4, batch_syn=3, syn_steps=3, beta=1.0, K=0, R=1,
                     min_start=0, max_start=2)
    inputs = (images.requires_grad_(True), logits.requires_grad_(True),
              torch.tensor(0.05, dtype=torch.float64, requires_grad=True))
    f = lambda i, lg, r: _ConstantMemoryLoss.apply(i, lg, r, fwd, traj[1], traj[3], plan.batches, aug,
                                                   plan.aug_seeds)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_tesla_detached_gradients_drop_cross_step_terms():
    """TESLA's shortcut (θ̂_n built from detached gradients, every step weighted by the final adjoint a_N)
    is not the exact gradient: it misses the α H_m (m > n) terms the walk carries (docs/constant_memory.md)."""
    _, fwd, traj, images, logits, aug = problem()
    plan = plan_b02_k3()
    start, target, lr = traj[0], traj[2], torch.tensor(0.05, dtype=torch.float64)
    targets = torch.softmax(logits, 1)
    exact = images.clone().requires_grad_(True)
    loss = matching_loss(unroll(fwd, start, exact, targets, lr, plan.batches, aug, plan.aug_seeds), start, target)
    loss.backward()
    theta_n = unroll(fwd, start, images, targets, lr, plan.batches, aug, plan.aug_seeds, differentiable=False)
    a_n = 2 * (theta_n - target) / (start - target).pow(2).sum()
    tesla, theta = torch.zeros_like(images), start.clone()
    for n, idx in enumerate(plan.batches):
        x = images[idx].clone().requires_grad_(True)
        th = theta.clone().requires_grad_(True)
        g = step_gradient(fwd, th, aug(x, plan.aug_seeds[n]), targets[idx], create_graph=True)
        tesla[idx] += torch.autograd.grad((-lr * a_n * g).sum(), x)[0]
        theta = theta - lr * g.detach()
    err = (tesla - exact.grad).abs().max() / exact.grad.abs().max()
    assert err > 1e-2, err  # the dropped cross-step terms are not a rounding effect


def test_unknown_modes_are_named():
    with pytest.raises(ValueError, match="unroll_memory='auto'"):
        gradients("auto", "sequential")
    with pytest.raises(ValueError, match="student_execution='wide'"):
        gradients("full", "wide")


# ------------------------------------------------------------------------------------------------ planner

def planner_inputs(spec=SPEC, n=N_SYN):
    _, fwd, traj, images, logits, aug = problem(spec, n)
    return dict(forward=fwd, theta=traj[0], images=images, label_logits=logits, augment=aug, batch_syn=5)


def test_planner_refuses_when_neither_mode_fits_and_gives_both_numbers():
    with pytest.raises(ConfigError) as e:
        plan_unroll_memory(**planner_inputs(), syn_steps=N_STEPS, available_bytes=1000)
    msg = str(e.value)
    assert "distill.unroll_memory='auto'" in msg
    assert "GiB per worker" in msg and "0.00 GiB is available" in msg


def test_planner_auto_picks_constant_where_only_constant_fits():
    est = plan_unroll_memory(**planner_inputs(), syn_steps=40, available_bytes=10**12).estimate_bytes
    assert est["constant"] < est["full"]
    between = (est["constant"] + est["full"]) // 2
    plan = plan_unroll_memory(**planner_inputs(), syn_steps=40, available_bytes=between, headroom=1.0)
    assert isinstance(plan, MemoryPlan) and plan.mode == "constant" and plan.available_bytes == between
    assert "unroll_memory=constant" in plan.describe() and "GiB" in plan.describe()
    assert plan_unroll_memory(**planner_inputs(), syn_steps=40, available_bytes=10**12).mode == "full"
    with pytest.raises(ConfigError, match="the full unroll needs"):
        plan_unroll_memory(**planner_inputs(), syn_steps=40, available_bytes=between, headroom=1.0, requested="full")


def test_planner_estimate_grows_with_N_in_full_mode_and_stays_flat_in_constant_mode():
    est = {n: plan_unroll_memory(**planner_inputs(), syn_steps=n, available_bytes=10**12).estimate_bytes
           for n in (5, 10, 40)}
    step = measure_step_memory(planner_inputs()["forward"], planner_inputs()["theta"],
                               planner_inputs()["images"][:5], planner_inputs()["label_logits"][:5])
    assert step.graph_bytes > 0
    assert est[40]["full"] - est[5]["full"] >= 35 * step.graph_bytes * 0.9  # ~ N x one step's graph
    P, b = planner_inputs()["theta"].numel(), 8
    assert est[40]["constant"] - est[5]["constant"] == 35 * P * b  # only the stored θ̂_n grow
    assert est[40]["constant"] - est[5]["constant"] < 0.1 * (est[40]["full"] - est[5]["full"])


def test_planner_batched_students_measure_a_wider_step():
    one = plan_unroll_memory(**planner_inputs(), syn_steps=5, available_bytes=10**12)
    four = plan_unroll_memory(**planner_inputs(), syn_steps=5, available_bytes=10**12, students=4)
    assert four.step.graph_bytes > 2 * one.step.graph_bytes


# ------------------------------------------------------------------------------------------------ config

def test_config_fields_and_validation():
    d = load_config("tiny_cpu").distill
    assert (d.unroll_memory, d.student_execution) == ("auto", "sequential")
    assert load_config("tiny_cpu", ["distill.unroll_memory=constant", "distill.student_execution=batched"])
    with pytest.raises(ConfigError, match="distill.unroll_memory='tiny'"):
        load_config("tiny_cpu", ["distill.unroll_memory=tiny"])
    with pytest.raises(ConfigError, match="distill.student_execution='parallel'"):
        load_config("tiny_cpu", ["distill.student_execution=parallel"])
    # batch-norm networks (running statistics: no vmapped students) are refused as distillation networks
    with pytest.raises(ConfigError, match="model.name='resnet18_bn'"):
        load_config("tiny_cpu", ["distill.student_execution=batched", "model.name=resnet18_bn"])


def test_distillable_models_are_exactly_those_without_running_statistics():
    for name in MODEL_NAMES:
        spec = ModelSpec(name, num_classes=3, image_size=32, width=4)
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in build_model(spec).modules())
        assert has_bn == (not is_distillable(spec)), name


def test_table5_preset_that_cannot_fit_is_refused_with_both_numbers_and_auto_picks_constant():
    """cifar10_ipc10 (Table 5: N = 80, ConvNet-3 width 128, 100 images) with an injected budget."""
    from contra_ray.distill.memory import plan_for_config

    cfg = load_config("cifar10_ipc10", ["distill.syn_steps=80"])
    spec = cfg.model_spec(10, 32, 3)
    free = plan_for_config(cfg, spec, device="cpu", available_bytes=1 << 50)  # unlimited: auto keeps the full unroll
    full, constant = free.estimate_bytes["full"], free.estimate_bytes["constant"]
    assert free.mode == "full" and full > 10 * constant
    between = int((full + constant) / 2)
    assert plan_for_config(cfg, spec, device="cpu", available_bytes=between).mode == "constant"
    with pytest.raises(ConfigError, match=r"distill.unroll_memory='auto'.* GiB .* GiB is available"):
        plan_for_config(cfg, spec, device="cpu", available_bytes=constant // 4)
    cfg_full = load_config("cifar10_ipc10", ["distill.syn_steps=80", "distill.unroll_memory=full"])
    with pytest.raises(ConfigError, match=r"distill.unroll_memory='full'"):
        plan_for_config(cfg_full, spec, device="cpu", available_bytes=between)
