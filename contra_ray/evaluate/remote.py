"""Ray edge of evaluation: independent evaluation runs as Ray tasks (or in this process).
"""

from __future__ import annotations

from typing import Sequence

import torch

from contra_ray.common.raycluster import ensure_ray
from contra_ray.config import EvalConfig
from contra_ray.evaluate.training import Augment, train_and_test
from contra_ray.models import ModelSpec


def _remote_train_and_test(train: tuple, lr: float, spec: ModelSpec, ecfg: EvalConfig, test: tuple, seed: int,
                           augment: Augment | None, device: str, threads: int) -> float:
    return train_and_test(train[0], train[1], lr, spec, ecfg, test[0], test[1], seed, augment, device, threads)


def evaluate_runs(images: torch.Tensor, targets: torch.Tensor, lr: float, spec: ModelSpec, ecfg: EvalConfig,
                  test_x: torch.Tensor, test_y: torch.Tensor, seeds: Sequence[int], augment: Augment | None = None,
                  device: str = "cpu", threads: int = 0, use_ray: bool = True) -> list[float]:
    """One :func:`train_and_test` per seed; accuracies in [0, 1], in the order of ``seeds``.

    With ``use_ray`` each run is a Ray task with ``num_cpus=ecfg.cpus_per_run``,
    ``num_gpus=ecfg.gpus_per_run`` and ``max(1, int(num_cpus))`` torch threads; the train and test
    tensors are put in the object store once. The task trains on ``"cuda"`` if ``gpus_per_run > 0``
    (Ray assigns the GPU), else on ``"cpu"``. Without Ray the runs are sequential in this process on
    ``device`` with ``threads`` threads (quick periodic evaluations during distillation).

    Args: as :func:`train_and_test`; ``seeds`` one per run.

    Raises:
        ValueError: ``device`` is CUDA but ``ecfg.gpus_per_run == 0`` with Ray (tasks would get no GPU),
            or the Ray cluster has fewer GPUs than one run asks for (the task would wait forever).
    """
    if not use_ray:
        return [train_and_test(images, targets, lr, spec, ecfg, test_x, test_y, s, augment, device, threads)
                for s in seeds]
    if str(device).startswith("cuda") and ecfg.gpus_per_run <= 0:
        raise ValueError(f"device={device!r} but eval.gpus_per_run={ecfg.gpus_per_run}: Ray tasks would get "
                         "no GPU; set eval.gpus_per_run > 0 (e.g. 0.25) or run inline (use_ray=False)")
    import ray

    ensure_ray()
    if ecfg.gpus_per_run > 0 and ray.cluster_resources().get("GPU", 0) < ecfg.gpus_per_run:
        raise ValueError(f"eval.gpus_per_run={ecfg.gpus_per_run} but the Ray cluster has "
                         f"{ray.cluster_resources().get('GPU', 0)} GPUs")
    task = ray.remote(_remote_train_and_test).options(
        num_cpus=ecfg.cpus_per_run, num_gpus=ecfg.gpus_per_run,
        scheduling_strategy="DEFAULT")  # outside a Tune trial's placement group, which has no room for them
    train_ref = ray.put((images.detach().cpu(), targets.detach().cpu()))
    test_ref = ray.put((test_x.cpu(), test_y.cpu()))
    run_device = "cuda" if ecfg.gpus_per_run > 0 else "cpu"
    n_threads = max(1, int(ecfg.cpus_per_run))
    refs = [task.remote(train_ref, lr, spec, ecfg, test_ref, s, augment, run_device, n_threads) for s in seeds]
    return [float(a) for a in ray.get(refs)]
