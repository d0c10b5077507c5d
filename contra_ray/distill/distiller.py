"""The core of distillation: the synthetic state and one ConTra iteration (Algorithm 1). No Ray, no MLflow.

:class:`Distiller` holds the synthetic images ``[n,C,H,W]``, the soft-label logits ``[n,C]``, the student
step size syn_lr and their optimizers. Initialization follows DATM: images are real images the expert
classifies correctly, soft labels are that expert's logits (learned afterwards); optimizers follow MTT
(SGD, momentum 0.5 for images and syn_lr) and DATM (momentum 0.9 for labels). The loop around it (progress,
evaluation, checkpoints, gradient synchronisation) is :func:`contra_ray.distill.loop.run_loop`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch

from contra_ray.common.seeds import derive_seed
from contra_ray.config import Config, ConfigError
from contra_ray.data.disk_images import is_lazy
from contra_ray.data.prepare import PreparedData
from contra_ray.distill.artifact import DistilledSet, build_meta
from contra_ray.distill.matching import SegmentPlan, accumulate_matching_gradients, make_plan
from contra_ray.distill.memory import plan_unroll_memory, students_per_worker
from contra_ray.experts.store import ExpertStore
from contra_ray.models import ModelSpec, build_model, functional_forward

__all__ = ["Distiller", "DistillationDiverged", "InitReport", "HARD_LABEL_LOGIT", "class_consistent_logits"]

HARD_LABEL_LOGIT = 100.0  # hard labels as fixed logits: softmax(100 * one_hot) equals one_hot in float32


class DistillationDiverged(RuntimeError):
    """The matching loss, the synthetic images or syn_lr became non-finite (or syn_lr <= 0)."""


@dataclasses.dataclass(frozen=True)
class InitReport:
    """How the synthetic set was initialized (kept in the artifact's meta as ``init``).

    Attributes:
        misclassified_per_class: ``{class index: number of the IPC initial images of that class the
            initializing expert misclassifies}``; only classes with at least one. With
            ``distill.init=real_correct`` these are the classes with fewer than IPC correctly classified
            real images, which fell back to misclassified ones.
        relabeled: how many soft labels had their true-class logit swapped with the largest one, so that
            every soft label's argmax is its image's class (0 with hard labels).
    """

    misclassified_per_class: dict[int, int]
    relabeled: int

    def line(self, classes: list[str] | None = None, ipc: int | None = None) -> str | None:
        """One line for the user, or None when every initial image is correctly classified."""
        if not self.misclassified_per_class:
            return None
        name = (lambda c: f"{c} ({classes[c]})") if classes else str  # noqa: E731
        per = ", ".join(f"class {name(c)}: {k}" for c, k in sorted(self.misclassified_per_class.items()))
        return (f"synthetic init: {sum(self.misclassified_per_class.values())} of the initial images are "
                f"misclassified by the initializing expert{f' (fewer than IPC={ipc} correct)' if ipc else ''}: "
                f"{per}; {self.relabeled} soft label(s) relabeled so that argmax = the image's class")


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
        workers: workers sharing each iteration's students (Ray Train W); sizes the memory plan of
            batched students.
        available_bytes: memory budget for the planner (default: measured free memory).

    Attributes:
        memory_plan: :class:`contra_ray.distill.memory.MemoryPlan`; ``memory_plan.mode`` is the unroll used
            (``distill.unroll_memory``, ``auto`` resolved by measuring one student step).
        init_report: :class:`InitReport`.

    Raises:
        ConfigError: no experts, or the unroll does not fit in memory (both numbers, see
            :func:`contra_ray.distill.memory.plan_unroll_memory`).
    """

    def __init__(self, cfg: Config, store: ExpertStore, spec: ModelSpec, train_x: torch.Tensor, train_y: torch.Tensor,
                 augment: Callable[..., torch.Tensor] | None = None, expert_ids: list[int] | None = None,
                 device: str = "cpu",
                 fixed_start: int | None = None, workers: int = 1, available_bytes: int | None = None):
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

        self.memory_plan = plan_unroll_memory(
            lambda theta, x: functional_forward(self.model, theta, x),
            self.expert_params(self.expert_ids[0], self.d.min_start_epoch), self.images.detach(),
            self.label_logits.detach(), self.batch_syn, self.d.syn_steps, students_per_worker(cfg, workers),
            self._augment_fn(), self.d.unroll_memory, available_bytes)

    # ------------------------------------------------------------------ state
    def _init(self, train_x: torch.Tensor, train_y: torch.Tensor) -> None:
        """DATM initialization: ``ipc`` real images per class, soft labels = the expert's logits.

        The expert is the first of ``expert_ids`` at epoch T+ (DATM ``max_start_epoch``). With
        ``init=real_correct`` the images of class c are drawn from those the expert classifies correctly;
        when a class has fewer than IPC of them, the rest are drawn from its misclassified images (counted
        in :attr:`init_report`). A soft label must never point at another class: for every initial image
        whose logits' argmax is not its class, the true-class logit and the largest logit are swapped.
        """
        d = self.d
        gen = torch.Generator().manual_seed(derive_seed(d.seed, "synthetic_init"))
        init_theta = self.expert_params(self.expert_ids[0], d.max_start_epoch)
        with torch.no_grad():
            logits = torch.cat([functional_forward(self.model, init_theta, x.to(self.device, self.dtype))
                                for x in train_x.split(1000)])
        correct = logits.argmax(1).cpu() == train_y
        chosen = []
        for c in range(self.num_classes):
            of_c = train_y == c
            if d.init == "real_correct":  # correct ones first, misclassified ones only to fill up
                good, bad = torch.nonzero(of_c & correct).flatten(), torch.nonzero(of_c & ~correct).flatten()
                pick = good[torch.randperm(len(good), generator=gen)[: d.ipc]]
                if len(pick) < d.ipc:
                    pick = torch.cat([pick, bad[torch.randperm(len(bad), generator=gen)[: d.ipc - len(pick)]]])
            else:
                pool = torch.nonzero(of_c).flatten()
                pick = pool[torch.randperm(len(pool), generator=gen)[: d.ipc]]
            chosen.append(pick)
        idx = torch.cat(chosen)
        images = train_x[idx].to(self.device, self.dtype).clone()
        if d.init == "noise":
            images = torch.randn(images.shape, generator=gen, dtype=self.dtype).to(self.device)
        hard = train_y[idx].to(self.device)
        wrong = ~correct[idx]
        misclassified = {int(c): int(k) for c, k in zip(*torch.unique(train_y[idx][wrong], return_counts=True))}
        if d.soft_labels:
            label_logits, relabeled = class_consistent_logits(logits[idx], hard)
        else:
            label_logits = torch.nn.functional.one_hot(hard, self.num_classes).to(self.dtype) * HARD_LABEL_LOGIT
            relabeled = 0
        self.init_report = InitReport(misclassified, relabeled)
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
                "opt_label": copy.deepcopy(self.opt_label.state_dict()) if self.opt_label else None,
                "init": dataclasses.asdict(self.init_report)}

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
        if "init" in state:
            self.init_report = InitReport(**state["init"])

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
            self.syn_lr, self.d.expert_epochs, self._augment_fn(), students,
            unroll_memory=self.memory_plan.mode, student_execution=self.d.student_execution)

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
        if not torch.isfinite(self.label_logits.detach()).all():
            raise DistillationDiverged(f"iteration {iteration}: soft-label logits became non-finite; "
                                       f"lower distill.lr_label (now {self.d.lr_label})")
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

    def to_artifact(self, preprocessor, train_set, extra_meta: dict | None = None):
        """The current synthetic set as a :class:`~contra_ray.distill.artifact.DistilledSet` (float32, CPU).

        Args:
            preprocessor: the fitted ``data.Preprocessor`` the images live in.
            train_set: the train ``data.ImageSet`` (class names, dataset id and hash).
            extra_meta: more JSON-serializable meta entries.
        """

        meta = build_meta(self.cfg, self.spec, preprocessor, train_set, iteration=self.iteration,
                          method="contra" if self.d.K > 0 else "mtt",
                          extra={"expert_ids": list(self.expert_ids),
                                 "init": dataclasses.asdict(self.init_report), **(extra_meta or {})})
        return DistilledSet(images=self.images.detach().float().cpu().clone(),
                            label_logits=self.label_logits.detach().float().cpu().clone(),
                            hard_labels=self.hard_labels.cpu().clone(), syn_lr=float(self.syn_lr.detach()),
                            soft=self.d.soft_labels, preprocessor=preprocessor.state_dict(), meta=meta)


def class_consistent_logits(logits: torch.Tensor, hard: torch.Tensor) -> tuple[torch.Tensor, int]:
    """DATM's soft-label initialization from a teacher's logits: a copy of ``logits`` in which every row whose
    argmax is not its class ``hard[i]`` has its true-class logit and its largest logit swapped, so that every
    soft label's argmax is its image's class (the rule :class:`Distiller` initializes ``label_logits`` with).

    Args:
        logits: float ``[n, num_classes]`` teacher logits.
        hard: int64 ``[n]`` classes in ``[0, num_classes)``, on the device of ``logits``.

    Returns:
        ``(logits' [n, num_classes], number of rows swapped)``.
    """
    out = logits.clone()
    rows = torch.nonzero(out.argmax(1) != hard).flatten()
    top = out[rows].argmax(1)
    true_logit, top_logit = out[rows, hard[rows]].clone(), out[rows, top].clone()
    out[rows, hard[rows]], out[rows, top] = top_logit, true_logit
    return out, len(rows)


def init_pool(cfg: Config, data: PreparedData, per_class: int | None = None) -> tuple:
    """The real images the synthetic set is initialized from: ``(x, labels)`` for ``Distiller``.

    In memory: the whole train set (``data.train_x``, ``data.train.labels``), as before. Streamed: a
    per-class sample of ``per_class`` images (default ``max(4 * distill.ipc, 10)``; all of a smaller class)
    drawn by a generator seeded ``derive_seed(distill.seed, "init_pool")``, as a lazy view, so the
    initializing expert's logits are ``[C * per_class, C]`` instead of ``[N, C]`` (5 GB for ImageNet-1K).

    Returns:
        ``(x, y)``: float32 images ``[n, C, H, W]`` (or a lazy view) and int64 labels ``[n]``.
    """
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
