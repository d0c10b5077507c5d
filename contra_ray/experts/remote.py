"""Experts in parallel: one Ray task per expert, each saved to the store as soon as it finishes.

The Ray edge of expert training; the training itself is :func:`contra_ray.experts.train_expert`
(plain PyTorch) and the files are :class:`contra_ray.experts.store.ExpertStore`'s.
"""

from __future__ import annotations

import json
import warnings
from typing import Callable

import torch

from contra_ray.augment import DSA, dsa_if
from contra_ray.common import storage
from contra_ray.common.fileio import atomic_write, wait_lock
from contra_ray.common.raycluster import check_locations_on_nodes, ensure_ray
from contra_ray.common.seeds import derive_seed
from contra_ray.config import Config, ExpertConfig
from contra_ray.data.disk_images import is_lazy
from contra_ray.data.ffcv_beton import FFCVLoaderFactory, beton_name, ffcv_available, open_beton
from contra_ray.data.prepare import PreparedData, streamed_locations
from contra_ray.data.preprocess import Preprocessor
from contra_ray.experts.curriculum import CurriculumOrder, SampleOrder, difficulty_from_first_correct
from contra_ray.experts.store import ExpertStore, ExpertStoreError, partial_dir, reference_expert_id
from contra_ray.experts.training import Augment, first_correct_epoch, train_expert
from contra_ray.models import ModelSpec

__all__ = ["train_experts", "choose_loader"]

_RECIPE_FIELDS = ("lr", "momentum", "weight_decay", "batch_size", "dsa", "curriculum", "curriculum_lambda",
                  "curriculum_gamma")


def _recipe(cfg: ExpertConfig) -> dict:
    return {f: getattr(cfg, f) for f in _RECIPE_FIELDS}


def _refuse_incompatible(store: ExpertStore, wanted: dict) -> None:
    """Raise if an existing store's meta differs from what this run would write (resume safety)."""
    have = store.meta
    if "model_spec" in have and "model_spec" in wanted:  # stores written before ModelSpec gained fields
        have["model_spec"] = ModelSpec.from_dict(have["model_spec"]).to_dict()
        wanted = {**wanted, "model_spec": ModelSpec.from_dict(wanted["model_spec"]).to_dict()}
    names = {"model_spec": "model", "epochs": "experts.epochs", "dataset_id": "dataset_id",
             "content_hash": "content_hash", "zca": "data.zca", "zca_eps": "data.zca_eps",
             "preprocessor_fingerprint": "preprocessor fingerprint", "classes": "classes"}
    for key, field in names.items():
        if key in have and key in wanted and have[key] != wanted[key]:
            built = "for" if key in ("model_spec", "dataset_id", "classes") else "with"
            raise store._mismatch(field, have[key], wanted[key], built=built)
    for key, value in wanted.get("recipe", {}).items():
        if key in have.get("recipe", {}) and have["recipe"][key] != value:
            raise store._mismatch(f"experts.{key}", have["recipe"][key], value, built="with")


def _expert_task(expert_id: int, seed: int, data: tuple, spec: ModelSpec, cfg: ExpertConfig,
                 order: SampleOrder | None, augment_factory: Callable[[], Augment] | None, device: str,
                 threads: int, resume_dir: str | None = None,
                 epoch_hook: Callable[[int, int], None] | None = None,
                 loader_factory: Callable | None = None,
                 resume_location: str | None = None) -> tuple[int, torch.Tensor, list[float]]:
    """Body of one Ray task: train one expert (resuming from ``resume_dir``), print one line per epoch
    (forwarded to the driver), then call ``epoch_hook(expert_id, epoch)`` (tests inject faults there).
    ``loader_factory(device, num_workers)`` builds the batch source in the task (FFCV, ``threads`` workers).
    ``resume_location``: the URI ``resume_dir`` mirrors (an expert store on object storage): fetched before
    training and published after every saved epoch (``state.pt`` last), so a retry on any node resumes."""
    train_x, train_y, test_x, test_y = data
    remote = resume_location if resume_dir is not None and storage.is_uri(resume_location) else None
    if remote is not None:
        storage.pull(remote, resume_dir)
    augment = augment_factory() if (augment_factory is not None and cfg.dsa) else None
    loader = loader_factory(device, threads) if loader_factory is not None else None

    def progress(s):
        if remote is not None:
            storage.push(resume_dir, remote, last=["state.pt"])
        print(s.line(), flush=True)
        if epoch_hook is not None:
            epoch_hook(expert_id, s.epoch)

    traj, acc = train_expert(expert_id, seed, train_x, train_y, test_x, test_y, spec, cfg, order=order,
                             augment=augment, device=device, threads=threads, progress=progress,
                             resume_dir=resume_dir, loader=loader)
    return expert_id, traj, acc


def choose_loader(cfg: ExpertConfig, train_x) -> str:
    """``memory`` or ``ffcv`` for ``experts.loader`` (``auto``: memory when the preprocessed float32 train set,
    ``N * C * H * W * 4`` bytes, fits ``experts.memory_budget_gb``, else ffcv)."""
    if cfg.loader != "auto":
        return cfg.loader
    need = 4 * int(torch.Size(train_x.shape).numel())
    return "memory" if need <= cfg.memory_budget_gb * 2**30 else "ffcv"


def _ffcv_factory(cfg: ExpertConfig, store_meta: dict, train_y: torch.Tensor, spec: ModelSpec,
                  preprocessor_state: dict):
    """The checked ``.beton`` of this train set as an :class:`~contra_ray.data.ffcv_beton.FFCVLoaderFactory`;
    with ``experts.ffcv_dir`` a URI, this node's copy is filled first and the factory carries the fill that each
    task runs on its own node (:func:`~contra_ray.data.ffcv_beton.open_beton`)."""
    if not cfg.ffcv_dir:
        raise ValueError("experts.ffcv_dir=None: the FFCV loader needs the folder of the .beton files "
                         "(python -m contra_ray.data prepare --out DIR)")
    if not ffcv_available():
        raise ValueError(f"experts.loader={cfg.loader!r} chose FFCV but `import ffcv` fails; pip install '.[ffcv]' "
                         "(needs libturbojpeg0-dev and libopencv-dev, see scripts/setup.sh) or set "
                         "experts.loader=memory")
    path, fill = open_beton(cfg.ffcv_dir, beton_name(store_meta["dataset_id"], cfg.ffcv_mode),
                            dataset_id=store_meta["dataset_id"], content_hash=store_meta["content_hash"],
                            resolution=spec.image_size, num_samples=len(train_y))
    return FFCVLoaderFactory(path, Preprocessor.from_state_dict(preprocessor_state), cfg.batch_size, fill=fill)


def train_experts(cfg: Config, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                  test_y: torch.Tensor, spec: ModelSpec, store_meta: dict, preprocessor_state: dict[str, torch.Tensor],
                  augment_factory: Callable[[], Augment] | None = None,
                  order_factory: Callable[[int], SampleOrder] | None = None,
                  epoch_hook: Callable[[int, int], None] | None = None,
                  on_trained: Callable[[int, int, list[float]], None] | None = None) -> ExpertStore:
    """Train ``cfg.experts.num_experts`` experts in parallel as Ray tasks into ``cfg.expert_store()``.

    Each expert ``i`` (ids ``0..num_experts-1``) is :func:`train_expert` with seed
    ``derive_seed(cfg.experts.seed, "expert", i)`` (:mod:`contra_ray.common.seeds`)
    in a task with ``num_cpus=cfg.experts.cpus_per_expert``, ``num_gpus=cfg.experts.gpus_per_expert`` and
    ``max(1, int(num_cpus))`` torch threads, on ``cfg.device``. The data go through the object store once
    (one ``ray.put``). The driver saves each expert as soon as its task finishes (``ray.wait``), so a crash
    loses only the running experts; a rerun skips experts already saved whose checksum verifies (corrupt
    ones are retrained). Progress: a tqdm bar over experts in the driver, one line per epoch per task.

    Resumable: each task saves every finished epoch in ``<store>/expert_XXXX.partial/``
    (:class:`~contra_ray.experts.store.PartialExpert`), so a task that dies (worker killed, node lost) and is
    retried by Ray (``max_retries=cfg.experts.max_retries``), or a rerun of this function after a crash,
    continues after the expert's last saved epoch with a bit-identical trajectory. With the store at a URI
    (``experts.store`` or ``output_dir`` ``s3://…``) the store is fetched first and published after every
    expert (``index.parquet`` and ``store.json`` last), and each task publishes its ``.partial`` folder after
    every epoch, so a retry on any node resumes; a local store must be a folder every node mounts (checked
    before the tasks start). ``experts.num_experts`` may grow later: only the new ids are trained.

    Ray is started only if not initialized (``RAY_ADDRESS`` respected; locally
    :func:`contra_ray.common.raycluster.ensure_ray`, local CPUs from ``available_cpus()``) and is left running.

    Args:
        cfg: validated config; uses ``experts.*``, ``device`` and ``expert_store()``.
        train_x: float32 ``[N, C, H, W]`` preprocessed; train_y: int64 ``[N]``; test_x/test_y likewise.
        spec: the expert network (``cfg.model_spec(...)``).
        store_meta: data-side meta, see :func:`store_meta`; ``model_spec``, ``epochs`` and ``recipe``
            (the ``experts`` training fields) are filled in here.
        preprocessor_state: ``Preprocessor.state_dict()``, saved with a new store.
        augment_factory: zero-argument callable returning the augmentation, called inside each task; if
            ``None`` and ``cfg.experts.dsa``, ``contra_ray.augment.DSA`` is used.
        order_factory: ``expert_id -> SampleOrder`` called in the driver (``None`` = :class:`ShuffledOrder`).
            Required when ``cfg.experts.curriculum`` (e.g. ``lambda i: CurriculumOrder(rank, λ, γ)``).
        epoch_hook: ``(expert_id, epoch) -> None`` called inside each task after every saved epoch
            (fault injection in tests; must be picklable).
        on_trained: ``(expert_id, seed, test_acc) -> None`` called in the driver after each expert is saved
            (``test_acc``: one fraction per epoch, NaN where not evaluated), e.g.
            :meth:`contra_ray.tracking.RunLogger.log_expert`; the tasks never open the tracking store.

    Returns:
        The opened :class:`ExpertStore` with all experts.

    Raises:
        ExpertStoreError: the store exists with different model/data/epochs/recipe (names field and values).
        ValueError: ``experts.curriculum`` without ``order_factory``; a CUDA device with
            ``experts.gpus_per_expert=0``; more CPUs per expert than the local Ray cluster has.
        RuntimeError: some expert tasks failed (the others are saved first); chained to the first error.
    """
    import ray
    from tqdm.auto import tqdm

    x = cfg.experts
    if x.curriculum and order_factory is None:
        raise ValueError("experts.curriculum=True needs order_factory (expert_id -> CurriculumOrder built from "
                         "difficulty ranks, see difficulty_from_first_correct)")
    if str(cfg.device).startswith("cuda") and x.gpus_per_expert <= 0:
        raise ValueError(f"experts.gpus_per_expert={x.gpus_per_expert}: device={cfg.device!r} needs a GPU per "
                         "task (Ray hides GPUs from tasks that request none)")
    if x.dsa and augment_factory is None:
        augment_factory = DSA

    meta = dict(store_meta)
    meta.update(model_spec=spec.to_dict(), epochs=int(x.epochs), recipe=_recipe(x))
    loader_factory = None
    if choose_loader(x, train_x) == "ffcv":  # checked before anything is trained: the .beton must hold this set
        loader_factory = _ffcv_factory(x, meta, train_y, spec, preprocessor_state)
        if x.ffcv_mode == "jpeg":
            meta["recipe"]["pixels"] = "ffcv-jpeg"  # lossy: not the pixels the other loaders serve
    path, location = cfg.expert_store(), cfg.expert_store_location()
    if storage.is_uri(location):
        storage.pull(location, path, exclude=["*.partial"])
    if (path / "store.json").exists():
        store = ExpertStore.open(path)
        _refuse_incompatible(store, json.loads(json.dumps(meta)))
    else:
        store = ExpertStore.create(path, meta, preprocessor_state)

    def publish(finished: int | None = None) -> None:
        """Publish the store (the index and store.json last) and drop a finished expert's resume state."""
        if storage.is_uri(location):
            storage.push(path, location, last=["index.parquet", "store.json"], exclude=["*.partial"])
            if finished is not None:
                storage.delete(storage.join(location, partial_dir(location, finished).name))

    todo = []
    for i in range(x.num_experts):
        if i in store.expert_ids:
            if store.is_valid(i):
                continue
            warnings.warn(f"expert store {path}: expert {i} fails its checksum; retraining it", stacklevel=2)
        todo.append(i)
    publish()
    if not todo:
        return store
    started = ensure_ray()
    # expert tasks keep their resume state (expert_XXXX.partial/) in the store: every node must reach it
    shared = {"experts.store": location if storage.is_uri(location) else path.parent}
    if loader_factory is not None:  # every task reads the .beton: a folder every node mounts, or a URI each
        shared["experts.ffcv_dir"] = x.ffcv_dir  # node reaches (its tasks fill the node's copy from there)
    elif is_lazy(train_x):  # a streamed set: tasks fill their node's cache from data.shared_cache, or share it
        shared.update(streamed_locations(cfg))
    check_locations_on_nodes(shared)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if x.cpus_per_expert > cpus:
        msg = f"experts.cpus_per_expert={x.cpus_per_expert}: the Ray cluster has only {cpus} CPUs"
        if started:
            raise ValueError(msg)
        warnings.warn(msg + "; tasks wait for the autoscaler", stacklevel=2)
    threads = max(1, int(x.cpus_per_expert))
    task = ray.remote(_expert_task).options(num_cpus=x.cpus_per_expert, num_gpus=x.gpus_per_expert,
                                            max_retries=x.max_retries)
    if loader_factory is not None:
        data_ref = ray.put((None, None, test_x.contiguous(), test_y.long()))  # batches come from the .beton
    else:
        data_ref = ray.put((train_x.contiguous(), train_y.long(), test_x.contiguous(), test_y.long()))
    pending = {task.remote(i, derive_seed(x.seed, "expert", i), data_ref, spec, x,
                           order_factory(i) if order_factory else None, augment_factory, cfg.device, threads,
                           str(store.partial_dir(i)), epoch_hook, loader_factory,
                           storage.join(location, partial_dir(location, i).name)): i for i in todo}
    failures: list[tuple[int, BaseException]] = []
    bar = tqdm(total=x.num_experts, initial=x.num_experts - len(todo), desc="experts", unit="expert")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            expert_id = pending.pop(ready[0])
            try:
                _, traj, acc = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - keep saving the others, report at the end
                failures.append((expert_id, e))
                bar.write(f"expert {expert_id:04d} failed: {type(e).__name__}: {e}")
                continue
            store.add(expert_id, derive_seed(x.seed, "expert", expert_id), traj, acc)
            publish(expert_id)
            if on_trained is not None:
                on_trained(expert_id, derive_seed(x.seed, "expert", expert_id), list(acc))
            bar.update(1)
            bar.set_postfix(last=expert_id, test_acc=f"{acc[-1]:.4f}")
    finally:
        for ref in pending:
            ray.cancel(ref)
        bar.close()
    if failures:
        raise RuntimeError(f"{len(failures)} expert task(s) failed (ids {[i for i, _ in failures]}); the others "
                           f"are saved in {path}; rerun to retry") from failures[0][1]
    return store


def store_meta(cfg: Config, data: PreparedData) -> dict:
    """The data side of an expert store's ``store.json``: ``model_spec``, ``dataset_id``, ``content_hash``,
    ``zca``, ``zca_eps``, ``preprocessor_fingerprint``, ``classes``, ``epochs`` (and ``class_names`` where the
    data set has readable names); :func:`train_experts` adds the recipe. What a later run's store is checked
    against (:meth:`ExpertStore.check_compatible`)."""
    meta = {"model_spec": data.spec.to_dict(), "dataset_id": data.train.dataset_id,
            "content_hash": data.train.content_hash, "zca": cfg.data.zca, "zca_eps": cfg.data.zca_eps,
            "preprocessor_fingerprint": data.preprocessor.fingerprint(), "classes": list(data.train.classes),
            "epochs": cfg.experts.epochs}
    if getattr(data.train, "class_names", None) is not None:
        meta["class_names"] = list(data.train.class_names)  # readable names (words.txt); not compared
    return meta


def curriculum_rank(cfg: Config, data: PreparedData) -> torch.Tensor:
    """Difficulty rank of every training sample for curriculum experts (paper App. B), int64 ``[N]``.

    One plain (shuffled-order) ranking expert with seed ``derive_seed(experts.seed, "ranking_expert")`` is
    trained on the real data;
    a sample's difficulty is the first epoch after which that expert classifies it correctly (earlier =
    easier, ties by index). Cached in ``<expert store>/difficulty_rank.pt`` (atomic write).
    """
    path = cfg.expert_store() / "difficulty_rank.pt"
    if path.exists():
        rank = torch.load(path, weights_only=True)
        if len(rank) == len(data.train_x):
            return rank
    print("curriculum: training a ranking expert for sample difficulty (App. B)", flush=True)
    traj, _ = train_expert(-1, derive_seed(cfg.experts.seed, "ranking_expert"), data.train_x, data.train.labels,
                           data.test_x, data.test.labels, data.spec, cfg.experts, augment=dsa_if(cfg.experts.dsa),
                           device=cfg.device)
    first = first_correct_epoch(data.spec, list(traj[1:]), data.train_x, data.train.labels, device=cfg.device)
    rank = difficulty_from_first_correct(first)
    atomic_write(path, lambda tmp: torch.save(rank, tmp))
    return rank


def ensure_experts(cfg: Config, data: PreparedData, train_missing: bool = True,
                   on_trained: Callable[[int, int, list[float]], None] | None = None):
    """Open the expert store named by the config, training the missing experts (Ray, in parallel) if
    ``train_missing``; then check it fits the distillation config. ``on_trained``: see :func:`train_experts`.

    Raises:
        ExpertStoreError: store missing (and ``train_missing`` false) or built for another model,
            dataset, ZCA setting, or with too few epochs for T+ + M (or, with the forgetting monitor on,
            for the largest of ``distill.monitor_epochs`` + M); without ``train_missing``, a store with
            fewer experts than ``experts.num_experts`` or other than ``experts.epochs`` epochs (the run
            would record settings it did not use).
        ConfigError: with the forgetting monitor on, a ``distill.reference_expert`` not in the store or a
            store of one expert (:func:`contra_ray.experts.store.reference_expert_id`).
    """
    path = cfg.expert_store()
    if train_missing:
        # two runs sharing a store (--experts, one preset's default) must not train the same expert at once
        with wait_lock(path.parent / f".{path.name}.lock", f"training the experts of {path}"):
            if storage.is_uri(cfg.expert_store_location()):  # the published store (and its difficulty ranks)
                storage.pull(cfg.expert_store_location(), path, exclude=["*.partial"])
            order_factory = None
            if cfg.experts.curriculum:
                rank = curriculum_rank(cfg, data)
                order_factory = lambda i: CurriculumOrder(rank, cfg.experts.curriculum_lambda,  # noqa: E731
                                                          cfg.experts.curriculum_gamma)
            store = train_experts(cfg, data.train_x, data.train.labels, data.test_x, data.test.labels, data.spec,
                                  store_meta(cfg, data), data.preprocessor.state_dict(),
                                  order_factory=order_factory, on_trained=on_trained)
    else:
        if storage.is_uri(cfg.expert_store_location()):
            storage.pull(cfg.expert_store_location(), path, exclude=["*.partial"])
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

        reference_expert_id(store, d.reference_expert)
        if d.monitor_epochs:
            store.check_compatible(data.spec, None, cfg.data.zca, max(d.monitor_epochs) + d.expert_epochs,
                                   needed_by=f"distill.monitor_epochs={d.monitor_epochs}: the largest + "
                                             "distill.expert_epochs")
    return store
