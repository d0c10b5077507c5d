"""The stages every entry point shares: data in, experts ready, visuals out.

:func:`prepare_data` (train/test splits, preprocessor), :func:`ensure_experts` (open or train the expert
store and check it fits the config), :func:`curriculum_rank` (App. B sample difficulty) and
:func:`log_set_visuals` (image grid and curves next to the artifact and in MLflow). Used by the distill,
pipeline, tune, analyze CLIs and by every Ray Train worker.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import Config
from .fileio import atomic_write
from .models import ModelSpec
from .seeds import derive_seed

__all__ = ["PreparedData", "prepare_data", "check_memory", "store_meta", "ensure_experts", "curriculum_rank",
           "init_pool", "class_names", "log_set_visuals"]


@dataclasses.dataclass
class PreparedData:
    """Data every stage needs, preprocessed once: float32 images in the model's input space.

    For a streamed set (``data.in_memory`` false, the ImageNet default) ``train_x`` / ``test_x`` are lazy
    :class:`contra_ray.disk_images.PreprocessedImages` views: indexing or splitting them reads and
    preprocesses just those rows, so experts, the distiller's initialization and evaluation stream the set
    batch by batch through the same code.
    """

    train: object  # data.ImageSet
    test: object  # data.ImageSet
    preprocessor: object  # data.Preprocessor
    train_x: torch.Tensor  # float32 [N, C, H, W] (or a lazy view of it)
    test_x: torch.Tensor  # float32 [N_test, C, H, W] (or a lazy view of it)
    spec: ModelSpec


def prepare_data(cfg: Config, with_test: bool = True) -> PreparedData:
    """Load the train (subset) and test splits, fit or load the cached preprocessor, apply it.

    Raises:
        ConfigError: IPC or batch_syn too large for the data (:meth:`Config.validate_data`).
        FileNotFoundError: dataset missing (see :func:`contra_ray.data.load_split`).
    """
    from .data import fit_preprocessor, load_split

    train = load_split(cfg.data, "train")
    cfg.validate_data(train.num_classes, int(train.class_counts().min()))
    test = load_split(cfg.data, "test") if with_test else None
    pre = fit_preprocessor(train, cfg.data)
    spec = cfg.model_spec(train.num_classes, train.image_size, train.channels)
    return PreparedData(train, test, pre, pre(train.images), pre(test.images) if with_test else None, spec)


def check_memory(cfg: Config, data: PreparedData, workers: int = 1):
    """Before experts or distillation: plan the student unroll for this run's shapes (one measured step,
    :func:`contra_ray.memory.plan_for_config`) and print the plan; returns the
    :class:`~contra_ray.memory.MemoryPlan`.

    Raises:
        ConfigError: the unroll fits in no allowed mode (estimate and available memory in the message).
    """
    from .memory import plan_for_config

    plan = plan_for_config(cfg, data.spec, workers=workers)
    print(f"memory: {plan.describe()}", flush=True)
    return plan


def store_meta(cfg: Config, data: PreparedData) -> dict:
    meta = {"model_spec": data.spec.to_dict(), "dataset_id": data.train.dataset_id,
            "content_hash": data.train.content_hash, "zca": cfg.data.zca, "zca_eps": cfg.data.zca_eps,
            "preprocessor_fingerprint": data.preprocessor.fingerprint(), "classes": list(data.train.classes),
            "epochs": cfg.experts.epochs}
    if getattr(data.train, "class_names", None) is not None:
        meta["class_names"] = list(data.train.class_names)  # readable names (words.txt); not compared
    return meta


def ensure_experts(cfg: Config, data: PreparedData, train_missing: bool = True):
    """Open the expert store named by the config, training the missing experts (Ray, in parallel) if
    ``train_missing``; then check it fits the distillation config.

    Raises:
        ExpertStoreError: store missing (and ``train_missing`` false) or built for another model,
            dataset, ZCA setting, or with too few epochs for T+ + M (or, with the forgetting monitor on,
            for the largest of ``distill.monitor_epochs`` + M); without ``train_missing``, a store with
            fewer experts than ``experts.num_experts`` or other than ``experts.epochs`` epochs (the run
            would record settings it did not use).
        ConfigError: with the forgetting monitor on, a ``distill.reference_expert`` not in the store or a
            store of one expert (:func:`contra_ray.analysis.reference_expert_id`).
    """
    from .expert_store import ExpertStore, ExpertStoreError
    from .experts_ray import train_experts

    path = cfg.expert_store()
    if train_missing:
        from .augment import DSA
        from .fileio import wait_lock

        # two runs sharing a store (--experts, one preset's default) must not train the same expert at once
        with wait_lock(path.parent / f".{path.name}.lock", f"training the experts of {path}"):
            order_factory = None
            if cfg.experts.curriculum:
                from .experts import CurriculumOrder

                rank = curriculum_rank(cfg, data)
                order_factory = lambda i: CurriculumOrder(rank, cfg.experts.curriculum_lambda,  # noqa: E731
                                                          cfg.experts.curriculum_gamma)
            store = train_experts(cfg, data.train_x, data.train.labels, data.test_x, data.test.labels, data.spec,
                                  store_meta(cfg, data), data.preprocessor.state_dict(),
                                  augment_factory=(lambda: DSA()) if cfg.experts.dsa else None,
                                  order_factory=order_factory)
    else:
        store = ExpertStore.open(path)
        x, ids = cfg.experts, store.expert_ids
        if len(ids) < x.num_experts:
            raise ExpertStoreError(f"experts.num_experts={x.num_experts}: the store {path} holds {len(ids)} expert(s) "
                                   f"(ids {ids}); train the missing ones (without --no-train-experts) or set "
                                   f"experts.num_experts={len(ids)}")
        if store.epochs != x.epochs:
            raise ExpertStoreError(f"experts.epochs={x.epochs}: the store {path} holds {store.epochs}-epoch "
                                   f"trajectories; set experts.epochs={store.epochs}")
    if len(store.expert_ids) > cfg.experts.num_experts:
        print(f"experts: the store holds {len(store.expert_ids)} experts, more than experts.num_experts="
              f"{cfg.experts.num_experts}; the distillation samples from all of them", flush=True)
    d = cfg.distill
    store.check_compatible(data.spec, data.train.dataset_id, cfg.data.zca, d.max_start_epoch + d.expert_epochs,
                           data.preprocessor.fingerprint())
    if d.monitor_every:  # the forgetting monitor's inputs, before distillation rather than when it is built
        from .analysis import reference_expert_id

        reference_expert_id(store, d.reference_expert)
        if d.monitor_epochs:
            store.check_compatible(data.spec, None, cfg.data.zca, max(d.monitor_epochs) + d.expert_epochs,
                                   needed_by=f"distill.monitor_epochs={d.monitor_epochs}: the largest + "
                                             "distill.expert_epochs")
    return store


def curriculum_rank(cfg: Config, data: PreparedData) -> torch.Tensor:
    """Difficulty rank of every training sample for curriculum experts (paper App. B), int64 ``[N]``.

    One plain (shuffled-order) ranking expert with seed ``derive_seed(experts.seed, "ranking_expert")`` is
    trained on the real data;
    a sample's difficulty is the first epoch after which that expert classifies it correctly (earlier =
    easier, ties by index). Cached in ``<expert store>/difficulty_rank.pt`` (atomic write).
    """
    from .experts import difficulty_from_first_correct, first_correct_epoch, train_expert
    from .augment import DSA

    path = cfg.expert_store() / "difficulty_rank.pt"
    if path.exists():
        rank = torch.load(path)
        if len(rank) == len(data.train_x):
            return rank
    print("curriculum: training a ranking expert for sample difficulty (App. B)", flush=True)
    traj, _ = train_expert(-1, derive_seed(cfg.experts.seed, "ranking_expert"), data.train_x, data.train.labels, data.test_x,
                           data.test.labels, data.spec, cfg.experts, augment=DSA() if cfg.experts.dsa else None,
                           device=cfg.device)
    first = first_correct_epoch(data.spec, list(traj[1:]), data.train_x, data.train.labels, device=cfg.device)
    rank = difficulty_from_first_correct(first)
    atomic_write(path, lambda tmp: torch.save(rank, tmp))
    return rank


def init_pool(cfg: Config, data: PreparedData, per_class: int | None = None) -> tuple:
    """The real images the synthetic set is initialized from: ``(x, labels)`` for ``Distiller``.

    In memory: the whole train set (``data.train_x``, ``data.train.labels``), as before. Streamed: a
    per-class sample of ``per_class`` images (default ``max(4 * distill.ipc, 10)``; all of a smaller class)
    drawn by a generator seeded ``derive_seed(distill.seed, "init_pool")``, as a lazy view, so the
    initializing expert's logits are ``[C * per_class, C]`` instead of ``[N, C]`` (5 GB for ImageNet-1K).

    Returns:
        ``(x, y)``: float32 images ``[n, C, H, W]`` (or a lazy view) and int64 labels ``[n]``.
    """
    from .disk_images import is_lazy

    if not is_lazy(data.train_x):
        return data.train_x, data.train.labels
    k = per_class or max(4 * cfg.distill.ipc, 10)
    gen = torch.Generator().manual_seed(derive_seed(cfg.distill.seed, "init_pool"))
    labels = data.train.labels
    picked = []
    for c in range(data.spec.num_classes):
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:k]])
    idx = torch.cat(picked).sort().values
    return data.train_x.take(idx), labels[idx].clone()


def class_names(cfg: Config, classes: list[str]) -> list[str]:
    """Readable names of ``classes`` (ids as stored in an artifact): the first synonym in ``words.txt``
    (or ``LOC_synset_mapping.txt``) under ``data.root`` for ``tiny-imagenet`` / ``imagenet``, else ``classes``."""
    if cfg.data.dataset not in ("tiny-imagenet", "imagenet") or not cfg.data.root:
        return list(classes)
    from pathlib import Path

    from .imagenet_data import read_class_names

    root = Path(cfg.data.root).expanduser()
    names = next((root / n for n in ("words.txt", "LOC_synset_mapping.txt") if (root / n).is_file()), None)
    return read_class_names(names, list(classes), required=False) if names else list(classes)


def log_set_visuals(cfg: Config, artifact, history: dict, preprocessor, logger, eval_every: int | None = None) -> None:
    """``distilled_grid.png`` (one row per class, class names, images upscaled to >= 64 px) and
    ``distill_curves.png`` (matching losses, syn_lr and, when evaluated, eval_acc on separate axes) next to
    the artifact, and in MLflow.

    Args:
        history: the loop's metric history (``loss``, ``loss/...``, ``syn_lr`` per iteration; ``eval_acc``
            every ``eval_every`` iterations).
        eval_every: period of ``history["eval_acc"]`` (default ``cfg.distill.eval_every``; a Tune trial
            passes its proxy period).
    """
    from .tracking import save_curves, save_image_grid

    grid = cfg.run_dir() / "distilled_grid.png"
    classes = list(artifact.meta.get("classes") or [])
    names = artifact.meta.get("class_names") or (class_names(cfg, classes) if classes else None)
    save_image_grid(preprocessor.to_display(artifact.images), artifact.hard_labels, names, grid,
                    title=f"{cfg.name}: IPC {artifact.ipc}, iteration {artifact.meta.get('iteration', '?')}")
    every = eval_every if eval_every is not None else cfg.distill.eval_every
    accs = history.get("eval_acc", [])
    panels = {"matching loss": {k: v for k, v in history.items() if k == "loss" or k.startswith("loss/")},
              "syn_lr": {"syn_lr": history.get("syn_lr", [])},
              "eval_acc (%)": {"eval_acc": ([every * (i + 1) for i in range(len(accs))], accs)} if every else {}}
    curves = cfg.run_dir() / "distill_curves.png"
    save_curves(panels, curves, title=f"{cfg.name}: K={cfg.distill.K}, β={cfg.distill.beta}")
    logger.log_artifact(str(grid))
    logger.log_artifact(str(curves))
