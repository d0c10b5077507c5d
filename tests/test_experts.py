"""Expert training, sample orders, the expert store and the Ray fan-out (tiny ConvNets, 8x8 images)."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from contra_ray import experts as ex
from contra_ray.common.seeds import derive_seed
from contra_ray.config import Config, ExpertConfig
from contra_ray.data.loaders import TensorBatchLoader
from contra_ray.experts import remote as experts_ray
from contra_ray.experts import store as expert_store
from contra_ray.experts.curriculum import CurriculumOrder, ShuffledOrder, difficulty_from_first_correct
from contra_ray.experts.remote import train_experts
from contra_ray.experts.store import ExpertStore, ExpertStoreError
from contra_ray.experts.training import first_correct_epoch, train_expert
from contra_ray.models import ModelSpec, build_model, flat_params, functional_forward
from helpers import toy_data

SPEC = ModelSpec("convnet", num_classes=4, image_size=8, channels=3, width=8, depth=2)
CFG = ExpertConfig(epochs=3, lr=0.05, momentum=0.9, batch_size=32, dsa=False, eval_every=1)


@pytest.fixture(scope="module")
def data():
    train_x, train_y = toy_data(200, 1)
    test_x, test_y = toy_data(100, 2)
    return train_x, train_y, test_x, test_y


def flip_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip drawn from ``generator`` (stands in for DSA)."""
    flip = torch.rand(len(x), generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def full_loss(flat, x, y):
    with torch.no_grad():
        return F.cross_entropy(functional_forward(build_model(SPEC), flat, x), y).item()


META = {"model_spec": SPEC.to_dict(), "epochs": 3, "dataset_id": "toy-8px", "content_hash": "abc123",
        "zca": True, "zca_eps": 0.1, "preprocessor_fingerprint": "fp-1", "classes": ["a", "b", "c", "d"]}


# ---------------------------------------------------------------------------------------------- orders


def test_shuffled_order_is_a_fresh_permutation_each_epoch():
    order, g = ShuffledOrder(50), torch.Generator().manual_seed(0)
    e0, e1 = order.epoch_indices(0, g), order.epoch_indices(1, g)
    assert e0.dtype == torch.long and torch.equal(torch.sort(e0).values, torch.arange(50))
    assert torch.equal(torch.sort(e1).values, torch.arange(50))
    assert not torch.equal(e0, e1)
    assert isinstance(order, ex.SampleOrder)


def test_curriculum_sizes_follow_pacing_and_hold_only_easiest():
    n = 200
    rank = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    order, g = CurriculumOrder(rank, lam=0.3, gamma=5), torch.Generator().manual_seed(0)
    # h(e) = min(1, 0.3 + 0.7 e / 5): 0.3, 0.44, 0.58, 0.72, 0.86, 1, 1 -> ceil(h * 200)
    expected = [60, 88, 116, 144, 172, 200, 200]
    for e, size in enumerate(expected):
        idx = order.epoch_indices(e, g)
        assert order.size(e) == size and len(idx) == size
        assert len(set(idx.tolist())) == size
        assert set(idx.tolist()) == set(torch.nonzero(rank < size).flatten().tolist())
    assert order.pacing(2) == pytest.approx(0.58)
    # ceil, not round: λ = 0.25 of 10 samples -> 3
    assert CurriculumOrder(torch.arange(10), lam=0.25, gamma=4).size(0) == 3
    # shuffled within the easy subset, differently each epoch
    a, b = order.epoch_indices(0, g), order.epoch_indices(0, g)
    assert not torch.equal(a, b)


def test_curriculum_rejects_bad_arguments():
    with pytest.raises(ValueError, match="permutation"):
        CurriculumOrder(torch.tensor([0, 0, 1]), 0.5, 2)
    with pytest.raises(ValueError, match="curriculum_lambda=0"):
        CurriculumOrder(torch.arange(3), 0.0, 2)
    with pytest.raises(ValueError, match="curriculum_gamma=0"):
        CurriculumOrder(torch.arange(3), 0.5, 0)


def test_difficulty_from_first_correct_ranks_earlier_as_easier_ties_by_index():
    rank = difficulty_from_first_correct(torch.tensor([3, 1, 1, 0, 5]))
    assert rank.tolist() == [3, 1, 2, 0, 4]
    with pytest.raises(ValueError, match="negative"):
        difficulty_from_first_correct(torch.tensor([0, -1]))


# ---------------------------------------------------------------------------------------------- train_expert


def test_trajectory_shape_init_and_eval_schedule(data):
    cfg = dataclasses.replace(CFG, eval_every=2)
    traj, acc = train_expert(0, 7, *data, SPEC, cfg)
    torch.manual_seed(7)
    init = flat_params(build_model(SPEC))
    assert traj.dtype == torch.float32 and traj.shape == (4, init.numel())
    assert torch.equal(traj[0], init)
    assert not torch.equal(traj[1], traj[0])
    assert len(acc) == 3 and math.isnan(acc[0])
    assert 0.0 <= acc[1] <= 1.0 and 0.0 <= acc[2] <= 1.0  # epoch 2 (eval_every) and the last
    # eval_every=0: only the last epoch
    _, acc0 = train_expert(0, 7, *data, SPEC, dataclasses.replace(CFG, eval_every=0, epochs=2))
    assert math.isnan(acc0[0]) and not math.isnan(acc0[1])


def test_deterministic_for_a_seed_with_augmentation(data):
    cfg = dataclasses.replace(CFG, dsa=True, epochs=2)
    calls = []

    def aug(x, g):
        calls.append(len(x))
        return flip_augment(x, g)

    a, acc_a = train_expert(0, 11, *data, SPEC, cfg, augment=aug)
    b, acc_b = train_expert(0, 11, *data, SPEC, cfg, augment=aug)
    c, _ = train_expert(0, 12, *data, SPEC, cfg, augment=aug)
    assert torch.equal(a, b) and acc_a == acc_b
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[-1], c[-1])
    assert sum(calls) == 3 * 2 * 200  # every real sample augmented, every epoch, in all three runs
    noaug, _ = train_expert(0, 11, *data, SPEC, cfg)  # dsa but no augment given: plain training
    assert torch.equal(noaug[0], a[0]) and not torch.equal(noaug[-1], a[-1])


def test_training_lowers_train_loss_and_learns(data):
    train_x, train_y, _, _ = data
    stats = []
    traj, acc = train_expert(0, 0, *data, SPEC, CFG, progress=stats.append)
    before, after = full_loss(traj[0], train_x, train_y), full_loss(traj[-1], train_x, train_y)
    assert after < 0.5 * before, (before, after)
    assert acc[-1] > 0.6  # 4 classes: chance is 0.25
    assert [s.epoch for s in stats] == [1, 2, 3] and stats[-1].train_loss < stats[0].train_loss
    assert "epoch   3/3" in stats[-1].line()


def test_curriculum_order_and_loader_seam(data):
    train_x, train_y, test_x, test_y = data

    class RecordingLoader(TensorBatchLoader):
        def __init__(self, *a):
            super().__init__(*a)
            self.epochs = []

        def batches(self, indices):
            self.epochs.append(indices.clone())
            yield from super().batches(indices)

    loader = RecordingLoader(train_x, train_y, 32)
    rank = torch.randperm(200, generator=torch.Generator().manual_seed(5))
    order = CurriculumOrder(rank, lam=0.5, gamma=2)
    traj, _ = train_expert(0, 0, None, None, test_x, test_y, SPEC, CFG, order=order, loader=loader)
    assert [len(e) for e in loader.epochs] == [100, 150, 200]
    assert set(loader.epochs[0].tolist()) == set(torch.nonzero(rank < 100).flatten().tolist())
    assert traj.shape[0] == 4
    first = first_correct_epoch(SPEC, traj, train_x, train_y)
    assert first.shape == (200,) and int(first.min()) >= 0 and int(first.max()) <= 4
    final_correct = build_model(SPEC)
    with torch.no_grad():
        pred = functional_forward(final_correct, traj[-1], train_x).argmax(1)
    assert bool((first[pred == train_y] <= 3).all())  # correct at the last row -> first correct <= 3
    assert torch.equal(torch.sort(difficulty_from_first_correct(first)).values, torch.arange(200))


# ---------------------------------------------------------------------------------------------- store


@pytest.fixture(scope="module")
def trajectories(data):
    return [train_expert(i, i, *data, SPEC, CFG) for i in range(2)]


def test_store_round_trip_lazy_params_and_index(tmp_path, trajectories, monkeypatch):
    pre = {"mean": torch.arange(3.0), "zca_matrix": torch.eye(4)}
    store = ExpertStore.create(tmp_path / "st", META, pre)
    for i, (traj, acc) in enumerate(trajectories):
        store.add(i, 100 + i, traj, acc)
    monkeypatch.setattr(expert_store, "load_file", lambda *a, **k: pytest.fail("params must not load the whole file"))
    opened = ExpertStore.open(tmp_path / "st")
    assert opened.expert_ids == [0, 1] and opened.epochs == 3
    for i, (traj, _acc) in enumerate(trajectories):
        for e in range(4):
            p = opened.params(i, e)
            assert p.dtype == torch.float32 and torch.equal(p, traj[e])
        start, end = opened.segment(i, 1, 2)
        assert torch.equal(start, traj[1]) and torch.equal(end, traj[3])
    monkeypatch.undo()
    idx = opened.index
    assert idx["expert_id"].tolist() == [0, 1] and idx["seed"].tolist() == [100, 101]
    assert list(idx.loc[0, "test_acc"]) == pytest.approx(trajectories[0][1])
    assert json.loads(idx.loc[0, "model_spec"]) == SPEC.to_dict()
    assert idx.loc[1, "file"] == "expert_0001.safetensors" and len(idx.loc[1, "sha256"]) == 64
    assert bool(idx.loc[0, "zca"]) and idx.loc[0, "preprocessor_fingerprint"] == "fp-1"
    assert opened.meta["dataset_id"] == "toy-8px" and opened.meta["classes"] == ["a", "b", "c", "d"]
    state = opened.preprocessor_state()
    assert torch.equal(state["mean"], pre["mean"]) and torch.equal(state["zca_matrix"], pre["zca_matrix"])
    with safe_open(str(tmp_path / "st" / "expert_0000.safetensors"), "pt") as f:
        assert f.metadata()["seed"] == "100" and f.metadata()["dataset_id"] == "toy-8px"
        assert list(f.keys()) == ["trajectory"]
    assert not list((tmp_path / "st").glob(".*tmp*"))  # atomic writes leave no temp files
    opened.verify(0)
    opened.verify(1)


def test_store_errors_name_the_problem(tmp_path, trajectories):
    with pytest.raises(ExpertStoreError, match=str(tmp_path / "nope")):
        ExpertStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertStoreError, match="no store.json"):
        ExpertStore.open(tmp_path / "empty")
    with pytest.raises(ExpertStoreError, match="missing content_hash"):
        ExpertStore.create(tmp_path / "bad", {k: v for k, v in META.items() if k != "content_hash"}, {})
    store = ExpertStore.create(tmp_path / "st", META, {})
    with pytest.raises(ExpertStoreError, match="already exists"):
        ExpertStore.create(tmp_path / "st", META, {})
    traj, acc = trajectories[0]
    with pytest.raises(ExpertStoreError, match="expected \\[epochs \\+ 1 = 4, P\\]"):
        store.add(0, 0, traj[:3], acc)
    store.add(0, 0, traj, acc)
    with pytest.raises(ExpertStoreError, match="expert_id=5"):
        store.params(5, 0)
    with pytest.raises(ExpertStoreError, match="epoch=4 is outside the saved epochs 0..3"):
        store.params(0, 4)
    with pytest.raises(ExpertStoreError, match="start \\+ M=4"):
        store.segment(0, 2, 2)


def test_checksum_detects_corruption(tmp_path, trajectories):
    store = ExpertStore.create(tmp_path / "st", META, {})
    store.add(0, 0, *trajectories[0])
    store.verify(0)
    f = tmp_path / "st" / "expert_0000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the tensor data
    f.write_bytes(bytes(raw))
    with pytest.raises(ExpertStoreError, match="checksum mismatch for expert_0000.safetensors"):
        ExpertStore.open(tmp_path / "st").verify(0)
    assert not store.is_valid(0)


@pytest.mark.parametrize("spec, dataset, zca, epochs, fp, message", [
    (ModelSpec("resnet18", 4, 8, 3, 8, 2), "toy-8px", True, 3, None,
     "was built for model.name='convnet', config asks for 'resnet18'"),
    (dataclasses.replace(SPEC, width=16), "toy-8px", True, 3, None, "model.width=8, config asks for 16"),
    (dataclasses.replace(SPEC, depth=1), "toy-8px", True, 3, None, "model.depth=2, config asks for 1"),
    (dataclasses.replace(SPEC, norm="batchnorm"), "toy-8px", True, 3, None,
     "model.norm='instancenorm', config asks for 'batchnorm'"),
    (dataclasses.replace(SPEC, pooling="maxpooling"), "toy-8px", True, 3, None,
     "model.pooling='avgpooling', config asks for 'maxpooling'"),
    (SPEC, "cifar10", True, 3, None, "dataset_id='toy-8px', config asks for 'cifar10'"),
    (SPEC, "toy-8px", False, 3, None, "data.zca=True, config asks for False"),
    (SPEC, "toy-8px", True, 3, "fp-2", "preprocessor fingerprint='fp-1', config asks for 'fp-2'"),
    (SPEC, "toy-8px", True, 5, None,
     "distill.max_start_epoch \\+ distill.expert_epochs = 5 needs 5 saved epochs, store has 3"),
])
def test_check_compatible_names_field_and_values(tmp_path, spec, dataset, zca, epochs, fp, message):
    store = ExpertStore.create(tmp_path / "st", META, {})
    store.check_compatible(SPEC, "toy-8px", True, 3, "fp-1")  # the matching config passes
    store.check_compatible(SPEC, None, True, 2)
    with pytest.raises(ExpertStoreError, match=message) as err:
        store.check_compatible(spec, dataset, zca, epochs, fp)
    assert str(tmp_path / "st") in str(err.value)


def test_store_written_before_model_spec_had_norm_fields_still_matches(tmp_path):
    old_spec = {k: v for k, v in SPEC.to_dict().items() if k not in ("norm", "activation", "pooling")}
    created = ExpertStore.create(tmp_path / "st", META, {})
    (tmp_path / "st" / "store.json").write_text(json.dumps({**created.meta, "model_spec": old_spec}))
    store = ExpertStore.open(tmp_path / "st")
    assert store.meta["model_spec"] == old_spec and store.model_spec == SPEC
    store.check_compatible(SPEC, "toy-8px", True, 3, "fp-1")
    experts_ray._refuse_incompatible(store, {**META, "model_spec": SPEC.to_dict()})  # resuming it is allowed
    with pytest.raises(ExpertStoreError, match="model.norm='instancenorm', config asks for 'layernorm'"):
        store.check_compatible(dataclasses.replace(SPEC, norm="layernorm"), None, True, 3)


# ---------------------------------------------------------------------------------------------- Ray


def test_train_experts_parallel_resume_and_refusal(tmp_path, data, ray_local):
    cfg = Config()
    cfg.experts = dataclasses.replace(CFG, num_experts=2, epochs=2, seed=40, store=str(tmp_path / "experts"),
                                      cpus_per_expert=1.0)
    calls = []

    def order_factory(expert_id):
        calls.append(expert_id)
        return ShuffledOrder(200)

    meta = {k: v for k, v in META.items() if k not in ("model_spec", "epochs")}
    store = train_experts(cfg, *data, SPEC, meta, {"mean": torch.zeros(3)}, order_factory=order_factory)
    assert sorted(calls) == [0, 1] and store.expert_ids == [0, 1]
    seeds = [derive_seed(40, "expert", 0), derive_seed(40, "expert", 1)]  # seed roles (contra_ray.common.seeds)
    assert store.index["seed"].tolist() == seeds
    t0, t1 = store.trajectory(0), store.trajectory(1)
    assert t0.shape == (3, t1.shape[1]) and not torch.equal(t0, t1)
    local, acc = train_expert(0, seeds[0], *data, SPEC, cfg.experts)  # a Ray task computes what a local call does
    assert torch.equal(local, t0) and list(store.index.loc[0, "test_acc"]) == pytest.approx(acc)
    assert store.meta["recipe"]["lr"] == 0.05 and store.meta["epochs"] == 2

    calls.clear()  # rerun: everything saved and valid -> nothing trains
    again = train_experts(cfg, *data, SPEC, meta, {"mean": torch.zeros(3)}, order_factory=order_factory)
    assert calls == [] and again.expert_ids == [0, 1]

    f = tmp_path / "experts" / "expert_0001.safetensors"  # corrupt one -> only it is retrained
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="expert 1 fails its checksum"):
        fixed = train_experts(cfg, *data, SPEC, meta, {"mean": torch.zeros(3)}, order_factory=order_factory)
    assert calls == [1]
    fixed.verify(1)
    assert torch.equal(fixed.trajectory(1), t1)

    cfg.experts.lr = 0.1
    with pytest.raises(ExpertStoreError, match="experts.lr=0.05, config asks for 0.1"):
        train_experts(cfg, *data, SPEC, meta, {}, order_factory=order_factory)


@pytest.mark.parametrize("experts, message", [({"num_experts": 3, "epochs": 8},
                                               r"experts.num_experts=3: the store .* holds 2 expert\(s\) "
                                               r"\(ids \[0, 1\]\)"),
                                              ({"num_experts": 2, "epochs": 4},
                                               "experts.epochs=4: the store .* holds 8-epoch trajectories; "
                                               "set experts.epochs=8")])
def test_an_existing_store_that_differs_from_the_config_is_refused_without_training(tmp_path, monkeypatch, experts,
                                                                                    message):
    """A user finding: num_experts / epochs above the store's were recorded in the run but never used."""
    from contra_ray.config import load_config
    from contra_ray.experts import remote as stages
    from contra_ray.experts.store import ExpertStoreError

    class Stored:
        expert_ids, epochs = [0, 1], 8

    monkeypatch.setattr("contra_ray.experts.store.ExpertStore.open", lambda path: Stored())
    cfg = load_config("tiny_cpu", {"experts": experts, "output_dir": str(tmp_path)})
    with pytest.raises(ExpertStoreError, match=message):
        stages.ensure_experts(cfg, data=None, train_missing=False)
