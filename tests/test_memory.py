"""Constant-memory unroll, batched students and the memory planner: same gradients as the full unroll."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
from contra_ray.distill.memory import (
    CPU_OVERHEAD,
    PROBE_BATCH,
    MemoryPlan,
    measure_step_memory,
    plan_unroll_memory,
    probe_step_memory,
)
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


def test_probe_on_two_small_slices_equals_the_step_measured_at_the_run_batch():
    """G and W extrapolated linearly from 8 and 16 rows equal the direct measurement at 40 rows (one and
    three students at once); a batch of at most 2·b0 rows is measured directly."""
    inp = planner_inputs(n=40)
    args = (inp["forward"], inp["theta"], inp["images"], inp["label_logits"])
    for students in (1, 3):
        probe = probe_step_memory(*args, batch_syn=40, augment=inp["augment"], students=students)
        direct = measure_step_memory(*args[:2], inp["images"][:40], inp["label_logits"][:40], inp["augment"], students)
        assert probe.measured_batches == (PROBE_BATCH, 2 * PROBE_BATCH) and direct.measured_batches == (40,)
        for got, want in ((probe.graph_bytes, direct.graph_bytes), (probe.walk_bytes, direct.walk_bytes)):
            assert abs(got - want) <= 1e-3 * want, (students, got, want)
    small = probe_step_memory(*args, batch_syn=2 * PROBE_BATCH, augment=inp["augment"])
    assert small.measured_batches == (2 * PROBE_BATCH,)
    assert small == measure_step_memory(*args[:2], inp["images"][:16], inp["label_logits"][:16], inp["augment"])
    with pytest.raises(ValueError, match="the probe needs 16 rows"):
        probe_step_memory(*args[:2], inp["images"][:10], inp["label_logits"][:10], batch_syn=40)


_REAL_STEP = r"""
import ctypes, json, torch
from contra_ray.augment import DSA
from contra_ray.distill.matching import step_gradient
from contra_ray.distill.memory import measure_step_memory, probe_step_memory
from contra_ray.models import ModelSpec, build_model, flat_params, functional_forward

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def live():  # bytes malloc has handed out and not yet got back (heap + mmapped chunks)
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))
def reset_peak():  # Linux clear_refs 5: VmHWM := VmRSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")

torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model(ModelSpec("convnet", num_classes=10, image_size=32, channels=3, width=32, depth=3))
fwd = lambda t, x: functional_forward(model, t, x)
theta, b = flat_params(model).detach(), 128
images, labels = torch.randn(b, 3, 32, 32), torch.randn(b, 10)
dsa = DSA()
aug = lambda x, seed: dsa(x, seed=seed)
measure_step_memory(fwd, theta, images[:2], labels[:2], aug)  # lazy initialization is not the probe's
base = reset_peak()
probe = probe_step_memory(fwd, theta, images, labels, b, aug)
out = {"graph": probe.graph_bytes, "walk": probe.walk_bytes, "probe_peak": status("VmHWM") - base}
# one real step at the full batch (after the probe, so a reuse of its freed pages can only shrink this peak)
base, live0 = reset_peak(), live()
th, x = theta.clone().requires_grad_(True), images.clone().requires_grad_(True)
lab, lr = labels.clone().requires_grad_(True), torch.tensor(0.01, requires_grad=True)
theta1 = th - lr * step_gradient(fwd, th, aug(x, 0), torch.softmax(lab, 1), create_graph=True)
out["real_live"] = live() - live0  # what the step's graph holds (theta1 keeps it alive, as in the full unroll)
torch.autograd.grad((theta1 * torch.randn_like(theta1)).sum(), (th, x, lab, lr))  # the walk's VJP
out["real_peak"] = status("VmHWM") - base
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs to "
                    "reset the peak resident set size")
def test_probe_estimate_matches_a_real_step_and_the_probe_itself_stays_small():
    """ConvNet-3 width 32, 32 px, DSA, batch 128, float32, in a fresh process: the G the probe extrapolates
    from 8 and 16 rows is within 15% of the bytes one real 128-row step's graph holds (glibc mallinfo2; G
    includes the CPU_OVERHEAD allocator slack, so it is the larger), and the probe's own peak RSS growth is
    under a quarter of that real step's (graph + VJP)."""
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc is None or not hasattr(ctypes.CDLL(libc), "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to count the live heap bytes of a real step")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", _REAL_STEP], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["real_live"] > 50 * 2**20  # the shape is big enough for the comparison to mean something
    assert m["real_live"] <= m["graph"] <= 1.15 * m["real_live"], m
    assert m["graph"] / CPU_OVERHEAD <= 1.05 * m["real_live"], m  # the saved tensors are what the step holds
    assert m["probe_peak"] < m["real_peak"] / 4, m
    assert m["walk"] == pytest.approx(2 * m["graph"], rel=1e-6)


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
    assert free.step.measured_batches == (PROBE_BATCH, 2 * PROBE_BATCH)  # the probe ran 16 of the 100 rows
    # the probe's estimates equal those of one step measured on all 100 rows, and so do the choices
    direct = plan_for_config(cfg, spec, device="cpu", available_bytes=1 << 50, probe_batch=50)
    assert direct.step.measured_batches == (100,)
    for mode in ("full", "constant"):
        assert abs(free.estimate_bytes[mode] - direct.estimate_bytes[mode]) <= 1e-3 * direct.estimate_bytes[mode]
    between = int((full + constant) / 2)
    for budget in (between, int(full / 0.9) + 2**20, int(full / 0.9) - 2**20, int(constant / 0.9) + 2**20):
        want = "full" if direct.estimate_bytes["full"] <= 0.9 * budget else "constant"
        assert plan_for_config(cfg, spec, device="cpu", available_bytes=budget).mode == want, budget
    assert plan_for_config(cfg, spec, device="cpu", available_bytes=between).mode == "constant"
    with pytest.raises(ConfigError, match=r"distill.unroll_memory='auto'.* GiB .* GiB is available"):
        plan_for_config(cfg, spec, device="cpu", available_bytes=constant // 4)
    cfg_full = load_config("cifar10_ipc10", ["distill.syn_steps=80", "distill.unroll_memory=full"])
    with pytest.raises(ConfigError, match=r"distill.unroll_memory='full'"):
        plan_for_config(cfg_full, spec, device="cpu", available_bytes=between)
