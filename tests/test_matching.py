"""The matching core: Eq. 1 unroll gradients, Eq. 2 loss, Eq. 8 plans and weights."""

import torch
import torch.nn.functional as F

from contra_ray.distill.matching import (
    accumulate_matching_gradients,
    make_plan,
    matching_loss,
    minibatch_sequence,
    soft_cross_entropy,
    unroll,
)
from contra_ray.models import ModelSpec, build_model, flat_params, functional_forward

SPEC = ModelSpec("convnet", num_classes=3, image_size=8, channels=3, width=4, depth=2)


def tiny_problem(dtype=torch.float64, n=6, seed=0):
    torch.manual_seed(seed)
    model = build_model(SPEC).to(dtype)
    theta0 = flat_params(model)
    target = theta0 + 0.05 * torch.randn_like(theta0)
    images = torch.randn(n, 3, 8, 8, dtype=dtype)
    logits = torch.randn(n, 3, dtype=dtype)
    return model, theta0, target, images, logits


def test_unroll_gradient_matches_finite_differences_float64():
    model, theta0, target, images, logits = tiny_problem()
    batches = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([1, 4, 2])]

    def loss_fn(imgs, lab, lr):
        th = unroll(lambda t, x: functional_forward(model, t, x), theta0, imgs, torch.softmax(lab, 1), lr, batches)
        return matching_loss(th, theta0, target)

    inputs = (images.clone().requires_grad_(True), logits.clone().requires_grad_(True),
              torch.tensor(0.05, dtype=torch.float64, requires_grad=True))
    # fast mode: per input, the analytic gradient projected on a random direction against the central difference
    # along it (2 evaluations per input instead of 2 per element: 1,171 elements here, ~37 s in slow mode)
    assert torch.autograd.gradcheck(loss_fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_plain_mtt_loss_equals_hand_computed():
    """β = 1, K = 0: the loss is MTT's ||θ̂_N − θ*_M||² / ||θ*_0 − θ*_M||² with θ̂ from N explicit SGD steps."""
    model, theta0, target, images, logits = tiny_problem()
    plan = make_plan(seed=3, iteration=7, expert_ids=[0], n_syn=6, batch_syn=4, syn_steps=3, beta=1.0, K=0, R=1,
                     min_start=0, max_start=2)
    assert len(plan.students) == 1 and plan.students[0].weight == 1.0
    lr = 0.07
    # by hand: an nn.Module, torch.optim.SGD, hard-coded loop over the plan's batches
    ref = build_model(SPEC).to(torch.float64)
    offset = 0
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(theta0[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    targets = torch.softmax(logits, 1)
    for idx in plan.batches:
        opt.zero_grad()
        loss = -(targets[idx] * F.log_softmax(ref(images[idx]), 1)).sum(1).mean()
        loss.backward()
        opt.step()
    theta_n = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    expected = ((theta_n - target) ** 2).sum() / ((theta0 - target) ** 2).sum()

    imgs = images.clone().requires_grad_(True)
    losses = accumulate_matching_gradients(
        plan, lambda s, m: (theta0, target), lambda t, x: functional_forward(model, t, x), imgs,
        logits.clone().requires_grad_(True), torch.tensor(lr, dtype=torch.float64, requires_grad=True), 1)
    assert abs(losses[0] - expected.item()) < 1e-12 * max(1.0, expected.item())


def test_concurrent_gradient_equals_gradient_of_summed_eq8_loss():
    model, theta0, _, images, logits = tiny_problem()
    torch.manual_seed(1)
    traj = [theta0 + 0.02 * k * torch.randn_like(theta0) for k in range(8)]  # a fake expert trajectory
    plan = make_plan(seed=0, iteration=0, expert_ids=[0], n_syn=6, batch_syn=3, syn_steps=2, beta=0.4, K=3, R=2,
                     min_start=0, max_start=4)
    fwd = lambda t, x: functional_forward(model, t, x)
    seg = lambda s, m: (traj[s], traj[s + m])
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    imgs = images.clone().requires_grad_(True)
    labs = logits.clone().requires_grad_(True)
    accumulate_matching_gradients(plan, seg, fwd, imgs, labs, lr, 2)
    # the whole Eq. 8 loss in one graph
    imgs2, labs2 = images.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    lr2 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    total = 0
    for st in plan.students:
        th = unroll(fwd, traj[st.start], imgs2, torch.softmax(labs2, 1), lr2, plan.batches)
        total = total + st.weight * matching_loss(th, traj[st.start], traj[st.start + 2])
    total.backward()
    for a, b in ((imgs.grad, imgs2.grad), (labs.grad, labs2.grad), (lr.grad, lr2.grad)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_worker_share_gradients_sum_to_the_whole():
    model, theta0, _, images, logits = tiny_problem()
    traj = [theta0 + 0.03 * k * torch.ones_like(theta0) for k in range(7)]
    plan = make_plan(seed=5, iteration=2, expert_ids=[0, 1], n_syn=6, batch_syn=6, syn_steps=2, beta=0.2, K=3,
                     R=1, min_start=0, max_start=3)
    fwd = lambda t, x: functional_forward(model, t, x)
    seg = lambda s, m: (traj[s], traj[s + m])

    def grads(students):
        imgs = images.clone().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        accumulate_matching_gradients(plan, seg, fwd, imgs, logits.clone().requires_grad_(True), lr, 2,
                                      students=students)
        return imgs.grad, lr.grad

    whole = grads(None)
    w0, w1 = grads([0, 2]), grads([1, 3])
    assert torch.allclose(w0[0] + w1[0], whole[0], rtol=1e-10)
    assert torch.allclose(w0[1] + w1[1], whole[1], rtol=1e-10)


def test_segment_starts_and_weights():
    starts = set()
    for it in range(300):
        plan = make_plan(seed=1, iteration=it, expert_ids=[4, 9], n_syn=10, batch_syn=10, syn_steps=1, beta=0.2, K=4,
                         R=4, min_start=2, max_start=20)
        assert plan.concurrent_starts == [2, 6, 10, 14]  # T- + iR
        assert 2 <= plan.sampled_start < 20  # [T-, T+)
        assert plan.expert_id in (4, 9)
        assert plan.students[0].weight == 0.2
        assert all(abs(s.weight - 0.8 / 4) < 1e-15 for s in plan.students[1:])
        starts.add(plan.sampled_start)
    assert starts == set(range(2, 20))  # every start in range is reachable, T+ never


def test_plan_is_a_pure_function_of_seed_and_iteration():
    """Every worker computes the same plan, hence the same mini-batch sequence, without messages."""
    kw = dict(expert_ids=[0, 1, 2], n_syn=50, batch_syn=10, syn_steps=12, beta=0.0, K=3, R=2, min_start=0,
              max_start=4)
    a, b = make_plan(7, 11, **kw), make_plan(7, 11, **kw)
    assert a.expert_id == b.expert_id and a.students == b.students and a.aug_seeds == b.aug_seeds
    assert all(torch.equal(x, y) for x, y in zip(a.batches, b.batches))
    c = make_plan(7, 12, **kw)
    assert not all(torch.equal(x, y) for x, y in zip(a.batches, c.batches))


def test_minibatch_sequence_covers_the_set_each_epoch():
    seq = minibatch_sequence(10, 4, 6, torch.Generator().manual_seed(0))
    assert [len(b) for b in seq] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(seq[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(seq[3:]).tolist()) == list(range(10))


def test_soft_cross_entropy_equals_hard_ce_for_one_hot():
    logits = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(y, 4).double()), F.cross_entropy(logits, y))


def test_skip_zero_weight_student():
    model, theta0, target, images, logits = tiny_problem()
    plan = make_plan(seed=0, iteration=0, expert_ids=[0], n_syn=6, batch_syn=6, syn_steps=1, beta=0.0, K=2, R=1,
                     min_start=0, max_start=2)
    losses = accumulate_matching_gradients(
        plan, lambda s, m: (theta0, target), lambda t, x: functional_forward(model, t, x),
        images.clone().requires_grad_(True), logits.clone().requires_grad_(True),
        torch.tensor(0.01, dtype=torch.float64, requires_grad=True), 1)
    assert sorted(losses) == [1, 2]  # the sampled student (β = 0) is not unrolled
