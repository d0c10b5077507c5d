"""Segment-correlation analysis (Eq. 7) and the forgetting monitor, on a tiny ImageFolder and store
(3 classes of random 8x8 PNGs, width-4 depth-2 ConvNet, 3 random-walk experts of 4 epochs)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import pearsonr

from contra_ray.analyze.correlation import (
    HEATMAP_SIZE_PX,
    ForgettingMonitor,
    correlation_losses,
    mode_config,
    pearson_matrix,
    reference_expert_id,
    save_correlation_csv,
    save_correlation_heatmap,
    segment_loss_eval,
    triangle_summary,
)
from contra_ray.config import ConfigError, load_config
from contra_ray.data.prepare import prepare_data
from contra_ray.distill.distiller import Distiller
from contra_ray.distill.loop import run_distillation
from contra_ray.distill.matching import make_plan, matching_loss, unroll
from contra_ray.experts.remote import store_meta
from contra_ray.models import ModelSpec, build_model, flat_params, functional_forward
from helpers import fake_expert_store, patch_everywhere

EPOCHS, REF = 4, 2  # saved epochs per expert; the default τ_o is the highest id


def tiny_overrides(root, out):
    return {"name": "tiny", "output_dir": str(out), "threads": 1,
            "data": {"dataset": "imagefolder", "root": str(root / "images"), "cache_dir": str(out / "cache"),
                     "train_per_class": None},
            "model": {"width": 4, "depth": 2},
            "experts": {"epochs": EPOCHS, "store": str(out / "experts")},
            "tracking": {"enabled": False},
            "distill": {"ipc": 1, "beta": 0.2, "K": 2, "R": 1, "syn_steps": 3, "expert_epochs": 1,
                        "min_start_epoch": 0, "max_start_epoch": 2, "batch_syn": 3, "iterations": 3,
                        "lr_img": 10.0}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """ImageFolder of random 8x8 PNGs, prepared data, and a compatible store of 3 random-walk experts."""
    root = tmp_path_factory.mktemp("analysis")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b", "c"):
            d = root / "images" / split / c
            d.mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{k}.png")
    cfg = load_config("tiny_cpu", tiny_overrides(root, root))
    data = prepare_data(cfg)
    store = fake_expert_store(cfg.expert_store(), store_meta(cfg, data), data.preprocessor.state_dict(), data.spec,
                              num_experts=3, epochs=EPOCHS)
    return {"root": root, "cfg": cfg, "data": data, "store": store}


class RecordingStore:
    """Wraps an ExpertStore; records every params() call, and fails on the forbidden expert id."""

    def __init__(self, store, forbidden=None):
        self._store, self.forbidden, self.calls = store, forbidden, []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def params(self, expert_id, epoch):
        if expert_id == self.forbidden:
            raise AssertionError(f"distillation read the reference expert {expert_id} (epoch {epoch})")
        self.calls.append((int(expert_id), int(epoch)))
        return self._store.params(expert_id, epoch)


def distiller_for(setup, store, mode="sequential", fixed_start=0):
    cfg = mode_config(setup["cfg"], mode)
    d = setup["data"]
    from contra_ray.augment import DSA

    return Distiller(cfg, store, d.spec, d.train_x, d.train.labels, augment=DSA(), expert_ids=[0, 1],
                     fixed_start=fixed_start)


# ---------------------------------------------------------------------------------------------- Eq. 7


def test_pearson_matrix_equals_numpy_and_scipy():
    rng = np.random.default_rng(1)
    losses = rng.normal(size=(3, 7, 4))
    losses[1, :, 3] = -2.5 * losses[1, :, 1] + 4.0  # row 1 matches column 1: exact anti-correlation
    losses[2, :, 0] = 3.0 * losses[2, :, 2] - 1.0  # row 2 matches column 2: exact correlation
    cols = [0, 1, 2]
    r = pearson_matrix(losses, cols)
    assert r.shape == (3, 4)
    for i, c in enumerate(cols):
        for j in range(4):
            ref_np = np.corrcoef(losses[i, :, c], losses[i, :, j])[0, 1]
            ref_sp = pearsonr(losses[i, :, c], losses[i, :, j]).statistic
            assert r[i, j] == pytest.approx(ref_np, abs=1e-12)
            assert r[i, j] == pytest.approx(ref_sp, abs=1e-12)
    assert r[1, 3] == pytest.approx(-1.0, abs=1e-12) and r[2, 0] == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(np.diag(r[:, :3]), 1.0)
    assert np.array_equal(pearson_matrix(losses[:, :, :3]), pearson_matrix(losses[:, :, :3], [0, 1, 2]))


def test_pearson_matrix_constant_series_is_nan():
    losses = np.arange(2 * 5 * 3, dtype=float).reshape(2, 5, 3) ** 1.5
    losses[0, :, 2] = 0.7  # a loss that never moved: r undefined against it
    losses[1, :, 1] = 1.3  # the matched epoch's own loss constant: the whole row undefined
    r = pearson_matrix(losses)
    assert np.isnan(r[0, 2]) and np.isfinite(r[0, :2]).all()
    assert np.isnan(r[1]).all()
    with pytest.raises(ValueError, match="expected \\[I, Z, J\\]"):
        pearson_matrix(losses[0])


def test_triangle_summary_by_epoch_value():
    r = np.array([[1.0, 0.5, -0.2], [-0.4, 1.0, np.nan], [-0.6, 0.2, 1.0]])
    s = triangle_summary(r, [2, 3, 4], [2, 3, 4])
    assert s["lower"]["entries"] == 3 and s["lower"]["mean_r"] == pytest.approx((-0.4 - 0.6 + 0.2) / 3)
    assert s["lower"]["frac_negative"] == pytest.approx(2 / 3)
    assert s["upper"]["nan"] == 1 and s["upper"]["mean_r"] == pytest.approx(0.15)
    assert s["upper"]["frac_negative"] == pytest.approx(0.5) and s["diagonal"]["mean_r"] == 1.0


# ---------------------------------------------------------------------------------------------- outputs


def test_heatmap_is_a_png_of_the_expected_size_and_csv_has_header(tmp_path):
    import matplotlib.image as mpimg

    r = np.array([[1.0, -0.5, np.nan], [0.3, 1.0, -1.0]])
    png, csv = tmp_path / "h" / "heat.png", tmp_path / "h" / "r.csv"
    save_correlation_heatmap(r, [0, 1], [0, 1, 2], png, "sequential: IPC=1, Z=3, N=3")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(png))
    assert img.shape[:2] == HEATMAP_SIZE_PX and img.shape[2] in (3, 4)
    save_correlation_csv(r, [0, 1], [0, 1, 2], csv)
    lines = csv.read_text().splitlines()
    assert lines[0] == "matched_epoch,0,1,2" and lines[1].startswith("0,1.000000,-0.500000,nan")
    assert sorted(p.name for p in png.parent.iterdir()) == ["heat.png", "r.csv"]  # no temp files left


# ---------------------------------------------------------------------------------------------- core pieces


def test_segment_loss_eval_equals_the_unroll_loss():
    spec = ModelSpec("convnet", num_classes=3, image_size=8, channels=3, width=4, depth=2)
    torch.manual_seed(0)
    model = build_model(spec).double()
    theta0 = flat_params(model)
    target = theta0 + 0.05 * torch.randn_like(theta0)
    images, targets = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.softmax(torch.randn(6, 3), 1).double()
    batches = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([5, 0, 2])]
    fwd = lambda t, x: functional_forward(model, t, x)  # noqa: E731
    flip = lambda x, seed: x.flip(-1) if seed % 2 else x  # noqa: E731
    lr = torch.tensor(0.07, dtype=torch.float64)
    ref = matching_loss(unroll(fwd, theta0, images.requires_grad_(True), targets, lr, batches, flip, [1, 2, 3]),
                        theta0, target)
    got = segment_loss_eval(fwd, theta0, target, images, targets, 0.07, batches, flip, [1, 2, 3])
    assert got == pytest.approx(ref.item(), rel=1e-12)
    assert images.grad is None


def test_fixed_start_changes_only_the_sampled_start():
    kw = dict(expert_ids=[0, 1], n_syn=10, batch_syn=4, syn_steps=5, beta=0.3, K=2, R=1, min_start=0, max_start=2)
    for it in range(20):
        a, b = make_plan(3, it, **kw), make_plan(3, it, fixed_start=7, **kw)
        assert b.sampled_start == 7 and b.students[0].weight == 0.3 and b.students[1:] == a.students[1:]
        assert a.expert_id == b.expert_id and a.aug_seeds == b.aug_seeds
        assert all(torch.equal(x, y) for x, y in zip(a.batches, b.batches))


def test_mode_config(setup):
    cfg = setup["cfg"]
    seq = mode_config(cfg, "sequential").distill
    assert (seq.K, seq.beta) == (0, 1.0) and cfg.distill.K == 2  # a copy
    con = mode_config(cfg, "concurrent").distill
    assert (con.K, con.beta) == (2, 0.2)
    cfg0 = load_config("tiny_cpu", {"distill": {"beta": 0.0}, "data": {"root": "x"}})
    with pytest.raises(ConfigError, match="distill.beta=0.0"):
        mode_config(cfg0, "concurrent")
    with pytest.raises(ConfigError, match="mode='x'"):
        mode_config(cfg, "x")


def test_reference_expert_id(setup):
    store = setup["store"]
    assert reference_expert_id(store) == REF and reference_expert_id(store, 0) == 0
    with pytest.raises(ConfigError, match="distill.reference_expert=7"):
        reference_expert_id(store, 7)


# ---------------------------------------------------------------------------------------------- τ_o held out


def test_reference_expert_is_never_used_by_the_distillation(setup):
    """Distillers read a store that fails on τ_o; only the monitor (given the real store) reads it."""
    guarded = RecordingStore(setup["store"], forbidden=REF)
    for mode in ("sequential", "concurrent"):
        dist = distiller_for(setup, guarded, mode, fixed_start=1)
        plans = [dist.plan(it) for it in range(200)]
        assert {p.expert_id for p in plans} == {0, 1}
        assert {p.sampled_start for p in plans} == {1}
    monitor = ForgettingMonitor(setup["store"], REF, [0, 1, 2], expert_epochs=1)
    losses = correlation_losses(lambda i: distiller_for(setup, guarded, "concurrent", i), monitor, [0, 2], Z=2)
    assert losses.shape == (2, 2, 3) and np.isfinite(losses).all()
    assert guarded.calls and all(e != REF for e, _ in guarded.calls)


def test_run_correlation_reads_reference_only_in_the_monitor(setup, tmp_path):
    from contra_ray.analyze.cli import run_correlation

    rec = RecordingStore(setup["store"])
    res = run_correlation(setup["cfg"], setup["data"], rec, ["sequential"], [0, 1, 2], 2, REF, tmp_path,
                          progress=False, warmup=2)
    first_other = next(k for k, (e, _) in enumerate(rec.calls) if e != REF)
    ref_calls = [c for c in rec.calls if c[0] == REF]
    assert sorted(ref_calls) == [(REF, e) for e in range(4)]  # θ*_j and θ*_{j+1}, j = 0..2: read once
    assert all(e != REF for e, _ in rec.calls[first_other:])  # ... before any distiller exists
    assert res["sequential"]["distill_experts"] == [0, 1] and res["sequential"]["warmup"] == 2


# ---------------------------------------------------------------------------------------------- monitor


def test_monitor_is_finite_and_does_not_change_the_synthetic_set(setup):
    store = setup["store"]
    a = distiller_for(setup, store, "concurrent", fixed_start=None)
    b = distiller_for(setup, store, "concurrent", fixed_start=None)
    monitor = ForgettingMonitor(store, REF, [0, 2], expert_epochs=1, seed=5)
    a.step()
    b.step()
    before = [t.detach().clone() for t in (a.images, a.label_logits, a.syn_lr, a.images.grad)]
    out = monitor(a)
    assert list(out) == ["monitor_loss_epoch_0", "monitor_loss_epoch_2"]
    assert all(np.isfinite(v) and v > 0 for v in out.values())
    after = [t.detach() for t in (a.images, a.label_logits, a.syn_lr, a.images.grad)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert monitor(a) == out  # fixed evaluation plan: the same set gives the same losses
    a.step()  # the monitored run continues exactly as an unmonitored one
    b.step()
    assert torch.equal(a.images, b.images) and torch.equal(a.syn_lr, b.syn_lr)
    with pytest.raises(ConfigError, match="distill.monitor_epochs"):
        ForgettingMonitor(store, REF, [0, 4], expert_epochs=1)


def test_run_distillation_holds_out_and_monitors(setup):
    cfg = load_config("tiny_cpu", {**tiny_overrides(setup["root"], setup["root"]),
                                   "name": "monitored"})
    cfg.distill.monitor_every, cfg.distill.monitor_epochs = 2, [0, 3]
    logged = []

    class Logger:
        def log_metrics(self, m, step=0):
            logged.append((step, dict(m)))

    guarded = RecordingStore(setup["store"])
    artifact, history = run_distillation(cfg, setup["data"], guarded, Logger(), resume=False, progress=False)
    assert artifact.meta["expert_ids"] == [0, 1]
    assert len(history["monitor_loss_epoch_0"]) == 1 and np.isfinite(history["monitor_loss_epoch_3"]).all()
    mon = [(s, m) for s, m in logged if "monitor_loss_epoch_0" in m]
    assert [s for s, _ in mon] == [2] and set(mon[0][1]) == {"monitor_loss_epoch_0", "monitor_loss_epoch_3"}
    ref_calls = [c for c in guarded.calls if c[0] == REF]
    assert sorted(ref_calls) == [(REF, 0), (REF, 1), (REF, 3), (REF, 4)]  # the monitor's reads only


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_correlation_end_to_end(setup, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from contra_ray.analyze.cli import main

    root = setup["root"]
    sets = [f"data.root={root / 'images'}", "data.dataset=imagefolder", f"data.cache_dir={root / 'cache'}",
            "data.train_per_class=null", "model.width=4", "model.depth=2", f"experts.epochs={EPOCHS}",
            "threads=1"] + [f"distill.{k}={v}" for k, v in tiny_overrides(root, root)["distill"].items()]
    out = tmp_path / "corr"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["correlation", "--preset", "tiny_cpu", "--output-dir", str(tmp_path), "--tracking-uri", uri,
               "--experts", str(setup["cfg"].expert_store()), "--no-train-experts", "--mode", "both",
               "--epochs", "0:3", "--Z", "3", "--out", str(out)] + sum((["--set", s] for s in sets), []))
    assert rc == 0
    text = capsys.readouterr().out
    assert "mean r lower" in text and "sequential" in text and "concurrent" in text
    for mode in ("sequential", "concurrent"):
        assert (out / f"correlation_{mode}.csv").read_text().startswith("matched_epoch,0,1,2\n")
        assert (out / f"correlation_{mode}.png").read_bytes()[:4] == b"\x89PNG"
        summary = json.loads((out / f"correlation_{mode}.json").read_text())
        assert summary["mode"] == mode and summary["reference_expert"] == REF and summary["Z"] == 3
        assert np.array(summary["losses"]).shape == (3, 3, 3)
        assert set(summary["lower"]) == {"entries", "nan", "mean_r", "frac_negative"}
    assert json.loads((out / "correlation_concurrent.json").read_text())["K"] == 2
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("contra_ray").experiment_id])
    assert run.info.status == "FINISHED" and "sequential_lower_mean_r" in run.data.metrics
    assert run.data.params["analysis.reference_expert"] == str(REF)
    names = {f.path for f in client.list_artifacts(run.info.run_id, "correlation")}
    assert {f"correlation/correlation_{m}.{e}" for m in ("sequential", "concurrent")
            for e in ("csv", "png", "json")} <= names


@pytest.mark.parametrize("flags, message", [(["--epochs", "0:1"], "--epochs='0:1': one epoch has no pair to correlate"),
                                            (["--epochs", "3:2"], "need 0 <= i0 < i1"),
                                            (["--Z", "2"], "expected an integer >= 3"),
                                            (["--warmup", "-1"], "expected a non-negative integer, got -1"),
                                            (["--reference-expert", "-2"], "expected a non-negative integer")])
def test_cli_correlation_refuses_spans_and_counts_that_give_no_correlation(tmp_path, capsys, monkeypatch, flags,
                                                                            message):
    """A user finding: --epochs 0:1 ran 83 s, then printed NaN; each is now refused before any work."""
    from contra_ray.analyze import cli as analyze

    patch_everywhere(monkeypatch, "contra_ray.data.prepare.prepare_data", lambda *a, **k: pytest.fail("work started"))
    try:
        rc = analyze.main(["correlation", "--preset", "tiny_cpu", "--output-dir", str(tmp_path), "--no-tracking",
                           *flags])
    except SystemExit as e:  # argparse type errors
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err


def test_monitor_inputs_are_checked_against_the_store_before_distillation(setup):
    import copy

    from contra_ray.experts.remote import ensure_experts
    from contra_ray.experts.store import ExpertStoreError

    cfg = copy.deepcopy(setup["cfg"])
    cfg.distill.monitor_every, cfg.distill.monitor_epochs = 1, [1, EPOCHS]
    cfg.validate()  # a given store may hold any number of epochs: only the store can tell
    with pytest.raises(ExpertStoreError, match=rf"distill.monitor_epochs=\[1, {EPOCHS}\]: the largest \+ "
                                               rf"distill.expert_epochs = {EPOCHS + 1} needs {EPOCHS + 1} saved "
                                               rf"epochs, store has {EPOCHS}"):
        ensure_experts(cfg, setup["data"], train_missing=False)
    cfg.distill.monitor_epochs, cfg.distill.reference_expert = [], 7
    with pytest.raises(ConfigError, match="distill.reference_expert=7"):
        ensure_experts(cfg, setup["data"], train_missing=False)
    cfg.distill.monitor_epochs, cfg.distill.reference_expert = [EPOCHS - 1], None
    assert ensure_experts(cfg, setup["data"], train_missing=False).epochs == EPOCHS
