import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from contra_ray import evaluate as ev
from contra_ray.config import Config, EvalConfig
from contra_ray.distill.artifact import ArtifactMismatchError, DistilledSet
from contra_ray.models import ModelSpec
from helpers import assert_shared_vocabulary, toy_halves

SPEC = ModelSpec("convnet", num_classes=2, image_size=8, channels=1, width=8, depth=2)
ECFG = EvalConfig(epochs=6, batch_size=8, dsa=False, test_batch_size=32)


@pytest.fixture(scope="module")
def data():
    x, y = toy_halves(8, 0)
    tx, ty = toy_halves(50, 1)
    return x, F.one_hot(y, 2).float(), tx, ty


def test_separable_toy_reaches_100_percent_and_is_seeded(data):
    x, t, tx, ty = data
    acc = ev.train_and_test(x, t, 0.01, SPEC, ECFG, tx, ty, seed=0)
    assert acc == 1.0
    a1 = ev.train_and_test(x, t, 0.05, SPEC, ECFG, tx, ty, seed=3)
    a2 = ev.train_and_test(x, t, 0.05, SPEC, ECFG, tx, ty, seed=3)
    assert a1 == a2


def test_no_signal_stays_near_chance():
    x, y = toy_halves(8, 2, signal=False)
    tx, ty = toy_halves(100, 3, signal=False)
    acc = ev.train_and_test(x, F.one_hot(y, 2).float(), 0.01, SPEC, ECFG, tx, ty, seed=0)
    assert 0.35 <= acc <= 0.65


def test_lr_decays_once_at_half(data):
    assert ev.lr_schedule(1.0, 6) == [1.0, 1.0, 1.0, 0.1, 0.1, 0.1]
    assert ev.lr_schedule(1.0, 5) == [1.0, 1.0, 0.1, 0.1, 0.1]
    assert ev.lr_schedule(1.0, 1) == [1.0]
    x, t, tx, ty = data
    seen = []
    ev.train_and_test(x, t, 0.02, SPEC, ECFG, tx[:4], ty[:4], seed=0,
                      on_epoch=lambda ep, lr, loss: seen.append((ep, lr, loss)))
    assert [e for e, _, _ in seen] == list(range(6))
    assert [lr for _, lr, _ in seen] == pytest.approx([0.02] * 3 + [0.002] * 3)
    assert seen[-1][2] < seen[0][2]  # training loss went down


def test_dsa_hook_is_called_on_every_batch(data):
    x, t, tx, ty = data
    calls = []

    def aug(xb, generator):
        calls.append((xb.shape[0], type(generator)))
        return xb

    ecfg = EvalConfig(epochs=2, batch_size=8, dsa=True)
    ev.train_and_test(x, t, 0.01, SPEC, ecfg, tx, ty, seed=0, augment=aug)
    assert calls == [(8, torch.Generator)] * 4  # 16 images / batch 8 x 2 epochs
    calls.clear()
    ev.train_and_test(x, t, 0.01, SPEC, EvalConfig(epochs=2, batch_size=8, dsa=False), tx, ty, seed=0, augment=aug)
    assert calls == []


def test_evaluate_runs_ray_equals_inline(data):
    import ray

    x, t, tx, ty = data
    ecfg = EvalConfig(epochs=3, batch_size=8, dsa=False, cpus_per_run=1.0)
    seeds = [0, 1]
    inline = ev.evaluate_runs(x, t, 0.01, SPEC, ecfg, tx, ty, seeds, threads=1, use_ray=False)
    assert inline == [ev.train_and_test(x, t, 0.01, SPEC, ecfg, tx, ty, s, threads=1) for s in seeds]
    started = not ray.is_initialized()
    try:
        remote = ev.evaluate_runs(x, t, 0.01, SPEC, ecfg, tx, ty, seeds)
    finally:
        if started:
            ray.shutdown()
    assert len(remote) == 2 and remote == inline


def test_evaluate_runs_rejects_cuda_without_gpus(data):
    x, t, tx, ty = data
    with pytest.raises(ValueError, match="gpus_per_run"):
        ev.evaluate_runs(x, t, 0.01, SPEC, EvalConfig(gpus_per_run=0.0), tx, ty, [0], device="cuda")


def test_random_real_set():
    x = torch.arange(30.).view(30, 1, 1, 1)
    y = torch.arange(3).repeat(10)
    imgs, tg = ev.random_real_set(x, y, 4, 3, seed=5)
    assert imgs.shape == (12, 1, 1, 1) and tg.shape == (12, 3) and tg.dtype == torch.float32
    labels = y[imgs.flatten().long()]  # value == index into the train set
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(tg, F.one_hot(labels, 3).float())
    assert imgs.flatten().unique().numel() == 12  # without replacement
    again, _ = ev.random_real_set(x, y, 4, 3, seed=5)
    other, _ = ev.random_real_set(x, y, 4, 3, seed=6)
    assert torch.equal(imgs, again) and not torch.equal(imgs, other)
    with pytest.raises(ValueError, match="class 0 has only 10"):
        ev.random_real_set(x, y, 11, 3, seed=0)


def artifact_for(classes=("pos", "neg"), zca=True, cfg=None, n_per_class=2):
    x, y = toy_halves(n_per_class, 4)
    meta = {"model": SPEC.to_dict(), "zca": zca, "preprocessor_fingerprint": "fp1", "image_size": 8,
            "channels": 1, "num_classes": 2, "classes": list(classes), "ipc": n_per_class, "method": "contra",
            "dataset_id": "toy", "iteration": 3}
    if cfg is not None:
        meta["config"] = cfg.to_dict()
        meta["eval"] = cfg.to_dict()["eval"]
    return DistilledSet(x, 5 * F.one_hot(y, 2).float(), y, 0.01, True, {"mean": torch.zeros(1)}, meta)


def test_check_artifact_matches():
    a = artifact_for()
    good = {"zca": True, "preprocessor_fingerprint": "fp1", "image_size": 8, "channels": 1, "num_classes": 2,
            "classes": ["pos", "neg"]}
    ev.check_artifact_matches(a, good)
    with pytest.raises(ArtifactMismatchError, match=r"zca: artifact has True but the test data has False"):
        ev.check_artifact_matches(a, {**good, "zca": False})
    with pytest.raises(ArtifactMismatchError, match=r"image_size: artifact has 8 but the test data has 32"):
        ev.check_artifact_matches(a, {**good, "image_size": 32})
    with pytest.raises(ArtifactMismatchError, match="preprocessor_fingerprint.*fp1.*fp2"):
        ev.check_artifact_matches(a, {**good, "preprocessor_fingerprint": "fp2"})
    with pytest.raises(ArtifactMismatchError, match="classes"):
        ev.check_artifact_matches(a, {**good, "classes": ["neg", "pos"]})
    with pytest.raises(ValueError, match="channels"):
        ev.check_artifact_matches(a, {**good, "channels": 3})


def test_summarize_and_table():
    assert ev.summarize([0.5, 0.7]) == (60.0, 10.0)
    assert ev.summarize([0.25]) == (25.0, 0.0)
    table = ev.format_table([{"method": "contra", "model": "convnet", "ipc": 1, "runs": 5, "mean": 46.123,
                              "std": 0.5},
                             {"method": "random_real", "model": "resnet18", "ipc": 1, "runs": 5, "mean": 14.4,
                              "std": 1.25}])
    lines = table.splitlines()
    assert lines[0].split() == ["method", "model", "IPC", "runs", "acc", "(%)"]
    assert lines[2].split() == ["ConTra", "convnet", "1", "5", "46.12", "±", "0.50"]
    assert lines[3].split() == ["random", "real", "resnet18", "1", "5", "14.40", "±", "1.25"]


def test_cross_architecture_row_has_one_column_per_network_with_its_norm():
    rows = [{"method": m, "model": n, "norm": norm, "mean": mean, "std": 0.5}
            for m in ("contra", "random_real")
            for n, norm, mean in (("convnet", "instancenorm", 46.0), ("resnet18", "instancenorm", 40.25),
                                  ("alexnet", "none", 30.0), ("vit", "layernorm", 25.0))
            if (m, n) != ("random_real", "vit")]
    rows = [{**r, "mean": r["mean"] + (-20.0 if r["method"] == "random_real" else 0.0)} for r in rows]
    lines = ev.format_cross_architecture(rows).splitlines()
    assert lines[0].split() == ["method", "convnet", "(instancenorm)", "resnet18", "(instancenorm)", "alexnet",
                                "(none)", "vit", "(layernorm)"]
    assert lines[2].split() == ["ConTra", "46.00", "±", "0.50", "40.25", "±", "0.50", "30.00", "±", "0.50",
                                "25.00", "±", "0.50"]
    assert lines[3].split() == ["random", "real", "26.00", "±", "0.50", "20.25", "±", "0.50", "10.00", "±", "0.50", "-"]


# ---------------------------------------------------------------------- CLI, with fake data/augment modules

@pytest.fixture
def fake_modules(monkeypatch):
    state = {"zca": True}

    class Pre:
        def __init__(self, d):
            self.d, self.zca = d, state["zca"]

        @classmethod
        def from_state_dict(cls, d):
            return cls(d)

        def fingerprint(self):
            return "fp1"

        def __call__(self, images):
            return images.float() / 127.5 - 1.0

    def to_uint8(x):
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def load_split(dcfg, split):
        assert dcfg.root == "/somewhere/else"
        x, y = toy_halves(50 if split == "test" else 10, 7 if split == "test" else 8)
        return types.SimpleNamespace(images=to_uint8(x), labels=y, classes=["pos", "neg"], dataset_id="toy",
                                     content_hash="h")

    from contra_ray.data.preprocess import real_images_per_class

    data = types.SimpleNamespace(Preprocessor=Pre, load_split=load_split, real_images_per_class=real_images_per_class)
    import contra_ray.evaluate.cli
    import contra_ray.evaluate.sets

    # the evaluate CLI reads the data stage through its module-level name `data`; no augmentation
    monkeypatch.setattr(contra_ray.evaluate.cli, "data", data)
    monkeypatch.setattr(contra_ray.evaluate.sets, "dsa_if", lambda on: (lambda x, generator: x) if on else None)
    return state


def _cfg():
    cfg = Config()
    cfg.data.dataset, cfg.data.root = "imagefolder", "/orig/root"
    cfg.eval.epochs, cfg.eval.runs, cfg.eval.batch_size = 6, 2, 8
    cfg.model.width = 8
    return cfg


def test_cli_end_to_end_with_tracking(tmp_path, fake_modules, capsys):
    from mlflow.tracking import MlflowClient

    p = tmp_path / "set.safetensors"
    artifact_for(cfg=_cfg(), n_per_class=8).save(p)
    uri = f"sqlite:///{tmp_path}/ml/mlflow.db"
    res = ev.main(["--artifact", str(p), "--inline", "--baseline", "random-real", "--data-root", "/somewhere/else",
                   "--tracking-uri", uri, "--seed", "3"])
    assert set(res) == {("contra", "convnet"), ("random_real", "convnet")}
    assert all(len(v) == 2 for v in res.values())
    assert res[("contra", "convnet")] == [1.0, 1.0]
    out = capsys.readouterr().out
    assert "ConTra" in out and "random real" in out and "100.00 ± 0.00" in out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("contra_ray")
    (run,) = client.search_runs([exp.experiment_id])
    assert_shared_vocabulary(client, run, role="evaluate", entry_point="contra_ray.evaluate", method="contra")
    m = run.data.metrics
    assert m["final_acc"] == m["final_acc/convnet"] == 100.0 and m["final_acc_std"] == 0.0
    assert 0 <= m["random_real_acc"] == m["random_real_acc/convnet"] <= 100 and "random_real_acc_std" in m
    assert run.data.params["eval.epochs"] == "6" and run.data.params["eval_cli.seed"] == "3"
    saved_rows = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_results.json")).read_text())["rows"]
    assert {(r["method"], r["model"], r["norm"]) for r in saved_rows} == {("contra", "convnet", "instancenorm"),
                                                                         ("random_real", "convnet", "instancenorm")}
    assert run.data.tags["path.data.root"] == "/somewhere/else" and run.data.tags["path.artifact"] == str(p)
    table = Path(client.download_artifacts(run.info.run_id, "results.md")).read_text().splitlines()
    assert table[4] == "| ConTra | convnet | 8 | 2 | 100.00 | 0.00 |"  # the final accuracies as a table
    assert Path(client.download_artifacts(run.info.run_id, "results.png")).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((Path(client.download_artifacts(run.info.run_id, "eval_results.json"))).read_text())
    assert saved["accs"]["contra/convnet"] == [1.0, 1.0]


def test_cli_mismatch_exits_2(tmp_path, fake_modules, capsys):
    p = tmp_path / "set.safetensors"
    artifact_for(cfg=_cfg()).save(p)
    fake_modules["zca"] = False
    with pytest.raises(SystemExit) as e:
        ev.main(["--artifact", str(p), "--inline", "--no-tracking", "--data-root", "/somewhere/else"])
    assert e.value.code == 2
    assert (f"{p} does not fit the test data of /somewhere/else: zca: artifact has True but the test data has "
            "False") in capsys.readouterr().err


def test_cli_unreachable_tracking_store_exits_2_before_loading_data(tmp_path, fake_modules, capsys, monkeypatch):
    import socket

    p = tmp_path / "set.safetensors"
    artifact_for(cfg=_cfg()).save(p)

    def no_data(dcfg, split):
        raise AssertionError("data loaded before the tracking store was checked")

    monkeypatch.setattr(sys.modules["contra_ray.data"], "load_split", no_data)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SystemExit) as e:
        ev.main(["--artifact", str(p), "--inline", "--data-root", "/somewhere/else", "--tracking-uri", uri])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: tracking.uri='{uri}': tracking store not reachable" in err and "Traceback" not in err


def test_cli_missing_artifact_and_bad_flags(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(SystemExit) as e:
        ev.main(["--artifact", str(missing)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such file" in err and "Traceback" not in err
    artifact_for(cfg=_cfg()).save(tmp_path / "run" / "distilled.safetensors")
    with pytest.raises(SystemExit) as e:  # a run directory instead of its artifact
        ev.main(["--artifact", str(tmp_path / "run")])
    assert e.value.code == 2
    assert (f"{tmp_path / 'run'}: is a directory, expected a .safetensors file "
            f"(e.g. {tmp_path / 'run' / 'distilled.safetensors'})") in capsys.readouterr().err
    for bad in (["--runs", "0"], ["--models", "convnet,lenet"], ["--epochs", "x"], ["--baseline", "dm"]):
        with pytest.raises(SystemExit) as e:
            ev.main(["--artifact", str(missing), *bad])
        assert e.value.code == 2
    assert "lenet" in capsys.readouterr().err
