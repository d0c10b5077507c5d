"""``evaluate --protocol dd-ranking``: a distilled set judged by DD-Ranking's fair protocol (Li et al., 2025).

With the same network, evaluation seeds and recipe on every side (:func:`contra_ray.evaluate.sets.evaluate_sets`)
it trains fresh networks on

* the synthetic set with hard labels (``hard_labels``) and with its own labels (:meth:`DistilledSet.targets`,
  the learned soft labels), the latter with and without DSA;
* ``ipc`` random real train images per class (:func:`contra_ray.evaluate.training.random_real_set`, seed
  ``derive_seed(eval.seed, "baseline")`` as the random-real baseline) with hard labels and with the set's own
  label recipe: soft labels from the same teacher the set's soft labels were initialized from
  (:meth:`contra_ray.distill.distiller.Distiller._init`: expert ``meta["expert_ids"][0]`` at epoch
  ``distill.max_start_epoch`` of the expert store in the set's config, logits made class-consistent by
  :func:`contra_ray.distill.distiller.class_consistent_logits`), with and without DSA;

and takes Acc(real, hard), the full-data figure, from the expert store's index (the experts' final test
accuracy, mean over experts; not retrained). HLR, IOR, LRS and ARS follow :mod:`contra_ray.evaluate.ddranking`.
Random real images train at ``eval.lr`` else ``experts.lr`` (as ``--baseline random-real``), the synthetic
set at ``eval.lr`` else its learned syn_lr. The hard-label accuracies and IOR use the recipe's DSA setting
(``eval.dsa``); DD-Ranking's own evaluator trains hard labels without augmentation by default
(``use_aug_for_hard=False``), here both label kinds share the recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from contra_ray.common import storage
from contra_ray.common.seeds import derive_seed
from contra_ray.config import Config, ConfigError
from contra_ray.distill.artifact import DistilledSet
from contra_ray.distill.distiller import class_consistent_logits
from contra_ray.evaluate.ddranking import Scores, dd_ranking_scores
from contra_ray.evaluate.sets import EvalSet, evaluate_sets
from contra_ray.evaluate.training import random_real_set, summarize
from contra_ray.experts.store import ExpertStore, ExpertStoreError
from contra_ray.models import ModelSpec, build_model, functional_forward

__all__ = ["ACCURACIES", "FairResult", "format_fair_table", "fair_metrics", "full_data_accuracy",
           "open_teacher_store", "run_fair_protocol", "teacher_logits"]

#: the trained accuracies: key -> (set, labels, DSA: True on, False off, None the recipe's eval.dsa)
ACCURACIES = {
    "syn_hard": ("syn", "hard", None),
    "syn_own_dsa": ("syn", "own", True),
    "syn_own_nodsa": ("syn", "own", False),
    "random_own_dsa": ("random", "own", True),
    "random_own_nodsa": ("random", "own", False),
    "random_hard": ("random", "hard", None),
}


def open_teacher_store(art: DistilledSet, cfg: Config) -> ExpertStore:
    """The expert store the set was distilled from (``cfg.expert_store_location()``, fetched when a URI),
    checked to hold the set's network and the teacher's epoch ``distill.max_start_epoch``.

    Raises:
        ConfigError: the store is missing, unreadable or does not fit the set; the message names
            ``experts.store`` and its location.
    """
    location = cfg.expert_store_location()
    why = ("--protocol dd-ranking needs the expert store the set was distilled from (its soft labels' teacher "
           "and the experts' full-data test accuracy)")
    try:
        with storage.pulled(location, "the expert store") as path:
            store = ExpertStore.open(path)
        d = cfg.distill
        store.check_compatible(art.model_spec(), art.meta.get("dataset_id"), bool(art.meta.get("zca")),
                               d.max_start_epoch, art.meta.get("preprocessor_fingerprint"),
                               needed_by="distill.max_start_epoch (the soft labels' teacher)")
    except (ExpertStoreError, storage.StorageError) as e:
        raise ConfigError(f"experts.store={location!r}: {why}; it is unavailable: {e} (pass the store with "
                          "--experts PATH_OR_URI)") from None
    return store


def full_data_accuracy(store: ExpertStore) -> tuple[float, int]:
    """Acc(real, hard): the mean final test accuracy (last ``test_acc`` of ``index.parquet``) of the store's
    experts, a fraction in [0, 1], and how many experts it averages (those whose final accuracy is not NaN).

    Raises:
        ConfigError: no expert has a final test accuracy.
    """
    finals = [float(acc[-1]) for acc in store.index["test_acc"] if len(acc) and acc[-1] == acc[-1]]
    if not finals:
        raise ConfigError(f"experts.store={str(store.path)!r}: no expert has a final test accuracy in "
                          "index.parquet, which --protocol dd-ranking reports as Acc(real, hard)")
    return sum(finals) / len(finals), len(finals)


def teacher_logits(params: torch.Tensor, spec: ModelSpec, images: torch.Tensor, hard: torch.Tensor,
                   dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """The soft-label logits a teacher gives ``images``, as the distiller initializes a set's labels: the
    network ``spec`` with flat parameters ``params`` (``functional_forward`` in batches of 1000, in ``dtype``),
    then :func:`class_consistent_logits` with classes ``hard``.

    Args:
        params: float ``[P]`` flat parameters (``ExpertStore.params(expert, epoch)``).
        images: float ``[n, C, H, W]`` in the model's input space; hard: int64 ``[n]``.

    Returns:
        float32 ``[n, num_classes]`` logits on the CPU (targets are their softmax).
    """
    model = build_model(spec).to(device, dtype)
    theta = params.to(device, dtype)
    with torch.no_grad():
        logits = torch.cat([functional_forward(model, theta, x.to(device, dtype)) for x in images.split(1000)])
    return class_consistent_logits(logits, hard.to(device))[0].float().cpu()


@dataclasses.dataclass
class FairResult:
    """What :func:`run_fair_protocol` measured.

    Attributes:
        accs: ``{key of ACCURACIES: [accuracy of run r]}``, fractions.
        real_hard: Acc(real, hard), a fraction; real_experts: how many experts it averages.
        scores: :class:`~contra_ray.evaluate.ddranking.Scores`.
        model, runs, epochs, recipe_dsa, soft: the network, runs, epochs, eval.dsa, whether the set's own
            labels are soft.
        teacher: ``(expert id, epoch)`` of the soft labels' teacher, None for a hard-label set.
        store: the expert store's location.
    """

    accs: dict[str, list[float]]
    real_hard: float
    real_experts: int
    scores: Scores
    model: str
    runs: int
    epochs: int
    recipe_dsa: bool
    soft: bool
    teacher: tuple[int, int] | None
    store: str


def run_fair_protocol(art: DistilledSet, cfg: Config, store: ExpertStore, train: Any, pre: Any,
                      test_x: torch.Tensor, test_y: torch.Tensor, *, model: str, device: str = "cpu",
                      threads: int = 0, use_ray: bool = True) -> FairResult:
    """Train and test every accuracy of :data:`ACCURACIES` on ``model`` (``cfg.eval``: runs, epochs, seeds)
    and score them (module docstring).

    Args:
        store: :func:`open_teacher_store`; train: the train ``data.ImageSet`` (uint8 images, int64 labels);
        pre: the set's ``data.Preprocessor``; test_x, test_y: preprocessed test images, labels.

    Raises:
        ConfigError: no final expert accuracy (:func:`full_data_accuracy`), or the teacher expert is not in
            the store.
    """
    ecfg = cfg.eval
    real_hard, n_experts = full_data_accuracy(store)
    spec = art.model_spec()
    bx, by = random_real_set(pre(train.images), train.labels, art.ipc, art.num_classes,
                             derive_seed(ecfg.seed, "baseline"))
    sets = {("syn", "hard"): EvalSet("syn_hard", art.images, F.one_hot(art.hard_labels, art.num_classes).float(),
                                     art.syn_lr),
            ("random", "hard"): EvalSet("random_hard", bx, by, cfg.experts.lr)}
    teacher = None
    if art.soft:
        teacher = (int((art.meta.get("expert_ids") or store.expert_ids)[0]), int(cfg.distill.max_start_epoch))
        try:
            params = store.params(*teacher)
        except ExpertStoreError as e:
            raise ConfigError(f"experts.store={str(store.path)!r}: the soft labels' teacher: {e}") from None
        dtype = torch.float64 if cfg.distill.dtype == "float64" else torch.float32
        soft = F.softmax(teacher_logits(params, spec, bx, by.argmax(1), dtype), dim=1)
        sets[("syn", "own")] = EvalSet("syn_own", art.images, art.targets(), art.syn_lr)
        sets[("random", "own")] = EvalSet("random_own", bx, soft, cfg.experts.lr)
    else:  # a hard-label set: its own labels are the hard ones
        sets[("syn", "own")], sets[("random", "own")] = sets[("syn", "hard")], sets[("random", "hard")]

    accs: dict[str, list[float]] = {}
    done: dict[tuple[str, bool], list[float]] = {}
    for dsa in (True, False):
        todo = {k: (sets[(s, lab)], dsa) for k, (s, lab, d) in ACCURACIES.items()
                if (ecfg.dsa if d is None else d) == dsa}
        fresh = list({id(es): es for es, _ in todo.values() if (es.method, dsa) not in done}.values())
        if fresh:
            _, got = evaluate_sets(fresh, [model], spec, dataclasses.replace(ecfg, dsa=dsa), test_x, test_y,
                                   ipc=art.ipc, device=device, threads=threads, use_ray=use_ray)
            done.update({(m, dsa): a for (m, _), a in got.items()})
        accs.update({k: done[(es.method, d)] for k, (es, d) in todo.items()})
    recipe = "dsa" if ecfg.dsa else "nodsa"
    scores = dd_ranking_scores(real_hard, accs["syn_hard"], accs[f"syn_own_{recipe}"], accs[f"random_own_{recipe}"],
                               accs["syn_own_dsa"], accs["random_own_dsa"], accs["syn_own_nodsa"],
                               accs["random_own_nodsa"])
    return FairResult(accs, real_hard, n_experts, scores, model, ecfg.runs, ecfg.epochs, ecfg.dsa, art.soft,
                      teacher, str(store.path))


def _row_name(key: str, soft: bool) -> tuple[str, str]:
    """``(printed name, DSA column: "on", "off" or "" for the recipe's)`` of an :data:`ACCURACIES` key."""
    which, labels, dsa = ACCURACIES[key]
    if labels == "own":
        labels = ("own labels" if which == "syn" else "teacher") if soft else "hard = own"
    return f"Acc({which}, {labels})", "" if dsa is None else ("on" if dsa else "off")


def format_fair_table(r: FairResult) -> str:
    """The accuracies (percent, mean ± population std over runs) and HLR, IOR, LRS, ARS (fractions, mean ±
    std over runs) with their weights, one per line, as ``evaluate --protocol dd-ranking`` prints them."""
    recipe = "on" if r.recipe_dsa else "off"
    teacher = (f"expert {r.teacher[0]} at epoch {r.teacher[1]}" if r.teacher else "none (hard-label set)")
    lines = [f"dd-ranking protocol: {r.model}, {r.runs} run(s) x {r.epochs} epochs per accuracy, same seeds on "
             f"every side; recipe DSA {recipe}; soft labels' teacher: {teacher} of {r.store}",
             f"{'accuracy':<24} {'DSA':<4} {'acc (%)':>15}"]
    for key in ACCURACIES:
        name, dsa = _row_name(key, r.soft)
        mean, std = summarize(r.accs[key])
        lines.append(f"{name:<24} {dsa or recipe:<4} {mean:>7.2f} ± {std:5.2f}")
    lines.append(f"{'Acc(real, hard)':<24} {'':<4} {100 * r.real_hard:>7.2f}          full data: the experts' "
                 f"final test accuracy, mean of {r.real_experts} (not retrained)")
    s = r.scores.summary()
    own = "own labels" if r.soft else "hard"
    rows = [("HLR", "hlr", "Acc(real, hard) - Acc(syn, hard)"),
            ("IOR", "ior", f"Acc(syn, {own}) - Acc(random, {'teacher' if r.soft else 'hard'}), DSA {recipe}"),
            ("LRS", "lrs", f"w = {r.scores.weight:g}: (e^a - e^-1)/(e - e^-1), a = w*IOR - (1-w)*HLR"),
            ("ARS with aug", "ars_with_aug", "syn - random, DSA on"),
            ("ARS without aug", "ars_without_aug", "syn - random, DSA off"),
            ("ARS", "ars", f"gamma = {r.scores.gamma:g}: (e^b - e^-1)/(e - e^-1), b = gamma*with + (1-gamma)*without")]
    lines.append(f"{'score':<24} {'':<4} {'value':>15}")
    for label, key, what in rows:
        mean, std = s[key]
        lines.append(f"{label:<24} {'':<4} {mean:>7.4f} ± {std:.4f}  {what}")
    return "\n".join(lines)


def fair_metrics(r: FairResult) -> dict[str, float]:
    """MLflow metrics: ``ddr_acc/<key>`` and ``ddr_acc_std/<key>`` (percent) for :data:`ACCURACIES` and
    ``ddr_acc/real_hard``; ``ddr/<score>`` and ``ddr_std/<score>`` (fractions) for hlr, ior, lrs,
    ars_with_aug, ars_without_aug, ars; ``ddr/lrs_weight``, ``ddr/ars_gamma``."""
    out: dict[str, float] = {}
    for key, accs in r.accs.items():
        out[f"ddr_acc/{key}"], out[f"ddr_acc_std/{key}"] = summarize(accs)
    out["ddr_acc/real_hard"] = 100 * r.real_hard
    for key, (mean, std) in r.scores.summary().items():
        out[f"ddr/{key}"], out[f"ddr_std/{key}"] = mean, std
    out["ddr/lrs_weight"], out["ddr/ars_gamma"] = r.scores.weight, r.scores.gamma
    return out
