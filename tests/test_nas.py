"""NAS proxy: ranking metrics against known answers, the search space, and the CLI on a saved artifact."""

import csv
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from contra_ray import nas
from contra_ray.config import Config, EvalConfig
from contra_ray.distill.artifact import DistilledSet
from contra_ray.models import ModelSpec, build_model, num_params
from helpers import ROOT, toy_halves


@pytest.mark.parametrize("a, b", [
    ([0.1, 0.4, 0.35, 0.8, 0.5], [1, 3, 2, 5, 4]),                     # no ties: rho = 1
    ([0.1, 0.4, 0.35, 0.8, 0.5], [5, 3, 4, 1, 2]),                     # reversed: -1
    ([60.0, 55.0, 55.0, 70.0, 40.0, 70.0], [50.0, 52.0, 49.0, 61.0, 30.0, 58.0]),  # ties in a
    ([1, 2, 2, 2, 3, 4], [4, 4, 1, 2, 2, 3]),                           # ties in both
])
def test_spearman_equals_scipy(a, b):
    assert nas.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_spearman_hand_value_and_edges():
    # ranks a: [1, 2, 3, 4], b: [2, 1, 4, 3] -> d^2 = 4 -> rho = 1 - 6*4 / (4*(16-1)) = 0.6
    assert nas.spearman([1, 2, 3, 4], [20, 10, 40, 30]) == pytest.approx(0.6)
    assert math.isnan(nas.spearman([1, 1, 1], [1, 2, 3]))  # constant input: undefined (scipy: nan)
    with pytest.raises(ValueError, match="same length >= 2"):
        nas.spearman([1, 2], [1, 2, 3])


def test_select_best_and_top_k_correlation():
    assert nas.select_best([0.2, 0.7, 0.7, 0.1]) == 1  # first on ties
    real = [90.0, 80.0, 70.0, 60.0, 50.0]
    proxy = [50.0, 60.0, 40.0, 30.0, 100.0]  # the worst real architecture looks best on the proxy
    # top 4 by real accuracy: indices 0..3; proxy ranks [3, 4, 2, 1], real ranks [4, 3, 2, 1]
    # d = [-1, 1, 0, 0], sum d^2 = 2 -> rho = 1 - 6*2 / (4*15) = 0.8
    assert nas.top_k_indices(real, 4) == [0, 1, 2, 3]
    assert nas.top_k_correlation(proxy, real, 4) == pytest.approx(0.8)
    assert nas.top_k_correlation(proxy, real, 4) == pytest.approx(spearmanr(proxy[:4], real[:4]).statistic)
    assert nas.top_k_correlation(proxy, real, 99) == pytest.approx(spearmanr(proxy, real).statistic)  # all 5
    res = nas.summarize_search([ModelSpec(width=w) for w in (1, 2, 3, 4, 5)], proxy, real, top_k=4)
    assert res.best == 4 and res.best_real_acc == 50.0 and res.oracle_real_acc == 90.0
    assert res.correlation == pytest.approx(0.8)
    with pytest.raises(ValueError, match="need at least 2"):
        nas.top_k_correlation(proxy, real, 1)


def test_dc720_space_and_mtt_layernorm_convnet():
    specs = nas.architectures(nas.SPACES["dc720"], ModelSpec(num_classes=10, image_size=32))
    assert len(specs) == 4 * 4 * 3 * 5 * 3 == 720 == len(set(specs))
    assert {s.norm for s in specs} == {"none", "batchnorm", "layernorm", "instancenorm", "groupnorm"}
    assert len(nas.architectures(nas.SPACES["small"], ModelSpec())) == 16
    # MTT's layernorm is LayerNorm over [C, H, W] of the conv output (before pooling):
    # D1 W32, no pooling: conv 3*32*9+32, LayerNorm 2*32*32*32, linear on 32x32x32 -> 10
    spec = ModelSpec(width=32, depth=1, activation="sigmoid", norm="layernorm", pooling="none")
    assert spec in specs
    assert num_params(build_model(spec)) == (3 * 32 * 9 + 32) + 2 * 32 * 32 * 32 + 32 * 32 * 32 * 10 + 10
    with pytest.raises(ValueError, match="expected"):
        nas.architectures({"depth": (1,)}, ModelSpec())


def test_split_per_class_is_disjoint_balanced_and_seeded():
    labels = torch.arange(3).repeat(10)
    val, train = nas.split_per_class(labels, 3, 2, 5, seed=1)
    assert len(val) == 6 and len(train) == 15 and not set(val.tolist()) & set(train.tolist())
    assert torch.bincount(labels[val]).tolist() == [2, 2, 2] and torch.bincount(labels[train]).tolist() == [5] * 3
    val2, train2 = nas.split_per_class(labels, 3, 2, None, seed=1)
    assert torch.equal(val, val2) and len(train2) == 24
    assert torch.equal(train, nas.split_per_class(labels, 3, 2, 5, seed=1)[1])
    with pytest.raises(ValueError, match="class 0 has 10 images"):
        nas.split_per_class(labels, 3, 8, 5, seed=1)


def test_score_architectures_trains_each_variant():
    x, y = toy_halves(8, 0)
    tx, ty = toy_halves(20, 1)
    specs = [ModelSpec("convnet", 2, 8, 1, width=8, depth=2, norm=n, activation=a, pooling=p)
             for n, a, p in [("batchnorm", "relu", "maxpooling"), ("layernorm", "leakyrelu", "none"),
                             ("groupnorm", "sigmoid", "avgpooling")]]
    accs = nas.score_architectures(specs, x, F.one_hot(y, 2).float(), 0.05,
                                   EvalConfig(epochs=5, batch_size=8, dsa=False), tx, ty)
    assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
    assert max(accs) > 0.9  # the toy problem is separable


@pytest.fixture
def fake_data(monkeypatch):
    class Pre:
        zca = True

        @classmethod
        def from_state_dict(cls, d):
            return cls()

        def fingerprint(self):
            return "fp1"

        def __call__(self, images):
            return images.float() / 127.5 - 1.0

    def load_split(dcfg, split):
        x, y = toy_halves(20 if split == "test" else 10, 7 if split == "test" else 8)
        return types.SimpleNamespace(images=((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), labels=y,
                                     classes=["pos", "neg"], num_classes=2, dataset_id="toy", content_hash="h")

    data = types.SimpleNamespace(Preprocessor=Pre, load_split=load_split)
    import contra_ray.evaluate.cli
    import contra_ray.nas

    # nas and the shared artifact prologue read the data stage through their module-level name `data`
    monkeypatch.setattr(contra_ray.evaluate.cli, "data", data)
    monkeypatch.setattr(contra_ray.nas, "data", data)


def test_cli_on_a_saved_artifact_with_tracking(tmp_path, fake_data, capsys):
    from mlflow.tracking import MlflowClient

    cfg = Config()
    cfg.eval.batch_size, cfg.eval.dsa = 8, False
    x, y = toy_halves(2, 4)
    spec = ModelSpec("convnet", num_classes=2, image_size=8, channels=1, width=8, depth=2)
    meta = {"model": spec.to_dict(), "zca": True, "preprocessor_fingerprint": "fp1", "image_size": 8,
            "channels": 1, "num_classes": 2, "classes": ["pos", "neg"], "ipc": 2, "config": cfg.to_dict(),
            "eval": cfg.to_dict()["eval"], "dataset_id": "toy", "method": "contra", "iteration": 3}
    p = tmp_path / "set.safetensors"
    DistilledSet(x, 5 * F.one_hot(y, 2).float(), y, 0.01, True, {"mean": torch.zeros(1)}, meta).save(p)
    uri = f"sqlite:///{tmp_path}/ml/mlflow.db"
    res = nas.main(["--artifact", str(p), "--space", "small", "--epochs", "3", "--real-epochs", "2",
                    "--val-per-class", "2", "--real-per-class", "6", "--top-k", "5", "--out", str(tmp_path / "nas"),
                    "--tracking-uri", uri])
    assert len(res.specs) == 16 and res.top_k == 5 and res.best == nas.select_best(res.proxy_acc)
    out = capsys.readouterr().out
    assert "NAS over 16 ConvNets (small)" in out and "Spearman correlation, top 5 by real accuracy" in out
    rows = list(csv.DictReader(open(tmp_path / "nas" / "nas.csv")))
    assert len(rows) == 16 and sum(int(r["selected"]) for r in rows) == 1
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("contra_ray").experiment_id])
    assert run.data.metrics["nas.best_selected_real_acc"] == pytest.approx(res.best_real_acc)
    assert run.data.params["nas.space"] == "small" and run.data.params["nas.real_images"] == "12"
    assert "nas.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_cli_bad_flags_exit_2(tmp_path, capsys):
    for bad in (["--space", "huge"], ["--top-k", "0"], ["--val-per-class", "-1"]):
        with pytest.raises(SystemExit) as e:
            nas.main(["--artifact", str(tmp_path / "x.safetensors"), *bad])
        assert e.value.code == 2


def test_cli_config_error_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    from contra_ray.config import ConfigError

    def bad(args, art):
        raise ConfigError("data.root='/nowhere': no such dataset")

    monkeypatch.setattr(nas, "_run_cli", bad)
    monkeypatch.setattr("contra_ray.distill.artifact.DistilledSet.load", staticmethod(lambda path: object()))
    with pytest.raises(SystemExit) as e:
        nas.main(["--artifact", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == "error: data.root='/nowhere': no such dataset"


def _saved_toy_artifact(path):
    """A 2-class 8 px distilled set with a complete meta (what the CLI needs to get past loading it)."""
    cfg = Config()
    x, y = toy_halves(2, 4)
    spec = ModelSpec("convnet", num_classes=2, image_size=8, channels=1, width=8, depth=2)
    meta = {"model": spec.to_dict(), "zca": True, "preprocessor_fingerprint": "fp1", "image_size": 8,
            "channels": 1, "num_classes": 2, "classes": ["pos", "neg"], "ipc": 2, "config": cfg.to_dict(),
            "eval": cfg.to_dict()["eval"], "dataset_id": "toy", "method": "contra", "iteration": 3}
    DistilledSet(x, 5 * F.one_hot(y, 2).float(), y, 0.01, True, {"mean": torch.zeros(1)}, meta).save(path)
    return path


@pytest.mark.parametrize("top_k, says", [("50", "the 'small' search space has 16 architectures"),
                                         ("1", "needs at least 2 architectures")])
def test_cli_refuses_a_top_k_the_space_cannot_fill_before_any_work(tmp_path, top_k, says):
    """The issue: --top-k 50 on the 16-network space ran with 16 and said nothing."""
    art = _saved_toy_artifact(tmp_path / "set.safetensors")
    out = tmp_path / "nas"
    proc = subprocess.run([sys.executable, "-m", "contra_ray.nas", "--artifact", str(art), "--space", "small",
                           "--top-k", top_k, "--out", str(out), "--no-tracking"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith(f"error: --top-k={top_k}: ") and says in proc.stderr
    assert "NAS over" not in proc.stdout and not out.exists()  # nothing trained, nothing written
    assert nas.space_size(nas.SPACES["small"]) == 16 and nas.space_size(nas.SPACES["dc720"]) == 720
