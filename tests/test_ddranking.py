"""DD-Ranking's fair protocol: the score formulas (hand-computed known answers and ddranking's own numbers), the
soft labels' teacher, and ``evaluate --protocol dd-ranking`` end to end on the real output of ``distill``."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contra_ray.config import load_config
from contra_ray.distill.artifact import DistilledSet
from contra_ray.distill.distiller import Distiller
from contra_ray.evaluate.ddranking import (
    augmentation_robust_score,
    dd_ranking_scores,
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
    robust_score,
)
from contra_ray.evaluate.fair import teacher_logits
from contra_ray.experts.store import ExpertStore
from contra_ray.models import ModelSpec, build_model, flat_params
from helpers import CIFAR_TARBALL

FIXTURES = Path(__file__).parent / "fixtures"
E, E_1 = math.e, math.exp(-1)


def test_scores_match_hand_computed_values_of_the_published_definitions():
    # LRS = (e^α − e^−1)/(e − e^−1), α = w·IOR − (1 − w)·HLR; ARS the same of β = γ·with + (1 − γ)·without
    assert robust_score(-1) == 0.0 and robust_score(1) == pytest.approx(1.0, abs=1e-15)
    assert robust_score(0) == pytest.approx(1 / (1 + E), abs=1e-15)  # (1 − e^−1)/(e − e^−1) = 1/(e + 1) = 0.268941
    # real 0.80, syn hard 0.50, syn soft 0.60, random soft 0.40: HLR 0.30, IOR 0.20, α = 0.1 − 0.15 = −0.05,
    # LRS = (0.951229 − 0.367879)/(2.718282 − 0.367879) = 0.583350/2.350402 = 0.248192
    hlr, ior = hard_label_recovery(0.80, 0.50), improvement_over_random(0.60, 0.40)
    assert (hlr, ior) == (pytest.approx(0.30), pytest.approx(0.20))
    assert label_robust_score(hlr, ior) == pytest.approx(0.2481915, abs=1e-7)
    assert label_robust_score(0.0, 1.0, weight=1.0) == pytest.approx(1.0)  # w = 1: IOR alone
    assert label_robust_score(1.0, 1.0, weight=0.0) == 0.0  # w = 0: −HLR alone
    # ARS: with aug 0.10, without 0.30, γ 0.5: β = 0.2, (1.221403 − 0.367879)/2.350402 = 0.363139
    assert augmentation_robust_score(0.10, 0.30) == pytest.approx(0.3631392, abs=1e-7)
    assert augmentation_robust_score(0.10, 0.30, gamma=1.0) == pytest.approx(robust_score(0.10))
    for bad in (lambda: hard_label_recovery(80.0, 50.0), lambda: robust_score(1.5), lambda: robust_score(math.nan),
                lambda: label_robust_score(0.1, 0.1, weight=2), lambda: dd_ranking_scores(0.8, [0.5], [], [], [], [],
                                                                                          [], [])):
        with pytest.raises(ValueError):
            bad()


def test_scores_are_per_run_then_averaged():
    """LRS is averaged over runs (as the reference's ``np.mean(lrs_list)``), not LRS of mean accuracies."""
    s = dd_ranking_scores(0.8, [0.2, 0.8], [0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.5, 0.5])
    assert s.hlr == pytest.approx([0.6, 0.0]) and s.ior == pytest.approx([0.8, -0.8])
    lrs = [(math.exp(0.5 * 0.8 - 0.5 * 0.6) - E_1) / (E - E_1), (math.exp(-0.4) - E_1) / (E - E_1)]
    assert s.lrs == pytest.approx(lrs)
    assert s.summary()["lrs"] == (pytest.approx(sum(lrs) / 2), pytest.approx(abs(lrs[0] - lrs[1]) / 2))
    assert s.summary()["lrs"][0] != pytest.approx(label_robust_score(0.3, 0.0))  # LRS of the mean accuracies
    assert s.ars == pytest.approx([robust_score(0.4), robust_score(-0.4)])


def test_scores_equal_ddranking_own_implementation():
    """Against ``ddranking`` 0.2.0's own ``LabelRobustScoreSoft.compute_metrics`` and
    ``AugmentationRobustScore.compute_metrics``: tests/fixtures/ddranking_reference.json was made by
    ``/work/tools/ddr/bin/python tests/fixtures/make_ddranking_reference.py > tests/fixtures/ddranking_reference.json``
    in a separate venv (``pip install ddranking==0.2.0``: it pins numpy<2, scipy<1.16), which calls those methods
    with their training helpers replaced by the cases' accuracies (see that script). CI compares with the
    recorded numbers only."""
    ref = json.loads((FIXTURES / "ddranking_reference.json").read_text())
    assert ref["ddranking"] == "0.2.0" and len(ref["cases"]) == 4
    for c in ref["cases"]:
        s = dd_ranking_scores(c["real_hard"], c["syn_hard"], c["syn"], c["random"], c["syn_aug"], c["random_aug"],
                              c["syn_no_aug"], c["random_no_aug"], weight=c["weight"], gamma=c["gamma"]).summary()
        r = c["reference"]
        for ours, theirs in (("hlr", "hard_label_recovery"), ("ior", "improvement_over_random"),
                             ("lrs", "label_robust_score"), ("ars_with_aug", "with_aug_scores"),
                             ("ars_without_aug", "without_aug_scores"), ("ars", "augmentation_robust_score")):
            assert s[ours] == (pytest.approx(r[f"{theirs}_mean"], abs=1e-12),
                               pytest.approx(r[f"{theirs}_std"], abs=1e-12)), (c["name"], ours)


SPEC = ModelSpec("convnet", num_classes=3, image_size=8, channels=3, width=4, depth=2)


class _Store:
    """In-memory expert store: trajectory of expert i at epoch e = θ0 + 0.01·(e + i)·noise."""

    def __init__(self, epochs=6):
        torch.manual_seed(0)
        theta = flat_params(build_model(SPEC))
        noise = torch.randn_like(theta)
        self.expert_ids = [0, 1]
        self.traj = {i: [theta + 0.01 * (e + i) * noise for e in range(epochs + 1)] for i in self.expert_ids}

    def params(self, expert_id, epoch):
        return self.traj[expert_id][epoch]


def test_teacher_reproduces_the_distillers_soft_label_initialization():
    """The random-real side's teacher labels are the rule the set's labels were initialized with: expert
    ``expert_ids[0]`` at ``max_start_epoch``, class-consistent logits (some images here are misclassified)."""
    cfg = load_config("tiny_cpu", ["model.width=4", "model.depth=2", "distill.ipc=2", "distill.batch_syn=3",
                                   "distill.syn_steps=2", "distill.max_start_epoch=3", "distill.expert_epochs=1",
                                   "experts.epochs=6"])
    x, y = torch.randn(18, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(3).repeat_interleave(6)
    store = _Store()
    dist = Distiller(cfg, store, SPEC, x, y, expert_ids=[1, 0])
    assert dist.init_report.relabeled > 0  # the swap is exercised
    got = teacher_logits(store.params(1, 3), SPEC, dist.images.detach(), dist.hard_labels)
    assert torch.allclose(got, dist.label_logits.detach(), atol=1e-6)
    other = teacher_logits(store.params(0, 3), SPEC, dist.images.detach(), dist.hard_labels)
    assert not torch.allclose(other, dist.label_logits.detach(), atol=1e-3)  # another expert is another teacher


@pytest.mark.parametrize("soft", [True, False])
def test_protocol_trains_every_set_once_per_dsa_with_the_teachers_labels(monkeypatch, soft):
    """Which sets are trained with and without DSA, the random set's teacher labels, the pairing of runs; the
    training itself is replaced (evaluate_sets is the same code path as the default protocol)."""
    import types

    import torch.nn.functional as F

    from contra_ray.evaluate import fair

    calls, trained = [], {}
    base = {"syn_hard": 0.30, "syn_own": 0.50, "random_own": 0.40, "random_hard": 0.20}

    def fake_evaluate_sets(sets, models, spec, ecfg, test_x, test_y, **kw):
        calls.append(([es.method for es in sets], ecfg.dsa))
        trained.update({es.method: es for es in sets})
        return [], {(es.method, models[0]): [base[es.method] + 0.01 * ecfg.dsa, base[es.method]] for es in sets}

    monkeypatch.setattr(fair, "evaluate_sets", fake_evaluate_sets)
    cfg = load_config("tiny_cpu", ["eval.runs=2", "distill.max_start_epoch=3"])
    g = torch.Generator().manual_seed(2)
    train = types.SimpleNamespace(images=torch.randint(0, 256, (18, 3, 8, 8), dtype=torch.uint8, generator=g),
                                  labels=torch.arange(3).repeat_interleave(6))
    art = DistilledSet(images=torch.randn(6, 3, 8, 8, generator=g), label_logits=torch.randn(6, 3, generator=g),
                       hard_labels=torch.arange(3).repeat_interleave(2), syn_lr=0.01, soft=soft, preprocessor={},
                       meta={"model": SPEC.to_dict(), "ipc": 2, "expert_ids": [1, 0]})
    store = _Store()
    store.path, store.index = "/store", {"test_acc": [[math.nan, 0.5], [math.nan, 0.7], [0.1, math.nan]]}
    r = fair.run_fair_protocol(art, cfg, store, train, lambda x: x.float() / 255, None, None, model="convnet",
                               use_ray=False)
    assert r.real_hard == pytest.approx(0.6) and r.real_experts == 2  # final accuracies only, NaN skipped
    if soft:
        assert calls == [(["syn_hard", "syn_own", "random_own", "random_hard"], True),
                         (["syn_own", "random_own"], False)]
        assert r.teacher == (1, 3)
        rnd = trained["random_own"]
        assert torch.equal(rnd.images, trained["random_hard"].images)  # the same random real images
        classes = trained["random_hard"].targets.argmax(1)
        want = F.softmax(teacher_logits(store.params(1, 3), SPEC, rnd.images, classes), 1)
        assert torch.allclose(rnd.targets, want) and torch.equal(trained["syn_own"].targets, art.targets())
        assert r.scores.ior == pytest.approx([0.10, 0.10]) and r.accs["syn_own_nodsa"] == [0.50, 0.50]
    else:  # a hard-label set: its own labels are the hard ones; no teacher
        assert calls == [(["syn_hard", "random_hard"], True), (["syn_hard", "random_hard"], False)]
        assert r.teacher is None and r.accs["syn_own_dsa"] == r.accs["syn_hard"] == [0.31, 0.30]
        assert r.scores.ior == pytest.approx([0.10, 0.10]) and r.accs["random_own_nodsa"] == [0.20, 0.20]
    assert r.scores.hlr == pytest.approx([0.6 - 0.31, 0.6 - 0.30])
    assert fair.format_fair_table(r).count("\n") == 15 and fair.fair_metrics(r)["ddr_acc/real_hard"] == 60.0


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, cache_dir):
    """The real output of ``python -m contra_ray.distill --preset tiny_cpu`` (real CIFAR-10 subset)."""
    out = tmp_path_factory.mktemp("ddr")
    proc = subprocess.run([sys.executable, "-m", "contra_ray.distill", "--preset", "tiny_cpu", "--no-tracking",
                           "--set", f"data.cache_dir={cache_dir}", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tiny_cpu" / "distilled.safetensors"


_NUM = r"(-?\d+\.\d+)"
needs_cifar = pytest.mark.skipif(not CIFAR_TARBALL.exists(),
                                 reason=f"real CIFAR-10 tarball not found at {CIFAR_TARBALL}")


@needs_cifar
def test_cli_dd_ranking_protocol_on_the_distilled_tiny_set(distilled, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "contra_ray.evaluate", "--artifact", str(distilled), "--protocol",
                           "dd-ranking", "--runs", "1", "--epochs", "2", "--inline", "--tracking-uri", uri],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout

    def acc(name, dsa):
        m = re.search(rf"^{re.escape(name)}\s+{dsa}\s+{_NUM} ±\s+{_NUM}$", out, re.M)
        assert m, f"no line {name} / DSA {dsa} in:\n{out}"
        assert float(m.group(2)) == 0.0  # one run
        return float(m.group(1)) / 100

    def score(name):
        m = re.search(rf"^{re.escape(name)}\s+{_NUM} ±\s+{_NUM}\s", out, re.M)
        assert m, f"no score {name} in:\n{out}"
        return float(m.group(1))

    syn_hard, syn_on, syn_off = acc("Acc(syn, hard)", "on"), acc("Acc(syn, own labels)", "on"), \
        acc("Acc(syn, own labels)", "off")
    rnd_on, rnd_off, rnd_hard = acc("Acc(random, teacher)", "on"), acc("Acc(random, teacher)", "off"), \
        acc("Acc(random, hard)", "on")
    m = re.search(rf"^Acc\(real, hard\)\s+{_NUM}\s+full data: the experts' final test accuracy, mean of 2", out, re.M)
    assert m, out
    finals = [a[-1] for a in ExpertStore.open(distilled.parent / "experts").index["test_acc"]]
    real = sum(finals) / len(finals)
    assert float(m.group(1)) == pytest.approx(100 * real, abs=0.006)
    for a in (syn_hard, syn_on, syn_off, rnd_on, rnd_off, rnd_hard):
        assert 0.0 <= a <= 1.0
    # the scores, recomputed from the printed accuracies (rounded to 0.01 %: 1e-4 as fractions)
    hlr, ior = score("HLR"), score("IOR")
    assert hlr == pytest.approx(real - syn_hard, abs=2e-4) and ior == pytest.approx(syn_on - rnd_on, abs=2e-4)
    assert score("LRS") == pytest.approx((math.exp(0.5 * ior - 0.5 * hlr) - E_1) / (E - E_1), abs=2e-4)
    w_aug, wo_aug = score("ARS with aug"), score("ARS without aug")
    assert w_aug == pytest.approx(syn_on - rnd_on, abs=2e-4) and wo_aug == pytest.approx(syn_off - rnd_off, abs=2e-4)
    assert score("ARS") == pytest.approx((math.exp(0.5 * w_aug + 0.5 * wo_aug) - E_1) / (E - E_1), abs=2e-4)
    assert "w = 0.5" in out and "gamma = 0.5" in out and "teacher: expert 0 at epoch 2" in out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("contra_ray").experiment_id])
    m = run.data.metrics
    assert m["ddr/lrs"] == pytest.approx(score("LRS"), abs=1e-4)
    assert m["ddr/ars"] == pytest.approx(score("ARS"), abs=1e-4)
    assert m["ddr_acc/syn_hard"] == pytest.approx(100 * syn_hard, abs=0.006)
    assert m["ddr_acc/random_own_nodsa"] == pytest.approx(100 * rnd_off, abs=0.006)
    assert m["ddr_acc/real_hard"] == pytest.approx(100 * real) and m["ddr/lrs_weight"] == 0.5
    assert run.data.tags["contra_ray.role"] == "evaluate"


@needs_cifar
def test_cli_dd_ranking_without_the_expert_store_names_it(distilled, tmp_path, capsys):
    from contra_ray.evaluate.cli import main

    art = DistilledSet.load(distilled)
    art.meta["config"]["output_dir"] = str(tmp_path / "elsewhere")  # the store the set names is not there
    moved = tmp_path / "moved.safetensors"
    art.save(moved)
    with pytest.raises(SystemExit) as e:
        main(["--artifact", str(moved), "--protocol", "dd-ranking", "--no-tracking", "--inline"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: experts.store='{tmp_path / 'elsewhere' / 'tiny_cpu' / 'experts'}': --protocol dd-ranking needs" \
           in err and "does not exist" in err and "--experts PATH_OR_URI" in err and "Traceback" not in err
    store = distilled.parent / "experts"  # --experts points at the store wherever it is now
    got = main(["--artifact", str(moved), "--protocol", "dd-ranking", "--no-tracking", "--inline", "--runs", "1",
                "--epochs", "1", "--experts", str(store)])
    assert len(got["syn_hard"]) == 1 and len(got["random_own_nodsa"]) == 1
    assert f"teacher: expert 0 at epoch 2 of {store}" in capsys.readouterr().out
    for bad, why in ((["--experts", str(store)], "only --protocol dd-ranking reads an expert store"),
                     (["--experts", " ", "--protocol", "dd-ranking"], "give the expert store's folder or URI")):
        with pytest.raises(SystemExit) as e:
            main(["--artifact", str(moved), "--no-tracking", "--inline", *bad])
        assert e.value.code == 2 and why in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--artifact", str(distilled), "--protocol", "dd-ranking", "--models", "resnet18", "--no-tracking"])
    assert e.value.code == 2 and "--models=resnet18: --protocol dd-ranking" in capsys.readouterr().err
