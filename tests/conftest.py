import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CONTRA_RAY_SHARED", ROOT.parent / "shared"))
CIFAR_TARBALL = SHARED / "datasets" / "cifar10-jpeg.tar.gz"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Per-session cache; the real CIFAR-10 extraction is shared through CONTRA_RAY_TEST_CACHE if set."""
    return os.environ.get("CONTRA_RAY_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))


def assert_shared_vocabulary(client, run, *, role: str, entry_point: str, method: str, final: bool = True,
                             iterations: int | None = None) -> None:
    """A run read back from the store logs contra_ray.tracking's shared metric names and tags, and no paths
    as params (every run kind: pipeline, distill, distill --num-workers, Tune trial, evaluate CLI)."""
    from contra_ray.tracking import PATH_FIELDS

    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["contra_ray.role"] == role and tags["mlflow.source.name"] == entry_point
    assert tags["method"] == method and tags["dataset"] and tags["git_commit"]
    for key in ("ipc", "K", "beta"):
        assert tags[key] == params[f"distill.{key}"]
    assert not set(PATH_FIELDS) & set(params) and tags["path.output_dir"]
    if final:
        assert 0 <= metrics["final_acc"] <= 100 and metrics["final_acc_std"] >= 0
        model = params["model.name"]
        assert metrics[f"final_acc/{model}"] == metrics["final_acc"]
    if iterations is not None:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(iterations))
        assert len(client.get_metric_history(run.info.run_id, "syn_lr")) == iterations
        assert metrics["s_per_iter"] > 0
