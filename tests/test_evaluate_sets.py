"""evaluate_sets: the one sets × models evaluation of the pipeline, the evaluate CLI and Tune trials."""

import dataclasses

import torch
import torch.nn.functional as F

from contra_ray.config import EvalConfig
from contra_ray.evaluate.sets import METHOD_LABELS, EvalSet, evaluate_sets, format_table, summary_by_metric
from contra_ray.evaluate.training import evaluation_seeds, summarize, train_and_test
from contra_ray.models import ModelSpec

SPEC = ModelSpec("convnet", num_classes=2, image_size=8, channels=1, width=8, depth=2)
ECFG = EvalConfig(epochs=2, batch_size=8, dsa=False, test_batch_size=32, runs=2, seed=5)


def toy(n_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n_per_class)
    x = 0.3 * torch.randn(2 * n_per_class, 1, 8, 8, generator=g)
    half = torch.ones(8, 8)
    half[:, 4:] = -1
    return x + (1 - 2 * y.float()).view(-1, 1, 1, 1) * half, y


def test_rows_are_sets_outer_models_inner_with_the_seeded_runs_of_train_and_test():
    x, y = toy(4, 0)
    tx, ty = toy(20, 1)
    onehot = F.one_hot(y, 2).float()
    sets = [EvalSet("random_real", x, onehot, 0.01), EvalSet("contra", x, onehot * 0.9, 0.02)]
    rows, accs = evaluate_sets(sets, ["convnet", "alexnet"], SPEC, ECFG, tx, ty, ipc=4, use_ray=False)
    assert [(r["method"], r["model"]) for r in rows] == [("random_real", "convnet"), ("random_real", "alexnet"),
                                                         ("contra", "convnet"), ("contra", "alexnet")]
    seeds = evaluation_seeds(ECFG.seed, ECFG.runs)
    for s in sets:  # the same seeds for every set and model, each set with its own lr (eval.lr unset)
        for model in ("convnet", "alexnet"):
            spec = SPEC.for_network(model)
            want = [train_and_test(s.images, s.targets, s.lr, spec, ECFG, tx, ty, seed) for seed in seeds]
            assert accs[(s.method, model)] == want
            row = next(r for r in rows if (r["method"], r["model"]) == (s.method, model))
            assert (row["mean"], row["std"]) == summarize(want) and row["runs"] == 2 and row["ipc"] == 4
            assert row["norm"] == spec.norm
    summary = summary_by_metric(rows)
    assert set(summary) == {"final_acc", "random_real_acc"} and set(summary["final_acc"]) == {"convnet", "alexnet"}


def test_eval_lr_overrides_every_sets_own_lr():
    x, y = toy(4, 0)
    tx, ty = toy(20, 1)
    ecfg = dataclasses.replace(ECFG, lr=0.03, runs=1)
    onehot = F.one_hot(y, 2).float()
    _, accs = evaluate_sets([EvalSet("mtt", x, onehot, 123.0)], ["convnet"], SPEC, ecfg, tx, ty, ipc=4, use_ray=False)
    seed = evaluation_seeds(ecfg.seed, 1)[0]
    assert accs[("mtt", "convnet")] == [train_and_test(x, onehot, 0.03, SPEC, ecfg, tx, ty, seed)]


def test_tables_print_the_method_labels():
    rows = [{"method": m, "model": "convnet", "ipc": 1, "runs": 1, "mean": 1.0, "std": 0.0} for m in METHOD_LABELS]
    printed = [line.split("convnet")[0].strip() for line in format_table(rows).splitlines()[2:]]
    assert printed == ["ConTra", "MTT", "random real"]
