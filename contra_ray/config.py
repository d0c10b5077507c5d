"""One typed configuration for every stage: a preset YAML plus ``section.field=value`` overrides.

Presets live in ``contra_ray/presets/<name>.yaml`` (one per paper Table 5 row, plus CPU presets). The
config is validated once, before any work, by :meth:`Config.validate`; every error is a
:class:`ConfigError` whose message names the field and the offending value. Checks that need the expert
store (enough saved epochs for T+ + M, same model/dataset/ZCA) live in :mod:`contra_ray.experts`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, get_args, get_origin, get_type_hints

import yaml

from contra_ray.common import storage
from contra_ray.common.fileio import YAMLFileError, load_yaml
from contra_ray.common.locations import check_location_fields, ray_job_working_dir
from contra_ray.models import MODEL_NAMES, ModelSpec, is_distillable

PRESET_DIR = Path(__file__).parent / "presets"
DATASETS = ("cifar10", "cifar100", "cifar10-jpeg", "imagefolder", "tiny-imagenet", "imagenet")
AUG_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


#: ``scheme://...``: a URI, not a local path (``s3://bucket/runs`` must never become a folder ``./s3:/bucket``)
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: location fields that accept a URI (contra_ray.common.storage); the others must be local paths
URI_FIELDS = ("output_dir", "experts.store", "data.shared_cache", "experts.ffcv_dir")


def default_cache_dir() -> str:
    return os.environ.get("CONTRA_RAY_CACHE", str(Path.home() / ".cache" / "contra_ray"))


@dataclasses.dataclass
class DataConfig:
    dataset: str = "cifar10-jpeg"  # cifar10 | cifar100 (torchvision format) | cifar10-jpeg | imagefolder
    root: str | None = None  # dataset directory, tarball or ImageFolder root; None = default location
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)
    train_per_class: int | None = None  # class-balanced subset of the train split (None = all)
    zca: bool = True
    zca_eps: float = 0.1
    download: bool = False
    subset_seed: int = 0
    # tiny-imagenet | imagenet (contra_ray.data.imagenet): side length images are resized to (Resize +
    # CenterCrop); None = native size (tiny-imagenet), 64 for imagenet
    resolution: int | None = None
    # keep the decoded set in memory (True) or stream it from the on-disk cache (False); None = streamed
    # for imagenet, in memory otherwise (tiny-imagenet, imagefolder and CIFAR are always in memory today)
    in_memory: bool | None = None
    zca_samples: int | None = None  # fit ZCA on this many train images (seeded sample); None = all of them
    decode_threads: int = 0  # threads decoding JPEGs into the cache (0 = the CPUs this process may use)
    # where a streamed set's decoded folders are published for the other nodes, which read them through their
    # own cache_dir (a URI or a folder every node mounts); None = <output_dir>/data-cache when output_dir is a
    # URI, else none (then cache_dir itself must be a folder every node mounts on a multi-node cluster)
    shared_cache: str | None = None


@dataclasses.dataclass
class ModelConfig:
    name: str = "convnet"
    width: int = 128
    depth: int | None = None


@dataclasses.dataclass
class ExpertConfig:
    num_experts: int = 2
    epochs: int = 8  # saved epochs; the store holds epochs + 1 parameter vectors (0 = init)
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    dsa: bool = True
    curriculum: bool = False  # App. B; sample order easy -> hard with pacing h(e)
    curriculum_lambda: float = 0.3
    curriculum_gamma: int = 5
    store: str | None = None  # directory; None = <output_dir>/experts
    seed: int = 0
    cpus_per_expert: float = 1.0
    gpus_per_expert: float = 0.0
    eval_every: int = 1  # test accuracy every n epochs (0 = only the last)
    max_retries: int = 3  # Ray retries of an expert task whose worker or node died; it resumes at its last epoch
    # batch source of expert training: memory (in-memory tensors, or the on-disk stream of a streamed set) |
    # ffcv (the .beton in ffcv_dir written by python -m contra_ray.data prepare) | auto (memory when the
    # preprocessed float32 train set fits memory_budget_gb, else ffcv)
    loader: str = "memory"
    ffcv_dir: str | None = None  # local (a cluster: shared mount) or a URI (nodes fill sha256-verified copies)
    ffcv_mode: str = "raw"  # which .beton: raw (exact pixels) | jpeg (lossy)
    memory_budget_gb: float = 8.0


@dataclasses.dataclass
class DistillConfig:
    ipc: int = 1
    beta: float = 0.0  # β, weight of the sampled segment (Eq. 8)
    K: int = 3  # concurrent segments
    R: int | None = None  # spacing of concurrent starts; None = floor((T+ - T-) / K)
    syn_steps: int = 80  # N
    expert_epochs: int = 2  # M
    min_start_epoch: int = 0  # T-
    max_start_epoch: int = 4  # T+ (sampled start in [T-, T+))
    batch_syn: int | None = None  # None = whole synthetic set
    iterations: int = 5000
    lr_img: float = 100.0
    lr_label: float = 5.0
    lr_lr: float = 1e-5
    syn_lr_init: float = 0.01  # initial student step size α (= expert lr)
    soft_labels: bool = True  # DATM learned soft labels
    init: str = "real_correct"  # real_correct | real | noise
    dsa: bool = True
    seed: int = 0
    eval_every: int = 0  # evaluate every n iterations (0 = only at the end)
    eval_runs_periodic: int = 1
    checkpoint_every: int = 0
    dtype: str = "float32"
    unroll_memory: str = "auto"  # full (graph of N steps) | constant (adjoint walk) | auto (contra_ray.distill.memory)
    student_execution: str = "sequential"  # sequential | batched (students vmapped together, one call per step)
    monitor_every: int = 0  # forgetting monitor: Eq. 2 loss on the held-out τ_o every n iterations (0 = off)
    monitor_epochs: list[int] = dataclasses.field(default_factory=list)  # epochs of τ_o ([] = T-..T+)
    reference_expert: int | None = None  # τ_o, excluded from distillation when monitoring (None = highest id)

    def resolved_R(self) -> int:
        if self.R is not None:
            return self.R
        return max(1, (self.max_start_epoch - self.min_start_epoch) // max(self.K, 1))

    def concurrent_starts(self) -> list[int]:
        """Start epochs T- + iR, i = 0..K-1 (paper Eq. 8)."""
        return [self.min_start_epoch + i * self.resolved_R() for i in range(self.K)]


@dataclasses.dataclass
class EvalConfig:
    models: list[str] = dataclasses.field(default_factory=lambda: ["convnet"])
    runs: int = 5
    epochs: int = 300
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa: bool = True
    lr: float | None = None  # None = the artifact's learned syn_lr
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    test_batch_size: int = 1000
    seed: int = 0  # evaluation network r is seeded derive_seed(seed, "eval", r) (contra_ray.common.seeds)


@dataclasses.dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None = sqlite:///<output_dir>/mlflow.db
    experiment: str = "contra_ray"


@dataclasses.dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    device: str = "cpu"
    threads: int = 0  # torch threads per process (0 = torch default)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    experts: ExpertConfig = dataclasses.field(default_factory=ExpertConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    # ------------------------------------------------------------------ derived values
    def run_dir(self) -> Path:
        """``<output_dir>/<name>`` on this node (a URI's node-local mirror, published to :meth:`run_location`)."""
        base = storage.local_mirror(self.output_dir) if storage.is_uri(self.output_dir) else Path(self.output_dir)
        return base / self.name

    def run_location(self) -> str:
        """Where the run's files are published: ``<output_dir>/<name>`` (a local path or a URI)."""
        return storage.join(self.output_dir, self.name)

    def expert_store(self) -> Path:
        """The expert store's folder on this node (the local mirror of :meth:`expert_store_location`)."""
        if not self.experts.store:
            return self.run_dir() / "experts"
        store = self.experts.store
        return storage.local_mirror(store) if storage.is_uri(store) else Path(store)

    def expert_store_location(self) -> str:
        """Where the expert store lives: ``experts.store`` or ``<run location>/experts`` (a path or a URI)."""
        return str(self.experts.store) if self.experts.store else storage.join(self.run_location(), "experts")

    def data_cache_location(self) -> str | None:
        """Where a streamed set's decoded folders are published for other nodes (:func:`contra_ray.data.imagenet.
        share_streamed`): ``data.shared_cache``, else ``<output_dir>/data-cache`` when ``output_dir`` is a URI,
        else ``None`` (nothing published: ``data.cache_dir`` is read directly)."""
        if self.data.shared_cache:
            return str(self.data.shared_cache)
        return storage.join(self.output_dir, "data-cache") if storage.is_uri(self.output_dir) else None

    def tracking_uri(self) -> str:
        """``tracking.uri``, else SQLite in the output folder (a URI's mirror on the driver's node)."""
        if self.tracking.uri:
            return self.tracking.uri
        return f"sqlite:///{(storage.local_mirror(self.output_dir) / 'mlflow.db').resolve()}"

    def model_spec(self, num_classes: int, image_size: int, channels: int = 3) -> ModelSpec:
        return ModelSpec(self.model.name, num_classes, image_size, channels, self.model.width, self.model.depth)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "Config":
        """Check every field that can be checked without data; returns ``self``.

        Raises:
            ConfigError: naming the first invalid field and its value.
        """
        d, e, x, m = self.distill, self.eval, self.experts, self.model

        def bad(field: str, value: Any, why: str) -> None:
            raise ConfigError(f"{field}={value!r}: {why}")

        check_run_name(self.name, "name")
        if not str(self.output_dir).strip():
            bad("output_dir", self.output_dir, "must not be empty (the root of the run directories)")
        locations = (("output_dir", self.output_dir), ("data.cache_dir", self.data.cache_dir),
                     ("experts.store", self.experts.store), ("data.root", self.data.root),
                     ("experts.ffcv_dir", self.experts.ffcv_dir), ("data.shared_cache", self.data.shared_cache))
        job_dir = ray_job_working_dir()
        try:
            check_location_fields(locations, URI_FIELDS, job_dir)
        except storage.StorageError as e:
            raise ConfigError(str(e)) from None
        if job_dir is not None and self.data.dataset == "cifar10-jpeg" and not self.data.root \
                and not os.environ.get("CONTRA_RAY_SHARED"):
            bad("data.root", self.data.root, f"the default location of the CIFAR-10 tarball (<repo>/../shared) lies "
                                             f"in Ray's temporary unpack folder {job_dir} inside a Ray job with a "
                                             "working dir; set data.root (or $CONTRA_RAY_SHARED) to an absolute path")
        if len(self.name.encode()) > 200:
            bad("name", self.name, f"{len(self.name.encode())} bytes long; at most 200 (a folder name)")
        if self.data.dataset not in DATASETS:
            bad("data.dataset", self.data.dataset, f"unknown dataset; known: {', '.join(DATASETS)}")
        if self.data.dataset == "imagefolder" and not self.data.root:
            bad("data.root", self.data.root, "data.dataset=imagefolder needs the ImageFolder root directory")
        if self.data.dataset in ("tiny-imagenet", "imagenet") and not self.data.root:
            bad("data.root", self.data.root, f"data.dataset={self.data.dataset} needs the dataset's root directory")
        if self.data.resolution is not None and self.data.resolution < 8:
            bad("data.resolution", self.data.resolution, "must be >= 8 pixels or null")
        if self.data.resolution is not None and self.data.dataset not in ("tiny-imagenet", "imagenet"):
            bad("data.resolution", self.data.resolution, f"resizing is only implemented for tiny-imagenet and "
                                                         f"imagenet, not data.dataset={self.data.dataset}")
        if self.data.in_memory is False and self.data.dataset not in ("tiny-imagenet", "imagenet"):
            bad("data.in_memory", False, f"streaming is only implemented for tiny-imagenet and imagenet, not "
                                         f"data.dataset={self.data.dataset}")
        if self.data.zca_samples is not None and self.data.zca_samples < 2:
            bad("data.zca_samples", self.data.zca_samples, "must be >= 2 or null")
        if self.data.decode_threads < 0:
            bad("data.decode_threads", self.data.decode_threads, "must be >= 0")
        if self.data.train_per_class is not None and self.data.train_per_class < 1:
            bad("data.train_per_class", self.data.train_per_class, "must be >= 1 or null")
        if not (self.data.zca_eps > 0 and math.isfinite(self.data.zca_eps)):
            bad("data.zca_eps", self.data.zca_eps, "must be a finite number > 0")
        if m.name not in MODEL_NAMES:
            bad("model.name", m.name, f"unknown model; known: {', '.join(MODEL_NAMES)}")
        if not is_distillable(ModelSpec(m.name)):
            bad("model.name", m.name, "batch-norm networks keep running statistics outside the flat parameter "
                                      "vector and cannot be distillation networks; evaluate with them (eval.models)")
        if m.width < 1:
            bad("model.width", m.width, "must be >= 1")
        for name in e.models:
            if name not in MODEL_NAMES:
                bad("eval.models", name, f"unknown model; known: {', '.join(MODEL_NAMES)}")
        if x.num_experts < 1:
            bad("experts.num_experts", x.num_experts, "must be >= 1")
        if x.epochs < 1:
            bad("experts.epochs", x.epochs, "must be >= 1")
        if x.batch_size < 1:
            bad("experts.batch_size", x.batch_size, "must be >= 1")
        if not (x.lr > 0 and math.isfinite(x.lr)):
            bad("experts.lr", x.lr, "must be a finite number > 0")
        if self.threads < 0:
            bad("threads", self.threads, "must be >= 0 (0 = torch's default)")
        if not 0 < x.curriculum_lambda <= 1:
            bad("experts.curriculum_lambda", x.curriculum_lambda, "must be in (0, 1]")
        if x.curriculum_gamma < 1:
            bad("experts.curriculum_gamma", x.curriculum_gamma, "must be >= 1")
        if x.max_retries < 0:
            bad("experts.max_retries", x.max_retries, "must be >= 0")
        for field, value in (("experts.momentum", x.momentum), ("eval.momentum", e.momentum)):
            if not 0 <= value < 1:
                bad(field, value, "SGD momentum must be in [0, 1)")
        for field, value in (("experts.weight_decay", x.weight_decay), ("eval.weight_decay", e.weight_decay)):
            if not (value >= 0 and math.isfinite(value)):
                bad(field, value, "must be a finite number >= 0")
        for field, value in (("experts.cpus_per_expert", x.cpus_per_expert), ("eval.cpus_per_run", e.cpus_per_run)):
            if not (value > 0 and math.isfinite(value)):
                bad(field, value, "must be a finite number > 0 (Ray CPUs per task; fractions allowed)")
        for field, value in (("experts.gpus_per_expert", x.gpus_per_expert), ("eval.gpus_per_run", e.gpus_per_run)):
            if not (value >= 0 and math.isfinite(value)):
                bad(field, value, "must be a finite number >= 0 (0 = no GPU)")
        if x.loader not in ("memory", "ffcv", "auto"):
            bad("experts.loader", x.loader, "must be one of memory, ffcv, auto")
        if x.loader == "ffcv" and not x.ffcv_dir:
            bad("experts.ffcv_dir", x.ffcv_dir, "experts.loader=ffcv needs the folder of the .beton files "
                                                "(python -m contra_ray.data prepare --out DIR)")
        if x.ffcv_mode not in ("raw", "jpeg"):
            bad("experts.ffcv_mode", x.ffcv_mode, "must be raw or jpeg")
        if not x.memory_budget_gb > 0:
            bad("experts.memory_budget_gb", x.memory_budget_gb, "must be > 0")
        if d.ipc < 1:
            bad("distill.ipc", d.ipc, "must be >= 1")
        if not 0.0 <= d.beta <= 1.0:
            bad("distill.beta", d.beta, "β must be in [0, 1]")
        if d.K < 0:
            bad("distill.K", d.K, "must be >= 0")
        if d.K == 0 and d.beta != 1.0:
            bad("distill.beta", d.beta, "with distill.K=0 there are no concurrent segments, so β must be 1 (plain MTT)")
        if d.R is not None and d.R < 1:
            bad("distill.R", d.R, "must be >= 1 or null")
        if d.min_start_epoch < 0:
            bad("distill.min_start_epoch", d.min_start_epoch, "T- must be >= 0")
        if d.min_start_epoch >= d.max_start_epoch:
            bad("distill.min_start_epoch", d.min_start_epoch,
                f"T- must be < T+ (distill.max_start_epoch={d.max_start_epoch})")
        if d.K > 0 and d.concurrent_starts()[-1] > d.max_start_epoch:
            bad("distill.K", d.K, f"K concurrent segments T- + (K-1)R = {d.concurrent_starts()[-1]} do not fit in "
                f"[T-, T+] = [{d.min_start_epoch}, {d.max_start_epoch}] with R={d.resolved_R()}")
        if d.syn_steps < 1:
            bad("distill.syn_steps", d.syn_steps, "N must be >= 1")
        if d.expert_epochs < 1:
            bad("distill.expert_epochs", d.expert_epochs, "M must be >= 1")
        if d.max_start_epoch + d.expert_epochs > x.epochs and not x.store:
            bad("distill.max_start_epoch", d.max_start_epoch,
                f"T+ + M = {d.max_start_epoch + d.expert_epochs} exceeds experts.epochs={x.epochs}")
        if d.batch_syn is not None and d.batch_syn < 1:
            bad("distill.batch_syn", d.batch_syn, "must be >= 1 or null")
        if d.iterations < 1:
            bad("distill.iterations", d.iterations, "must be >= 1 (0 would save the initial set as distilled)")
        for f in ("lr_img", "lr_label", "lr_lr", "syn_lr_init"):
            if not (getattr(d, f) > 0 and math.isfinite(getattr(d, f))):
                bad(f"distill.{f}", getattr(d, f), "must be a finite number > 0")
        for f in ("checkpoint_every", "eval_every"):
            if getattr(d, f) < 0:
                bad(f"distill.{f}", getattr(d, f), "must be >= 0 (0 = never)")
        if d.eval_runs_periodic < 1:
            bad("distill.eval_runs_periodic", d.eval_runs_periodic, "must be >= 1")
        if d.init not in ("real_correct", "real", "noise"):
            bad("distill.init", d.init, "must be one of real_correct, real, noise")
        if d.dtype not in ("float32", "float64"):
            bad("distill.dtype", d.dtype, "must be float32 or float64")
        if d.unroll_memory not in ("auto", "full", "constant"):
            bad("distill.unroll_memory", d.unroll_memory, "must be one of auto, full, constant")
        if d.student_execution not in ("sequential", "batched"):
            bad("distill.student_execution", d.student_execution, "must be one of sequential, batched")
        if d.monitor_every < 0:
            bad("distill.monitor_every", d.monitor_every, "must be >= 0 (0 = no forgetting monitor)")
        if any(j < 0 for j in d.monitor_epochs):
            bad("distill.monitor_epochs", d.monitor_epochs, "epochs must be >= 0")
        late = [j for j in d.monitor_epochs if j + d.expert_epochs > x.epochs]
        if late and not x.store:  # a given store is checked against its saved epochs (experts.remote.ensure_experts)
            bad("distill.monitor_epochs", d.monitor_epochs,
                f"epochs {late} have no segment of M={d.expert_epochs} epochs in experts.epochs={x.epochs} "
                f"(starts must be in 0..{x.epochs - d.expert_epochs})")
        if d.reference_expert is not None and d.reference_expert < 0:
            bad("distill.reference_expert", d.reference_expert, "must be an expert id >= 0 or null")
        for f in ("batch_size", "test_batch_size"):
            if getattr(e, f) < 1:
                bad(f"eval.{f}", getattr(e, f), "must be >= 1")
        if e.runs < 1:
            bad("eval.runs", e.runs, "must be >= 1")
        if e.epochs < 1:
            bad("eval.epochs", e.epochs, "must be >= 1")
        for field, value in (("distill.seed", d.seed), ("experts.seed", x.seed), ("eval.seed", e.seed),
                             ("data.subset_seed", self.data.subset_seed)):
            if value < 0:
                bad(field, value, "seeds must be >= 0")
        if e.lr is not None and not (e.lr > 0 and math.isfinite(e.lr)):
            bad("eval.lr", e.lr, "must be a finite number > 0 or null")
        if self.device not in ("cpu", "cuda") and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            bad("device", self.device, "must be cpu, cuda or cuda:<index>")
        return self

    def validate_data(self, num_classes: int, min_class_count: int) -> None:
        """Checks that need the dataset's size: IPC and synthetic batch size.

        Raises:
            ConfigError: IPC larger than the smallest class, or batch_syn larger than the synthetic set.
        """
        d = self.distill
        if d.ipc > min_class_count:
            raise ConfigError(f"distill.ipc={d.ipc}: larger than the smallest class of the training set "
                              f"({min_class_count} images)")
        if d.batch_syn is not None and d.batch_syn > d.ipc * num_classes:
            raise ConfigError(f"distill.batch_syn={d.batch_syn}: larger than the synthetic set "
                              f"(ipc * classes = {d.ipc * num_classes})")


def check_device(device: str, field: str = "device") -> None:
    """Refuse a CUDA device this process cannot see; call before any work where this process computes on
    ``device`` (not in a driver whose Ray workers get the GPUs). :meth:`Config.validate` checks only the
    spelling, so configs for GPU machines still load and validate on CPU-only ones.

    Raises:
        ConfigError: ``device`` is ``cuda``/``cuda:<i>`` and no CUDA device is visible
            (``torch.cuda.is_available()`` is False), or ``<i>`` is not below the visible device count.
    """
    if not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{field}={device!r}: no CUDA device is visible to this process "
                          "(torch.cuda.is_available() is False); use --set device=cpu, or run where a GPU is visible "
                          "(check CUDA_VISIBLE_DEVICES and the driver)")
    index = str(device).partition(":")[2]
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise ConfigError(f"{field}={device!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")


def check_run_name(name: Any, field: str = "name") -> None:
    """Refuse a run name that is not one path component, so ``<output_dir>/<name>`` stays inside ``output_dir``.

    Raises:
        ConfigError: ``name`` is not a string, is empty, is ``.`` or ``..``, or holds a path separator
            (``../x``, ``/abs``, ``a/b``) or a NUL character (names the field and the value).
    """
    why = None
    if not isinstance(name, str):
        why = f"expected a string, got {type(name).__name__}"
    elif not name.strip():
        why = "must not be empty"
    elif name in (".", ".."):
        why = "must not be . or .."
    elif any(sep and sep in name for sep in ("/", os.sep, os.altsep, "\0")):
        why = "must be a single folder name without a path separator"
    if why:
        raise ConfigError(f"{field}={name!r}: {why}: the run directory is <output_dir>/<{field}> and must stay "
                          f"inside output_dir (put the parent folders in --output-dir)")


# ---------------------------------------------------------------------- loading

def _coerce(value: Any, tp: Any, field: str) -> Any:
    """``value`` (from YAML or a ``--set``) as type ``tp`` of ``field``.

    Numbers are not booleans and booleans are not numbers: a bool field takes ``true``/``false`` (or the
    YAML 1.1 spellings ``yes``/``no``/``on``/``off``), an int or float field refuses ``true``/``false``;
    a str field refuses lists and mappings.

    Raises:
        ConfigError: naming the field and the value, and the expected type.
    """
    origin = get_origin(tp)
    args = get_args(tp)
    if value is None:
        if type(None) in args or tp is Any:
            return None
        raise ConfigError(f"{field}=None: a value is required")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        elif isinstance(value, (dict, set)):
            raise ConfigError(f"{field}={value!r}: expected a list (or comma-separated values)")
        elif not isinstance(value, (list, tuple)):
            value = [value]  # --monitor-epochs 3: YAML reads the one value as a number
        return [_coerce(v, args[0], field) for v in value]
    if args and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        if isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        return _coerce(value, inner, field)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str):  # a string from a dict (YAML already turned true/yes/on into bools)
                if value.lower() in ("true", "yes", "on"):
                    return True
                if value.lower() in ("false", "no", "off"):
                    return False
            raise ValueError  # 0, 1, 2, "1": a number is not a switch
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError  # true/false are not numbers (bool is an int subclass in Python)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if isinstance(value, (list, tuple, dict, set)):
                raise ValueError  # str() would make "['a', 'b']" of a YAML list
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}={value!r}: expected {_type_name(tp)}") from None
    return value


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "bool (true or false)"
    return getattr(tp, "__name__", str(tp))


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    for key, value in values.items():
        field = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(obj))
            raise ConfigError(f"{field}: unknown field (known in {prefix.rstrip('.') or 'top level'}: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{field}={value!r}: expected a mapping")
            _apply(current, value, f"{field}.")
        elif isinstance(value, dict) and value:
            raise ConfigError(f"{_first_path(field, value)}: {field} is a single value "
                              f"({_type_name(hints[key])}), not a section with fields")
        else:
            setattr(obj, key, _coerce(value, hints[key], field))


def _first_path(prefix: str, value: dict) -> str:
    """The first full dotted path inside a nested mapping (``distill.K`` + ``{x: {y: 1}}`` -> ``distill.K.x.y``)."""
    while isinstance(value, dict) and value:
        key, value = next(iter(value.items()))
        prefix = f"{prefix}.{key}"
    return prefix


def preset_path(preset: str) -> Path:
    """Path of a preset given by name (``cifar10_ipc1``) or by file path.

    Raises:
        ConfigError: no such preset.
    """
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    q = PRESET_DIR / f"{preset}.yaml"
    if q.exists():
        return q
    known = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"preset={preset!r}: no such preset file or name; known presets: {known}")


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["distill.K=3", "eval.runs=2"]`` -> nested dict; values parsed as YAML scalars.

    Raises:
        ConfigError: an item without ``=``, or a path that goes through a value set by an earlier item
            (``distill.K=3`` then ``distill.K.x=1``; names the path).
    """
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        set_dotted(out, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return out


def set_dotted(d: dict, dotted: str, value: Any) -> dict:
    """Set ``d["a"]["b"]["c"] = value`` for ``dotted = "a.b.c"``, creating the mappings on the way.

    Raises:
        ConfigError: a part of the path already holds a single value, not a mapping (names the path).
    """
    node, parts = d, dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {'.'.join(parts[:i + 1])}={node!r} is a single value, not a section "
                              "with fields")
    node[parts[-1]] = value
    return d


def get_dotted(d: dict, dotted: str) -> Any:
    """``d["a"]["b"]`` for ``dotted = "a.b"`` (KeyError if absent)."""
    for p in dotted.split("."):
        d = d[p]
    return d


def flatten_dotted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"distill": {"K": 0}, "eval.runs": 1}`` -> ``{"distill.K": 0, "eval.runs": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(preset: str | None = None, overrides: list[str] | dict | None = None,
                validate: bool = True) -> Config:
    """Build a :class:`Config` from a preset (name or YAML path) and overrides, validated.

    The preset is read with the strict :func:`contra_ray.common.fileio.load_yaml` (a key given twice is an
    error, not "last one wins"); ``--set`` values are single YAML scalars (``yaml.safe_load``).

    Raises:
        ConfigError: unknown preset or field, wrong type, invalid value, malformed preset YAML or a key
            given twice in it (names the file and line).
    """
    cfg = Config()
    if preset:
        path = preset_path(preset)
        try:
            raw = load_yaml(path)
        except YAMLFileError as e:
            raise ConfigError(f"preset={preset!r}: {e}") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"preset={preset!r}: {path} holds {type(raw).__name__}, expected a mapping of sections")
        _apply(cfg, raw or {})
    _apply(cfg, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return cfg.validate() if validate else cfg


def config_from_dict(d: dict, validate: bool = True) -> Config:
    cfg = Config()
    _apply(cfg, d)
    return cfg.validate() if validate else cfg
