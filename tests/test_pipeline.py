"""End to end on real CIFAR-10 (a few hundred images, narrow nets): the README main job in miniature."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contra_ray.config import load_config
from contra_ray.distill.artifact import DistilledSet
from contra_ray.distill.cli import main as distill_main
from contra_ray.experts.store import ExpertStore
from contra_ray.pipeline import evaluation_title
from helpers import CIFAR_TARBALL, ROOT, assert_expert_runs, assert_shared_vocabulary

pytestmark = pytest.mark.skipif(not CIFAR_TARBALL.exists(),
                                reason=f"real CIFAR-10 tarball not found at {CIFAR_TARBALL}")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, cache_dir):
    """The README main job in miniature, run as the README runs it: ``python -m contra_ray.pipeline``."""
    out = tmp_path_factory.mktemp("runs")
    sets = [f"output_dir={out}", f"data.cache_dir={cache_dir}", "experts.curriculum=true",
            "experts.curriculum_gamma=2", "distill.checkpoint_every=2"]
    proc = subprocess.run([sys.executable, "-m", "contra_ray.pipeline", "--preset", "tiny_cpu",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=out, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_config("tiny_cpu", sets)


def test_pipeline_outputs(pipeline_run):
    cfg = pipeline_run
    res = json.loads((cfg.run_dir() / "results.json").read_text())
    methods = {r["method"] for r in res["rows"]}
    assert methods == {"random_real", "contra"}  # the MLflow/method vocabulary; tables print the labels
    for r in res["rows"]:
        assert r["runs"] == cfg.eval.runs and 0 <= r["mean"] <= 100
    art = DistilledSet.load(cfg.run_dir() / "distilled.safetensors")
    assert art.images.shape == (10, 3, 32, 32) and art.label_logits.shape == (10, 10)
    assert art.meta["config"]["distill"]["K"] == cfg.distill.K and art.meta["iteration"] == cfg.distill.iterations
    assert art.syn_lr > 0
    assert (cfg.run_dir() / "distilled_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curriculum_experts(pipeline_run):
    cfg = pipeline_run
    store = ExpertStore.open(cfg.expert_store())
    assert store.expert_ids == [0, 1] and store.epochs == cfg.experts.epochs
    rank = torch.load(cfg.expert_store() / "difficulty_rank.pt")
    assert sorted(rank.tolist()) == list(range(200))  # a permutation of the 20 x 10 training images


def test_mlflow_run_logged(pipeline_run):
    from mlflow.tracking import MlflowClient

    cfg = pipeline_run
    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], "tags.`contra_ray.role` = 'pipeline'")
    # under python -m the module is __main__: still tagged with its stage, as the README's table says
    assert_shared_vocabulary(client, run, role="pipeline", entry_point="contra_ray.pipeline", method="contra",
                             iterations=cfg.distill.iterations)
    assert_expert_runs(client, run, ExpertStore.open(cfg.expert_store()), [0, 1])
    m = run.data.metrics
    res = json.loads((cfg.run_dir() / "results.json").read_text())["results"]
    assert m["final_acc"] == pytest.approx(res["contra/convnet"]["mean"])
    assert m["random_real_acc"] == m["random_real_acc/convnet"] == pytest.approx(res["random_real/convnet"]["mean"])
    assert run.data.params["distill.K"] == str(cfg.distill.K) and m["total_minutes"] > 0
    assert "loss/sampled" in m  # β > 0: the sampled segment's Eq. 2 loss, under its own section
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"distilled.safetensors", "distilled_grid.png", "distill_curves.png", "results.json", "results.md",
            "results.png"} <= arts
    table = Path(client.download_artifacts(run.info.run_id, "results.md")).read_text().splitlines()
    assert table[0].startswith("# tiny_cpu: CIFAR-10 evaluation")
    assert table[4:] == [f"| {label} | convnet | 1 | {cfg.eval.runs} | {res[key]['mean']:.2f} | {res[key]['std']:.2f} |"
                         for label, key in (("random real", "random_real/convnet"), ("ConTra", "contra/convnet"))]
    from PIL import Image

    with Image.open(client.download_artifacts(run.info.run_id, "results.png")) as im:
        assert im.size[0] >= 480 and im.size[1] == 420


def test_grid_picture_has_one_row_per_class(pipeline_run):
    from PIL import Image

    cfg = pipeline_run
    with Image.open(cfg.run_dir() / "distilled_grid.png") as im:
        w, h = im.size
    # tiny_cpu: IPC 1, 10 classes of 32 px images -> rows of 64 px (+ 4 px gaps), a title and a name column
    assert h == 28 + 10 * (64 + 4) + 4 and w > 64 + 8


def test_distill_cli_resumes_and_continues(pipeline_run, capsys):
    """Re-running distill with more iterations continues from the checkpoint, not from scratch."""
    cfg = pipeline_run
    rc = distill_main(["--preset", "tiny_cpu", "--set", f"output_dir={cfg.output_dir}", "--set",
                       f"data.cache_dir={cfg.data.cache_dir}", "--set", "experts.curriculum=true",
                       "--set", "experts.curriculum_gamma=2", "--set", "distill.checkpoint_every=2",
                       "--iterations", "6", "--set", "tracking.experiment=distill-cli", "--no-train-experts"])
    assert rc == 0
    assert f"resumed from {cfg.run_dir() / 'checkpoints' / 'iter_00000004'} at iteration 4" in capsys.readouterr().out
    assert DistilledSet.load(cfg.run_dir() / "distilled.safetensors").meta["iteration"] == 6
    from mlflow.tracking import MlflowClient  # the distill run kind: the shared names and tags

    client = MlflowClient(cfg.tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("distill-cli").experiment_id])
    assert_shared_vocabulary(client, run, role="distill", entry_point="contra_ray.distill", method="contra",
                             final=False)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [4, 5]  # resumed at 4


def test_distill_under_python_m_logs_the_experts_it_trains(pipeline_run, tmp_path):
    """``python -m contra_ray.distill`` growing a copy of the pipeline's store by one expert: its run is tagged
    distill (the stage, not ``contra_ray``) and holds the new expert's child run, as the pipeline's holds its two."""
    from mlflow.tracking import MlflowClient

    cfg = pipeline_run
    store = tmp_path / "experts"
    shutil.copytree(cfg.expert_store(), store)
    sets = [f"output_dir={tmp_path}", f"data.cache_dir={cfg.data.cache_dir}", "experts.curriculum=true",
            "experts.curriculum_gamma=2", "experts.num_experts=3"]
    proc = subprocess.run([sys.executable, "-m", "contra_ray.distill", "--preset", "tiny_cpu", "--name", "grow",
                           "--experts", str(store), "--iterations", "2", *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("contra_ray").experiment_id],
                                "tags.`contra_ray.role` = 'distill'")
    assert_shared_vocabulary(client, run, role="distill", entry_point="contra_ray.distill", method="contra",
                             final=False, iterations=2)
    assert_expert_runs(client, run, ExpertStore.open(store), [2])


def test_distill_cli_bad_input_exits_2(tmp_path, capsys):
    assert distill_main(["--preset", "tiny_cpu", "--K", "5", "--set", f"output_dir={tmp_path}"]) == 2
    assert "distill.K=5" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_readme_step2_evaluate_runs_on_the_distill_output(pipeline_run, capsys):
    """README step 2 on step 1's real output (the issue: it stopped with "meta has no 'model' entry")."""
    from contra_ray.evaluate.cli import main as evaluate_main

    cfg = pipeline_run
    res = evaluate_main(["--artifact", str(cfg.run_dir() / "distilled.safetensors"), "--models", "convnet",
                         "--runs", "1", "--epochs", "2", "--inline", "--no-tracking", "--baseline", "random-real"])
    assert set(res) == {("contra", "convnet"), ("random_real", "convnet")}
    assert all(len(a) == 1 and 0.0 <= a[0] <= 1.0 for a in res.values())
    assert "random real" in capsys.readouterr().out  # METHOD_LABELS, as in the pipeline's table


def test_readme_cross_architecture_row_on_the_distill_output(pipeline_run, capsys):
    """README step 2's Table 2-style row, on step 1's real output (a cheap pair of networks: ConvNet and
    AlexNet; the README's ResNet-18, VGG-11 and ViT take the same path, parameter counts in test_models)."""
    from contra_ray.evaluate.cli import main as evaluate_main

    cfg = pipeline_run
    res = evaluate_main(["--artifact", str(cfg.run_dir() / "distilled.safetensors"), "--models", "convnet,alexnet",
                         "--runs", "1", "--epochs", "2", "--inline", "--no-tracking"])
    assert set(res) == {("contra", "convnet"), ("contra", "alexnet")}
    out = capsys.readouterr().out.splitlines()
    head = out.index(next(line for line in out if line.startswith("cross-architecture")))
    assert out[head + 1].split() == ["method", "convnet", "(instancenorm)", "alexnet", "(none)"]
    assert out[head + 3].split()[0] == "ConTra" and len(out[head + 3].split()) == 7  # two "mean ± std" cells


def test_distill_rerun_with_another_beta_and_K_is_refused_before_work(pipeline_run, capsys):
    """The issue: the same --name with β=1, K=0 printed "resumed" and continued the β=0.2, K=2 state."""
    cfg = pipeline_run
    rc = distill_main(["--preset", "tiny_cpu", "--set", f"output_dir={cfg.output_dir}", "--set",
                       f"data.cache_dir={cfg.data.cache_dir}", "--set", "experts.curriculum=true",
                       "--set", "experts.curriculum_gamma=2", "--set", "distill.checkpoint_every=2",
                       "--set", "distill.beta=1.0", "--set", "distill.K=0", "--no-tracking", "--no-train-experts"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "distill.beta=0.2 in the checkpoint, 1.0 now" in captured.err and "distill.K=2" in captured.err
    assert "--no-resume" in captured.err and "resumed" not in captured.out


# ---------------------------------------------------------------------------------------------- finished runs


def _nockpt_args(cfg, *extra: str) -> list[str]:
    """distill arguments of the checkpoint-less run "nockpt" (tiny_cpu keeps no checkpoint), 2 iterations, on
    the pipeline run's expert store."""
    return ["--preset", "tiny_cpu", "--name", "nockpt", "--set", f"output_dir={cfg.output_dir}",
            "--set", f"data.cache_dir={cfg.data.cache_dir}", "--set", "experts.curriculum=true",
            "--set", "experts.curriculum_gamma=2", "--experts", str(cfg.expert_store()), "--iterations", "2",
            "--no-tracking", "--no-train-experts", *extra]


def _distill_cli(cfg, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "contra_ray.distill", *_nockpt_args(cfg, *extra)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=cfg.output_dir, timeout=600)


@pytest.fixture(scope="module")
def finished_nockpt(pipeline_run):
    """The finished checkpoint-less run "nockpt" (β = 0.2), distilled in this process; its stdout."""
    cfg = pipeline_run
    assert load_config("tiny_cpu").distill.checkpoint_every == 0  # what the issue is about
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert distill_main(_nockpt_args(cfg)) == 0
    return cfg, cfg.run_dir().parent / "nockpt", out.getvalue()


def test_distill_prints_its_memory_plan_once(finished_nockpt):
    """The issue: the planner's line was printed by the pre-check and again by the Distiller."""
    _, _, out = finished_nockpt
    plan_lines = [line for line in out.splitlines() if "estimated peak" in line]
    assert len(plan_lines) == 1, plan_lines
    assert plan_lines[0].startswith("memory: unroll_memory=full: estimated peak")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finished_checkpointless_run_is_not_replaced_by_another_beta(finished_nockpt):
    """The issue: re-running a finished tiny_cpu run name with another β replaced distilled.safetensors
    silently (no checkpoint, so the resume check never ran). Now refused, naming distill.beta; --no-resume
    replaces it; the same configuration reruns as before."""
    cfg, run_dir, _ = finished_nockpt
    art = run_dir / "distilled.safetensors"
    before = _sha(art)
    assert DistilledSet.load(art).meta["config"]["distill"]["beta"] == 0.2

    refused = _distill_cli(cfg, "--beta", "0.5")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line
    assert "distill.beta=0.2 in the finished set, 0.5 now" in refused.stderr
    assert str(art) in refused.stderr and "--no-resume" in refused.stderr
    assert "memory:" not in refused.stdout and _sha(art) == before  # before any work; the set untouched

    replaced = _distill_cli(cfg, "--beta", "0.5", "--no-resume")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    first = DistilledSet.load(art)
    assert first.meta["config"]["distill"]["beta"] == 0.5 and first.meta["iteration"] == 2

    again = _distill_cli(cfg, "--beta", "0.5")  # the same configuration: distilled again, as before
    assert again.returncode == 0, again.stderr[-2000:]
    second = DistilledSet.load(art)
    assert torch.equal(first.images, second.images) and first.syn_lr == second.syn_lr


def test_results_table_is_titled_by_its_data_set():
    """The issue: the Tiny ImageNet table was titled "CIFAR-style evaluation"."""
    titles = {p: evaluation_title(load_config(p, validate=False), 10000)
              for p in ("tiny_ipc10", "tiny_cpu", "cifar100_ipc10", "imagenet1k_ipc10")}
    assert titles == {"tiny_ipc10": "Tiny ImageNet evaluation on 10000 test images",
                      "tiny_cpu": "CIFAR-10 evaluation on 10000 test images",
                      "cifar100_ipc10": "CIFAR-100 evaluation on 10000 test images",
                      "imagenet1k_ipc10": "ImageNet-1K (64 px) evaluation on 10000 test images"}
