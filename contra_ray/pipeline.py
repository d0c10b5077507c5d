"""The main job: expert trajectories -> ConTra distillation -> evaluation against random real images.

``python -m contra_ray.pipeline --preset cifar10_ipc1_cpu``

Stages (each reusable on its own: ``contra_ray.distill``, ``contra_ray.evaluate``):
1. data: train split (class-balanced subset), test split, mean/std + ZCA preprocessor (cached);
2. experts: ``experts.num_experts`` trajectories trained in parallel as Ray tasks (skipped if stored);
3. distillation: ``distill.iterations`` ConTra iterations (resumes from its checkpoint; ``--no-resume``
   starts over; a changed result field is refused before any work, exit 2, and so is one that would
   replace a finished run's set and ``results.json``, with or without a checkpoint);
4. evaluation: ``eval.runs`` fresh networks per model on the distilled set, and on a random real subset
   of the same IPC (hard labels, lr = experts.lr), as Ray tasks; prints the table and writes
   ``<run dir>/results.json``. Everything is one MLflow run, in the vocabulary of
   :data:`contra_ray.tracking.METRICS`: ``final_acc``/``final_acc_std`` (the distilled set on the main
   model), ``final_acc/<model>``, ``random_real_acc``/``random_real_acc/<model>`` (the baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from contra_ray.common.cli import add_common_args, cli_entry, cli_error, config_from_args
from contra_ray.common.fileio import atomic_write
from contra_ray.common.seeds import derive_seed
from contra_ray.config import ConfigError, check_device
from contra_ray.data.prepare import prepare_data
from contra_ray.distill.cli import precheck_resume, run_in_run_dir
from contra_ray.distill.distiller import DistillationDiverged
from contra_ray.distill.loop import run_distillation
from contra_ray.distill.memory import check_memory
from contra_ray.evaluate.sets import EvalSet, evaluate_sets, format_table, summary_by_metric
from contra_ray.evaluate.training import random_real_set
from contra_ray.experts.remote import ensure_experts
from contra_ray.experts.store import ExpertStoreError
from contra_ray.plots import log_results, log_set_visuals
from contra_ray.tracking import RunLogger, accuracy_metrics, check_destinations, init_tracking, main_model

# readable names of data.dataset for the results table's title
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar10-jpeg": "CIFAR-10", "cifar100": "CIFAR-100",
                  "tiny-imagenet": "Tiny ImageNet", "imagenet": "ImageNet-1K", "imagefolder": "ImageFolder"}


def evaluation_title(cfg, num_test: int) -> str:
    """The results table's title, named by the data set it was evaluated on, e.g. ``"Tiny ImageNet
    evaluation on 10000 test images"`` (``"ImageNet-1K (64 px) ..."``: resized ImageNet sets give their
    resolution)."""
    from contra_ray.data.imagenet import effective_resolution

    label = DATASET_LABELS.get(cfg.data.dataset, cfg.data.dataset)
    res = effective_resolution(cfg.data) if cfg.data.dataset in ("tiny-imagenet", "imagenet") else None
    if res is not None:
        label += f" ({res} px)"
    return f"{label} evaluation on {num_test} test images"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m contra_ray.pipeline", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--skip-baseline", action="store_true", help="do not evaluate the random-real baseline")
    p.add_argument("--note", default=None, help="description of the MLflow run (tag mlflow.note.content)")
    p.add_argument("--no-resume", action="store_true",
                   help="start the distillation over instead of resuming from the run's checkpoint")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if not args.no_resume:
            precheck_resume(cfg, distributed=False)
        check_device(cfg.device)  # distillation runs in this process
        check_destinations(cfg.output_dir, cfg.tracking_uri() if cfg.tracking.enabled else None,
                           cache_dir=cfg.data.cache_dir)
    except ConfigError as e:
        return cli_error(e)
    return run_in_run_dir(cfg, lambda: run_pipeline(cfg, baseline=not args.skip_baseline, note=args.note,
                                                    resume=not args.no_resume))


def run_pipeline(cfg, baseline: bool = True, note: str | None = None, resume: bool = True) -> int:
    import torch


    t_start = time.time()
    timings: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        timings[name] = time.time() - t0
        print(f"[{name}] done in {timings[name]:.0f} s", flush=True)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    try:
        data = prepare_data(cfg)
        plan = check_memory(cfg, data)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return cli_error(e)
    stage("data", t0)
    print(f"train {len(data.train_x)} images ({data.train.dataset_id}), test {len(data.test_x)}, "
          f"ZCA {'on' if cfg.data.zca else 'off'}", flush=True)
    if cfg.tracking.enabled:
        init_tracking(cfg.tracking_uri(), cfg.tracking.experiment)
    with RunLogger(cfg, f"{cfg.name}-pipeline", enabled=cfg.tracking.enabled, note=note) as logger:
        t0 = time.time()
        try:
            store = ensure_experts(cfg, data, on_trained=logger.log_expert)  # a child run per trained expert
        except (ConfigError, ExpertStoreError) as e:
            return cli_error(e)
        stage("experts", t0)
        t0 = time.time()
        try:
            artifact, history = run_distillation(cfg, data, store, logger, resume=resume, announced_mode=plan.mode)
        except DistillationDiverged as e:
            return cli_error(f"{type(e).__name__}: {e}", 1)
        out = cfg.run_dir() / "distilled.safetensors"
        artifact.save(out)
        logger.log_artifact(str(out))
        log_set_visuals(cfg, artifact, history, data.preprocessor, logger)
        stage("distill", t0)

        t0 = time.time()
        e = cfg.eval
        sets = [EvalSet("contra" if cfg.distill.K else "mtt", artifact.images, artifact.targets(), artifact.syn_lr)]
        if baseline:
            imgs, tg = random_real_set(data.train_x, data.train.labels, cfg.distill.ipc, data.spec.num_classes,
                                       seed=derive_seed(e.seed, "baseline"))
            sets.insert(0, EvalSet("random_real", imgs, tg, cfg.experts.lr))
        rows, accs = evaluate_sets(sets, e.models, data.spec, e, data.test_x, data.test.labels, ipc=cfg.distill.ipc,
                                   device=cfg.device)
        results = {f"{r['method']}/{r['model']}": {"accs": accs[(r["method"], r["model"])], "mean": r["mean"],
                                                     "std": r["std"]} for r in rows}
        summary = summary_by_metric(rows)
        main = main_model(cfg)
        logger.log_metrics({**accuracy_metrics(summary.get("final_acc", {}), main),
                            **accuracy_metrics(summary.get("random_real_acc", {}), main, "random_real_acc"),
                            "total_minutes": (time.time() - t_start) / 60}, step=cfg.distill.iterations)
        stage("evaluate", t0)
        table = format_table(rows)
        total = time.time() - t_start
        print(f"\n{cfg.name}: {evaluation_title(cfg, len(data.test_x))} "
              f"(K={cfg.distill.K}, β={cfg.distill.beta}, N={cfg.distill.syn_steps}, "
              f"{cfg.distill.iterations} iterations)\n{table}\ntotal {total / 60:.1f} min "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})", flush=True)
        res_path = atomic_write(cfg.run_dir() / "results.json",
                                json.dumps({"rows": rows, "results": results, "timings_s": timings,
                                            "total_s": total, "artifact": str(out)}, indent=2))
        logger.log_artifact(str(res_path))
        log_results(rows, logger, f"{cfg.name}: {evaluation_title(cfg, len(data.test_x))}, IPC {cfg.distill.ipc}",
                    cfg.run_dir())  # results.md, results.png
    return 0


if __name__ == "__main__":
    sys.exit(main())
