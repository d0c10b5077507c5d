"""Evaluation core, plain PyTorch: a fresh network trained on a (distilled) set, tested on real data.

Protocol (paper App. D, following MTT ``evaluate_synset`` / DATM): a randomly initialized network is
trained on the synthetic set with SGD (momentum 0.9, weight decay 5e-4, batch 256) at the learned step
size α for ``eval.epochs`` epochs, with DSA augmentation on every batch and the learning rate multiplied
by 0.1 at ``epochs // 2``; the loss is the soft-label cross-entropy on ``softmax(label_logits)`` (DATM).
The mean and (population) standard deviation of the top-1 test accuracy over ``eval.runs`` seeds is
reported, as MTT/DATM do with ``np.mean`` / ``np.std``. Also: the evaluation seeds and the random-real
baseline set.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from contra_ray.common.seeds import derive_seed
from contra_ray.config import EvalConfig
from contra_ray.data.preprocess import real_images_per_class
from contra_ray.models import ModelSpec, build_model

Augment = Callable[..., torch.Tensor]  # DSA()(x, generator=torch.Generator) -> augmented x


EpochHook = Callable[[int, float, float], None]  # (epoch, lr used in that epoch, mean train loss)


def lr_schedule(lr: float, epochs: int) -> list[float]:
    """Learning rate of each of ``epochs`` epochs: ``lr`` before ``epochs // 2``, ``lr * 0.1`` from it on.

    MTT ``evaluate_synset`` decays once, by 0.1, half way (it trains ``Epoch + 1`` epochs and decays
    after epoch ``Epoch // 2 + 1``; we train exactly ``epochs`` and decay at the start of epoch
    ``epochs // 2``). With ``epochs == 1`` there is no decay.
    """
    half = epochs // 2
    return [lr * 0.1 if 0 < half <= e else lr for e in range(epochs)]


def evaluation_seeds(seed: int, runs: int) -> list[int]:
    """The seeds of ``runs`` evaluation networks: ``derive_seed(seed, "eval", r)`` for r = 0..runs-1.

    Their own role (:mod:`contra_ray.common.seeds`), so an evaluation network never starts from the
    initialization of an expert (role ``expert``) the synthetic set was matched against.
    """
    return [derive_seed(seed, "eval", r) for r in range(runs)]


def train_and_test(images: torch.Tensor, targets: torch.Tensor, lr: float, spec: ModelSpec, ecfg: EvalConfig,
                   test_x: torch.Tensor, test_y: torch.Tensor, seed: int, augment: Augment | None = None,
                   device: str = "cpu", threads: int = 0, on_epoch: EpochHook | None = None) -> float:
    """Train a fresh ``build_model(spec)`` on ``(images, targets)``; return its top-1 test accuracy.

    Source: MTT ``utils.evaluate_synset`` / ``epoch`` (SGD momentum 0.9, wd 5e-4, DSA on every batch,
    one 0.1 decay half way, see :func:`lr_schedule`) with DATM's soft-label cross-entropy
    ``-(targets * log_softmax(logits)).sum(1).mean()``. Shuffling uses the global RNG after
    ``torch.manual_seed(seed)``; DSA uses a private generator on ``device`` seeded with ``seed``.
    The same as :func:`train_module_and_test` with ``net=lambda: build_model(spec)``.

    Args:
        images: float ``[n, C, H, W]`` training images in the preprocessed space.
        targets: float ``[n, num_classes]`` target distributions (soft labels or one-hot), rows sum to 1.
        lr: initial SGD learning rate (the learned α of a distilled set).
        spec: the network to build.
        ecfg: recipe: ``epochs``, ``batch_size``, ``momentum``, ``weight_decay``, ``dsa``, ``test_batch_size``.
        test_x: float ``[N, C, H, W]`` test images, preprocessed the same way as ``images``.
        test_y: int64 ``[N]`` test labels.
        seed: seeds ``torch.manual_seed`` (initialization, shuffling) and the augmentation generator.
        augment: DSA callable ``augment(x, generator=g)``, applied to every training batch if ``ecfg.dsa``.
        device: torch device to train on.
        threads: torch intra-op threads for this call (0 = leave as is); restored afterwards.
        on_epoch: optional hook called after each epoch with ``(epoch, lr, mean train loss)``.

    Returns:
        Top-1 accuracy on the test set, a float in [0, 1].

    Raises:
        ValueError: ``images`` and ``targets`` disagree in length, or the test set is empty.
    """
    return train_module_and_test(lambda: build_model(spec), images, targets, lr, ecfg, test_x, test_y, seed,
                                 augment=augment, device=device, threads=threads, on_epoch=on_epoch)


def train_module_and_test(net: nn.Module | Callable[[], nn.Module], images: torch.Tensor, targets: torch.Tensor,
                          lr: float, ecfg: EvalConfig, test_x: torch.Tensor, test_y: torch.Tensor, seed: int,
                          augment: Augment | None = None, device: str = "cpu", threads: int = 0,
                          on_epoch: EpochHook | None = None) -> float:
    """Train ``net`` on ``(images, targets)`` with the recipe of :func:`train_and_test`; return its top-1 test
    accuracy. ``net`` is a module (trained in place, moved to ``device``; left in eval mode) or a function of
    no argument that builds one, called right after ``torch.manual_seed(seed)`` so its initialization is
    reproducible (with ``lambda: build_model(spec)`` this is exactly :func:`train_and_test`).

    Args:
        net: the network, or its builder; its output must be ``[batch, num_classes]`` logits.
        images, targets, lr, ecfg, test_x, test_y, seed, augment, device, threads, on_epoch: as
            :func:`train_and_test`.

    Returns:
        Top-1 accuracy on the test set, a float in [0, 1].

    Raises:
        ValueError: ``images`` and ``targets`` disagree in length, or the test set is empty.
    """
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"images has {images.shape[0]} rows but targets has {targets.shape[0]}")
    if test_x.shape[0] == 0:
        raise ValueError("test set is empty")
    old_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        dev = torch.device(device)
        net = (net if isinstance(net, nn.Module) else net()).to(dev)
        x_all = images.detach().to(dev, torch.float32)
        t_all = targets.detach().to(dev, torch.float32)
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        n, bs = x_all.shape[0], max(1, ecfg.batch_size)
        schedule = lr_schedule(lr, ecfg.epochs)
        opt = None
        net.train()
        for ep, ep_lr in enumerate(schedule):
            if opt is None or ep_lr != schedule[ep - 1]:
                # MTT re-creates the optimizer at the decay (momentum buffers restart)
                opt = torch.optim.SGD(net.parameters(), lr=ep_lr, momentum=ecfg.momentum,
                                      weight_decay=ecfg.weight_decay)
            perm = torch.randperm(n).to(dev)
            total = 0.0
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                x = x_all[idx]
                if ecfg.dsa and augment is not None:
                    x = augment(x, generator=gen)
                loss = -(t_all[idx] * F.log_softmax(net(x), dim=1)).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            if on_epoch is not None:
                on_epoch(ep, ep_lr, total / n)
        net.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, test_x.shape[0], max(1, ecfg.test_batch_size)):
                xb = test_x[i:i + ecfg.test_batch_size].to(dev, torch.float32)
                yb = test_y[i:i + ecfg.test_batch_size].to(dev)
                correct += int((net(xb).argmax(1) == yb).sum())
        return correct / test_x.shape[0]
    finally:
        torch.set_num_threads(old_threads)


def random_real_set(train_images: torch.Tensor, train_labels: torch.Tensor, ipc: int, num_classes: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random-real baseline: ``ipc`` real images per class drawn without replacement.

    Selection by :func:`contra_ray.data.real_images_per_class` (MTT/DATM ``get_images``: one
    ``randperm`` per class, classes in order) with a CPU generator seeded with ``seed``.

    Args:
        train_images: float ``[N, C, H, W]`` preprocessed train images.
        train_labels: int64 ``[N]`` labels in ``[0, num_classes)``.
        ipc: images per class.
        num_classes: number of classes C.
        seed: selection seed (a private ``torch.Generator``; global RNG untouched).

    Returns:
        ``(images [ipc*C, C, H, W], targets float32 one-hot [ipc*C, num_classes])``, grouped by class
        (class 0 first).

    Raises:
        ValueError: ``ipc < 1`` or some class has fewer than ``ipc`` images.
    """
    sel = real_images_per_class(train_images, train_labels, ipc, torch.Generator().manual_seed(seed), num_classes)
    return train_images[sel].clone(), F.one_hot(train_labels[sel].long(), num_classes).float()


def summarize(accs: Sequence[float]) -> tuple[float, float]:
    """``(mean, std)`` in percent of accuracies in [0, 1]; std is the population std (``np.std``, as MTT/DATM).

    Raises:
        ValueError: ``accs`` is empty.
    """
    if len(accs) == 0:
        raise ValueError("summarize: no accuracies")
    pct = np.asarray(accs, dtype=np.float64) * 100.0
    return float(pct.mean()), float(pct.std())
