"""The live forgetting monitor (paper §4.2): the Eq. 2 matching loss of the current synthetic set on segments
of a held-out reference expert trajectory τ_o, measured during distillation (``distill.monitor_every``);
the same losses the Eq. 7 correlation analysis (:mod:`contra_ray.analyze.correlation`) records.

Plain PyTorch, no Ray, no MLflow.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from contra_ray.config import ConfigError
from contra_ray.distill.matching import matching_loss, minibatch_sequence, unroll
from contra_ray.models import functional_forward

__all__ = ["segment_loss_eval", "ForgettingMonitor"]


def segment_loss_eval(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], theta0: torch.Tensor,
                      target: torch.Tensor, images: torch.Tensor, targets: torch.Tensor, syn_lr: float,
                      batches: Sequence[torch.Tensor], augment: Callable | None = None,
                      aug_seeds: Sequence[int] | None = None) -> float:
    """Eq. 2 loss of one segment after the Eq. 1 student unroll, forward only.

    The same N SGD steps as :func:`contra_ray.distill.matching.unroll`, but each inner gradient is taken with
    ``create_graph=False`` on detached synthetic data, so no graph to the synthetic set is built and
    memory stays that of one step. Returns ||θ̂_N - θ*_M||² / ||θ*_0 - θ*_M||² as a float.

    Args:
        forward: ``(theta [P], x [b,C,H,W]) -> logits [b,C]``.
        theta0, target: θ*_{t,0} and θ*_{t,M}, ``[P]``.
        images: synthetic images ``[n,C,H,W]``; targets: ``[n,C]`` distributions; syn_lr: α.
        batches, augment, aug_seeds: the fixed evaluation plan (index tensors and per-step DSA seeds).
    """
    theta_n = unroll(forward, theta0, images, targets, syn_lr, batches, augment, aug_seeds, differentiable=False)
    return float(matching_loss(theta_n, theta0, target))


class ForgettingMonitor:
    """Eq. 2 matching loss of fixed epochs of the held-out trajectory τ_o for a distiller's current set.

    The parameters θ*_j and θ*_{j+M} of τ_o are read from the store once, here; nothing else touches τ_o.
    Every call uses the same evaluation plan (mini-batches and DSA seeds drawn once from ``seed``), so
    the measurement noise is shared across iterations and a change in the loss is a change of the set.
    Calls read the distiller's images, soft labels and syn_lr and change nothing (no ``.grad`` either).

    Args:
        store: the expert store; reference_id: τ_o; epochs: segment starts j to measure;
        expert_epochs: M; seed: seed of the evaluation plan.

    Raises:
        ConfigError: no epochs, or an epoch whose segment j + M lies beyond the store's saved epochs.
    """

    def __init__(self, store, reference_id: int, epochs: Sequence[int], expert_epochs: int, seed: int = 0):
        self.reference_id = int(reference_id)
        self.epochs = [int(j) for j in epochs]
        self.expert_epochs = int(expert_epochs)
        self.seed = int(seed)
        if not self.epochs:
            raise ConfigError("distill.monitor_epochs=[]: no epochs of τ_o to monitor")
        bad = [j for j in self.epochs if not 0 <= j <= store.epochs - self.expert_epochs]
        if bad:
            raise ConfigError(f"distill.monitor_epochs={self.epochs}: epochs {bad} have no segment of M="
                              f"{self.expert_epochs} epochs in τ_o (the store saves epochs 0..{store.epochs}, so "
                              f"starts must be in 0..{store.epochs - self.expert_epochs})")
        needed = sorted(set(self.epochs) | {j + self.expert_epochs for j in self.epochs})
        self._params = {e: store.params(self.reference_id, e) for e in needed}
        self._plan: tuple[tuple[torch.Tensor, ...], tuple[int, ...]] | None = None
        self._cast: dict[int, torch.Tensor] = {}

    def _evaluation_plan(self, n_syn: int, batch_syn: int, steps: int):
        if self._plan is None:
            gen = torch.Generator().manual_seed(self.seed)
            batches = tuple(minibatch_sequence(n_syn, batch_syn, steps, gen))
            seeds = tuple(int(s) for s in torch.randint(0, 2**62, (steps,), generator=gen))
            self._plan = (batches, seeds)
        return self._plan

    def _theta(self, epoch: int, like: torch.Tensor) -> torch.Tensor:
        if epoch not in self._cast or self._cast[epoch].dtype != like.dtype:
            self._cast[epoch] = self._params[epoch].to(like.device, like.dtype)
        return self._cast[epoch]

    def losses(self, distiller: Any) -> list[float]:
        """Eq. 2 loss of each monitored epoch (in ``self.epochs`` order) for ``distiller``'s current set.

        Uses ``distiller.model``, ``images``, ``targets()``, ``syn_lr``, ``augment``, ``n_syn``,
        ``batch_syn`` and ``d`` (``syn_steps``, ``dsa``).
        """
        d = distiller.d
        batches, seeds = self._evaluation_plan(distiller.n_syn, distiller.batch_syn, d.syn_steps)
        augment = None
        if distiller.augment is not None and d.dsa:
            augment = lambda x, seed: distiller.augment(x, seed=seed)  # noqa: E731
        images, targets = distiller.images.detach(), distiller.targets()
        syn_lr = float(distiller.syn_lr.detach())
        forward = lambda theta, x: functional_forward(distiller.model, theta, x)  # noqa: E731
        return [segment_loss_eval(forward, self._theta(j, images), self._theta(j + self.expert_epochs, images),
                                  images, targets, syn_lr, batches, augment, seeds)
                for j in self.epochs]

    def __call__(self, distiller: Any) -> dict[str, float]:
        """``{"monitor_loss_epoch_<j>": Eq. 2 loss}`` for each monitored epoch j (MLflow metric names)."""
        return {f"monitor_loss_epoch_{j}": v for j, v in zip(self.epochs, self.losses(distiller))}
