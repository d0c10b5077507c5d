"""Distillation: learn synthetic images, soft labels and syn_lr by concurrent trajectory matching.

``python -m contra_ray.distill --preset cifar10_ipc1 [--K 3 --beta 0 ...] [--set section.field=value]``

Library: :class:`Distiller` holds the synthetic state (images ``[n,C,H,W]``, label logits ``[n,C]``,
syn_lr, their optimizers) and runs Algorithm 1; :func:`prepare_data`, :func:`ensure_experts` and
:func:`run_distillation` are the stages the CLIs (this one and :mod:`contra_ray.pipeline`) share.
Initialization follows DATM: images are real images the expert classifies correctly, soft labels are
that expert's logits (learned afterwards); optimizers follow MTT (SGD, momentum 0.5 for images and
syn_lr) and DATM (momentum 0.9 for labels).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .config import Config, ConfigError, DistillConfig, load_config
from .matching import SegmentPlan, accumulate_matching_gradients, make_plan
from .models import ModelSpec, build_model, functional_forward

__all__ = ["Distiller", "DistillationDiverged", "prepare_data", "ensure_experts", "run_distillation", "main"]

HARD_LABEL_LOGIT = 100.0  # hard labels as fixed logits: softmax(100 * one_hot) equals one_hot in float32


class DistillationDiverged(RuntimeError):
    """The matching loss, the synthetic images or syn_lr became non-finite (or syn_lr <= 0)."""


@dataclasses.dataclass
class PreparedData:
    """Data every stage needs, preprocessed once: float32 images in the model's input space."""

    train: object  # data.ImageSet
    test: object  # data.ImageSet
    preprocessor: object  # data.Preprocessor
    train_x: torch.Tensor  # float32 [N, C, H, W]
    test_x: torch.Tensor  # float32 [N_test, C, H, W]
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


def store_meta(cfg: Config, data: PreparedData) -> dict:
    return {"model_spec": data.spec.to_dict(), "dataset_id": data.train.dataset_id,
            "content_hash": data.train.content_hash, "zca": cfg.data.zca, "zca_eps": cfg.data.zca_eps,
            "preprocessor_fingerprint": data.preprocessor.fingerprint(), "classes": list(data.train.classes),
            "epochs": cfg.experts.epochs}


def ensure_experts(cfg: Config, data: PreparedData, train_missing: bool = True):
    """Open the expert store named by the config, training the missing experts (Ray, in parallel) if
    ``train_missing``; then check it fits the distillation config.

    Raises:
        ExpertStoreError: store missing (and ``train_missing`` false) or built for another model,
            dataset, ZCA setting, or with too few epochs for T+ + M.
    """
    from .experts import ExpertStore, train_experts

    path = cfg.expert_store()
    if train_missing:
        from .augment import DSA

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
    d = cfg.distill
    store.check_compatible(data.spec, data.train.dataset_id, cfg.data.zca, d.max_start_epoch + d.expert_epochs,
                           data.preprocessor.fingerprint())
    return store


def curriculum_rank(cfg: Config, data: PreparedData) -> torch.Tensor:
    """Difficulty rank of every training sample for curriculum experts (paper App. B), int64 ``[N]``.

    One plain (shuffled-order) ranking expert with seed ``experts.seed - 1`` is trained on the real data;
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
    traj, _ = train_expert(-1, cfg.experts.seed - 1, data.train_x, data.train.labels, data.test_x,
                           data.test.labels, data.spec, cfg.experts, augment=DSA() if cfg.experts.dsa else None,
                           device=cfg.device)
    first = first_correct_epoch(data.spec, list(traj[1:]), data.train_x, data.train.labels, device=cfg.device)
    rank = difficulty_from_first_correct(first)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(rank, tmp)
    os.replace(tmp, path)
    return rank


class Distiller:
    """Synthetic state and one ConTra iteration (Algorithm 1).

    Args:
        cfg: validated config (``cfg.distill`` drives the loop).
        store: expert store (:class:`contra_ray.experts.ExpertStore`), already checked compatible.
        spec: the distillation network.
        train_x, train_y: preprocessed real images float ``[N,C,H,W]`` and labels int64 ``[N]``
            (for initialization only).
        augment: DSA object (``augment(x, seed=...)``) or None.
        expert_ids: experts to sample from (default: all in the store); the correlation analysis
            holds one out.
        fixed_start: match this start epoch instead of a sampled one (see :func:`make_plan`).
    """

    def __init__(self, cfg: Config, store, spec: ModelSpec, train_x: torch.Tensor, train_y: torch.Tensor,
                 augment=None, expert_ids: list[int] | None = None, device: str = "cpu",
                 fixed_start: int | None = None):
        self.cfg, self.d, self.store, self.spec = cfg, cfg.distill, store, spec
        self.device = torch.device(device)
        self.dtype = torch.float64 if self.d.dtype == "float64" else torch.float32
        self.model = build_model(spec).to(self.device, self.dtype)
        self.expert_ids = list(expert_ids if expert_ids is not None else store.expert_ids)
        if not self.expert_ids:
            raise ConfigError("experts: no expert trajectories to distill from")
        self.num_classes = spec.num_classes
        self.n_syn = self.d.ipc * self.num_classes
        self.batch_syn = self.d.batch_syn or self.n_syn
        self.augment = augment
        self.fixed_start = fixed_start
        self.iteration = 0
        self._segment_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._init(train_x, train_y)

    # ------------------------------------------------------------------ state
    def _init(self, train_x: torch.Tensor, train_y: torch.Tensor) -> None:
        d = self.d
        gen = torch.Generator().manual_seed(d.seed)
        init_theta = self.expert_params(self.expert_ids[0], d.max_start_epoch)
        with torch.no_grad():
            logits = torch.cat([functional_forward(self.model, init_theta, x.to(self.device, self.dtype))
                                for x in train_x.split(1000)])
        correct = logits.argmax(1).cpu() == train_y
        chosen = []
        for c in range(self.num_classes):
            pool = torch.nonzero((train_y == c) & (correct if d.init == "real_correct" else True)).flatten()
            if len(pool) < d.ipc:  # too few correctly classified: fall back to any image of the class
                pool = torch.nonzero(train_y == c).flatten()
            chosen.append(pool[torch.randperm(len(pool), generator=gen)[: d.ipc]])
        idx = torch.cat(chosen)
        images = train_x[idx].to(self.device, self.dtype).clone()
        if d.init == "noise":
            images = torch.randn(images.shape, generator=gen, dtype=self.dtype).to(self.device)
        hard = train_y[idx].to(self.device)
        if d.soft_labels:
            label_logits = logits[idx].clone()
        else:
            label_logits = torch.nn.functional.one_hot(hard, self.num_classes).to(self.dtype) * HARD_LABEL_LOGIT
        self.hard_labels = hard
        self.images = images.requires_grad_(True)
        self.label_logits = label_logits.requires_grad_(d.soft_labels)
        self.syn_lr = torch.tensor(d.syn_lr_init, dtype=self.dtype, device=self.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=d.lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=d.lr_lr, momentum=0.5)
        self.opt_label = torch.optim.SGD([self.label_logits], lr=d.lr_label, momentum=0.9) if d.soft_labels else None

    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically: tensors, optimizer states, iteration."""
        return {"iteration": self.iteration, "images": self.images.detach().clone(),
                "label_logits": self.label_logits.detach().clone(), "syn_lr": self.syn_lr.detach().clone(),
                "hard_labels": self.hard_labels.clone(), "opt_img": copy.deepcopy(self.opt_img.state_dict()),
                "opt_lr": copy.deepcopy(self.opt_lr.state_dict()),  # a snapshot, not live momentum buffers
                "opt_label": copy.deepcopy(self.opt_label.state_dict()) if self.opt_label else None}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.label_logits.copy_(state["label_logits"])
            self.syn_lr.copy_(state["syn_lr"])
        self.hard_labels = state["hard_labels"].to(self.device)
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        if self.opt_label is not None:
            self.opt_label.load_state_dict(state["opt_label"])
        self.iteration = int(state["iteration"])

    # ------------------------------------------------------------------ one iteration
    def expert_params(self, expert_id: int, epoch: int) -> torch.Tensor:
        key = (expert_id, epoch)
        if key not in self._segment_cache:  # only the epochs in use are read from the store
            self._segment_cache[key] = self.store.params(expert_id, epoch).to(self.device, self.dtype)
        return self._segment_cache[key]

    def plan(self, iteration: int) -> SegmentPlan:
        d = self.d
        return make_plan(d.seed, iteration, self.expert_ids, self.n_syn, self.batch_syn, d.syn_steps, d.beta,
                         d.K, d.resolved_R(), d.min_start_epoch, d.max_start_epoch, self.fixed_start)

    def _augment_fn(self) -> Callable | None:
        if self.augment is None or not self.d.dsa:
            return None
        return lambda x, seed: self.augment(x, seed=seed)

    def compute_gradients(self, plan: SegmentPlan, students: list[int] | None = None) -> dict[int, float]:
        """Zero the gradients, then accumulate ∂L/∂(images, labels, syn_lr) of the chosen students."""
        for t in (self.images, self.label_logits, self.syn_lr):
            t.grad = torch.zeros_like(t) if t.requires_grad else None
        return accumulate_matching_gradients(
            plan, lambda start, m: (self.expert_params(plan.expert_id, start),
                                    self.expert_params(plan.expert_id, start + m)),
            lambda theta, x: functional_forward(self.model, theta, x), self.images, self.label_logits,
            self.syn_lr, self.d.expert_epochs, self._augment_fn(), students)

    def grad_tensors(self) -> list[torch.Tensor]:
        """The gradients a distributed run all-reduces (same order on every worker)."""
        return [t.grad for t in (self.images, self.label_logits, self.syn_lr) if t.grad is not None]

    def apply_update(self, iteration: int, losses: dict[int, float] | None = None) -> None:
        """One optimizer step on images, labels and syn_lr; stops a diverged run.

        Raises:
            DistillationDiverged: non-finite loss, gradient, images, or syn_lr <= 0 / non-finite.
        """
        for k, v in (losses or {}).items():
            if not torch.isfinite(torch.tensor(v)):
                raise DistillationDiverged(f"iteration {iteration}: matching loss of student {k} is {v}")
        for name, g in (("images", self.images.grad), ("syn_lr", self.syn_lr.grad)):
            if g is not None and not torch.isfinite(g).all():
                raise DistillationDiverged(f"iteration {iteration}: gradient w.r.t. {name} is non-finite")
        self.opt_img.step()
        self.opt_lr.step()
        if self.opt_label is not None:
            self.opt_label.step()
        lr = float(self.syn_lr.detach())
        if not (lr > 0 and lr < float("inf")):
            raise DistillationDiverged(
                f"iteration {iteration}: syn_lr became {lr}; lower distill.lr_lr (now {self.d.lr_lr})")
        if not torch.isfinite(self.images.detach()).all():
            raise DistillationDiverged(f"iteration {iteration}: synthetic images became non-finite; "
                                       f"lower distill.lr_img (now {self.d.lr_img})")
        self.iteration = iteration + 1

    def step(self) -> dict[str, float]:
        """Run iteration ``self.iteration``: plan, all students, update. Returns its metrics."""
        it = self.iteration
        plan = self.plan(it)
        losses = self.compute_gradients(plan)
        self.apply_update(it, losses)
        return self.metrics(plan, losses)

    def metrics(self, plan: SegmentPlan, losses: dict[int, float]) -> dict[str, float]:
        """Total Eq. 8 loss, per-segment losses (``loss/sampled``, ``loss/start_<t>``) and syn_lr."""
        out = {"loss": sum(plan.students[k].weight * v for k, v in losses.items()),
               "syn_lr": float(self.syn_lr.detach())}
        for k, v in losses.items():
            st = plan.students[k]
            out["loss/sampled" if st.role == "sampled" else f"loss/start_{st.start}"] = v
        return out

    def targets(self) -> torch.Tensor:
        return torch.softmax(self.label_logits.detach(), dim=1)

    def to_artifact(self, data: PreparedData, extra_meta: dict | None = None):
        from .artifact import DistilledSet

        meta = {"method": "contra", "iteration": self.iteration, "model_spec": self.spec.to_dict(),
                "dataset_id": data.train.dataset_id, "content_hash": data.train.content_hash,
                "classes": list(data.train.classes), "image_size": data.train.image_size,
                "channels": data.train.channels, "zca": self.cfg.data.zca, "zca_eps": self.cfg.data.zca_eps,
                "preprocessor_fingerprint": data.preprocessor.fingerprint(),
                "eval_recipe": dataclasses.asdict(self.cfg.eval), "config": self.cfg.to_dict(),
                "expert_ids": self.expert_ids, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        meta.update(extra_meta or {})
        return DistilledSet(images=self.images.detach().float().cpu().clone(),
                            label_logits=self.label_logits.detach().float().cpu().clone(),
                            hard_labels=self.hard_labels.cpu().clone(), syn_lr=float(self.syn_lr.detach()),
                            soft=self.d.soft_labels, preprocessor=data.preprocessor.state_dict(), meta=meta)


# ---------------------------------------------------------------------- the loop with I/O

def _save_checkpoint(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run_distillation(cfg: Config, data: PreparedData, store, logger=None, resume: bool = True,
                     progress: bool = True) -> tuple[object, dict[str, list[float]]]:
    """Run ``cfg.distill.iterations`` iterations with a progress bar, periodic evaluation, MLflow metrics
    and (if ``checkpoint_every``) resumable checkpoints in ``<run_dir>/distill_checkpoint.pt``.

    Returns:
        (the :class:`contra_ray.artifact.DistilledSet`, metric history ``{name: [values per iteration]}``).
    """
    from tqdm import tqdm

    from .augment import DSA
    from .evaluate import train_and_test

    d = cfg.distill
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    monitor, expert_ids = None, None
    if d.monitor_every:  # hold τ_o out of distillation; only the monitor reads it
        from .analysis import ForgettingMonitor, reference_expert_id

        ref = reference_expert_id(store, d.reference_expert)
        expert_ids = [i for i in store.expert_ids if i != ref]
        epochs = d.monitor_epochs or list(range(d.min_start_epoch, d.max_start_epoch + 1))
        monitor = ForgettingMonitor(store, ref, epochs, d.expert_epochs, seed=d.seed + 1)
    distiller = Distiller(cfg, store, data.spec, data.train_x, data.train.labels,
                          augment=DSA() if d.dsa else None, expert_ids=expert_ids, device=cfg.device)
    ckpt = cfg.run_dir() / "distill_checkpoint.pt"
    history: dict[str, list[float]] = {}
    if resume and d.checkpoint_every and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        distiller.load_state_dict(state["distiller"])
        history = state["history"]
        print(f"resumed from {ckpt} at iteration {distiller.iteration}", flush=True)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=d.iterations, initial=distiller.iteration, desc="distill", disable=not progress,
               dynamic_ncols=True)
    while distiller.iteration < d.iterations:
        it = distiller.iteration
        m = distiller.step()
        for k, v in m.items():
            history.setdefault(k, []).append(v)
        if logger is not None:
            logger.log_metrics({k.replace("/", "_"): v for k, v in m.items()}, step=it)
        bar.set_postfix(loss=f"{m['loss']:.4f}", syn_lr=f"{m['syn_lr']:.5f}")
        bar.update(1)
        done = distiller.iteration
        if monitor is not None and done % d.monitor_every == 0:
            mon = monitor(distiller)
            for k, v in mon.items():
                history.setdefault(k, []).append(v)
            if logger is not None:
                logger.log_metrics(mon, step=done)
        if d.eval_every and done % d.eval_every == 0 and done < d.iterations:
            accs = [train_and_test(distiller.images.detach().float(), distiller.targets().float(),
                                   float(distiller.syn_lr.detach()), data.spec, cfg.eval, data.test_x,
                                   data.test.labels, seed=10_000 + done + r,
                                   augment=DSA() if cfg.eval.dsa else None, device=cfg.device)
                    for r in range(d.eval_runs_periodic)]
            acc = 100 * sum(accs) / len(accs)
            history.setdefault("eval_acc", []).append(acc)
            bar.write(f"iteration {done}: eval accuracy {acc:.2f}% ({d.eval_runs_periodic} run(s))")
            if logger is not None:
                logger.log_metrics({"eval_acc": acc}, step=done)
        if d.checkpoint_every and done % d.checkpoint_every == 0:
            _save_checkpoint({"distiller": distiller.state_dict(), "history": history}, ckpt)
    bar.close()
    return distiller.to_artifact(data), history


# ---------------------------------------------------------------------- CLI

DISTILL_HELP = {
    "ipc": "images per class (IPC)", "beta": "β: weight of the sampled segment in Eq. 8 (1 - β spread over K)",
    "K": "number of concurrent segments K (0 with β=1: plain MTT)",
    "R": "spacing R of concurrent starts in epochs (default floor((T+ - T-)/K))",
    "syn_steps": "student steps N per segment", "expert_epochs": "expert epochs M per segment",
    "min_start_epoch": "T-: lowest segment start epoch", "max_start_epoch": "T+: sampled start is in [T-, T+)",
    "batch_syn": "synthetic mini-batch size (default: the whole set)", "iterations": "distillation iterations",
    "lr_img": "learning rate of the synthetic pixels", "lr_label": "learning rate of the soft labels",
    "lr_lr": "learning rate of syn_lr", "syn_lr_init": "initial student step size syn_lr",
    "soft_labels": "learn soft labels (DATM)", "init": "image init: real_correct | real | noise",
    "dsa": "DSA augmentation in the student steps", "seed": "run seed (plans are a function of seed, iteration)",
    "eval_every": "evaluate every n iterations (0: only at the end)",
    "eval_runs_periodic": "runs per periodic evaluation", "checkpoint_every": "checkpoint every n iterations",
    "dtype": "float32 | float64",
    "monitor_every": "log the Eq. 2 loss on the held-out reference expert every n iterations (0: off)",
    "monitor_epochs": "comma-separated epochs of the reference expert to monitor (default T-..T+)",
    "reference_expert": "expert id held out of distillation when monitoring (default: the highest id)",
}


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cifar10_ipc1_cpu",
                   help="preset name in contra_ray/presets or a YAML path (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set eval.runs=3 (repeatable)")
    p.add_argument("--name", help="run name (output subdirectory; default from the preset)")
    p.add_argument("--output-dir", help="root of run directories (default: runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<output-dir>/mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def config_from_args(args: argparse.Namespace, extra: dict | None = None) -> Config:
    overrides = list(args.set)
    for key, value in (extra or {}).items():
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.name:
        overrides.append(f"name={args.name}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    return load_config(args.preset, overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m contra_ray.distill", description=__doc__.split("\n")[0])
    add_common_args(p)
    g = p.add_argument_group("distillation (override the preset; see paper Table 5)")
    for f in dataclasses.fields(DistillConfig):
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f"distill.{f.name}", default=None,
                       help=DISTILL_HELP.get(f.name, f.name))
    p.add_argument("--experts", help="expert store directory (default: <run dir>/experts)")
    p.add_argument("--no-train-experts", action="store_true",
                   help="fail instead of training missing experts")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--num-workers", type=int, default=0,
                   help="Ray Train workers sharing the students (0: run in this process)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        extra = {k: v for k, v in vars(args).items() if k.startswith("distill.")}
        if args.experts:
            extra["experts.store"] = args.experts
        cfg = config_from_args(args, extra)
        from .tracking import check_destinations  # output dir writable, tracking store reachable: before any work
        check_destinations(cfg.output_dir, cfg.tracking_uri() if cfg.tracking.enabled else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.num_workers > 0:
        from .distributed import run_distributed

        if cfg.distill.monitor_every:
            print(f"error: distill.monitor_every={cfg.distill.monitor_every}: the forgetting monitor runs "
                  "in-process only; use --num-workers 0", file=sys.stderr)
            return 2

        return run_distributed(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu,
                               resume=not args.no_resume)
    from .tracking import RunLogger, init_tracking

    try:
        data = prepare_data(cfg)
        store = ensure_experts(cfg, data, train_missing=not args.no_train_experts)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.tracking.enabled:
        init_tracking(cfg.tracking_uri(), cfg.tracking.experiment)
    with RunLogger(cfg, f"{cfg.name}-distill", enabled=cfg.tracking.enabled) as logger:
        artifact, history = run_distillation(cfg, data, store, logger, resume=not args.no_resume)
        out = cfg.run_dir() / "distilled.safetensors"
        artifact.save(out)
        logger.log_artifact(str(out))
        log_set_visuals(cfg, artifact, history, data.preprocessor, logger)
    print(f"distilled set: {out}  (syn_lr {artifact.syn_lr:.5f})")
    return 0


def log_set_visuals(cfg: Config, artifact, history: dict, preprocessor, logger) -> None:
    """Image grid PNG and loss / syn_lr curves next to the artifact, and in MLflow."""
    from .tracking import save_curves, save_image_grid

    grid = cfg.run_dir() / "distilled_grid.png"
    save_image_grid(preprocessor.to_display(artifact.images), nrow=max(1, cfg.distill.ipc) if cfg.distill.ipc > 1
                    else len(artifact.images), path=str(grid))
    curves = cfg.run_dir() / "distill_curves.png"
    save_curves({k: v for k, v in history.items() if k.startswith("loss") or k == "syn_lr"}, str(curves),
                title=f"{cfg.name}: matching loss and syn_lr")
    logger.log_artifact(str(grid))
    logger.log_artifact(str(curves))


if __name__ == "__main__":
    sys.exit(main())
