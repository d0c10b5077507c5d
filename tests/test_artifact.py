import os

import pytest
import torch

from contra_ray.config import Config
from contra_ray.distill import artifact as art_mod
from contra_ray.distill.artifact import ArtifactError, DistilledSet, build_meta
from contra_ray.models import ModelSpec


def make_set(soft=True, seed=0, n_per_class=2, classes=3):
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * classes
    return DistilledSet(
        images=torch.randn(n, 3, 8, 8, generator=g),
        label_logits=torch.randn(n, classes, generator=g),
        hard_labels=torch.arange(classes).repeat_interleave(n_per_class),
        syn_lr=0.0123456789012345,
        soft=soft,
        preprocessor={"mean": torch.rand(3, generator=g), "std": torch.rand(3, generator=g),
                      "zca_matrix": torch.randn(192, 192, generator=g).double(), "zca": torch.tensor(True)},
        meta={"model": ModelSpec("convnet", classes, 8, 3, 8).to_dict(), "classes": ["a", "b", "c"],
              "zca": True, "image_size": 8, "channels": 3, "iteration": 7, "nested": {"x": [1, 2.5, None]},
              "nan_free_float": 0.1 + 0.2, "eval": {"epochs": 5}, "config": Config().to_dict(),
              "num_classes": classes, "ipc": n_per_class, "preprocessor_fingerprint": "fp",
              "dataset_id": "toy", "method": "contra"},
    )


def write_format1(path, meta):
    """A file as contra_ray 0.1 wrote it: format 1, the distiller's meta keys (model_spec, eval_recipe)."""
    import json

    from safetensors.torch import save_file

    s = make_set()
    save_file({"images": s.images, "label_logits": s.label_logits, "hard_labels": s.hard_labels,
               "preprocessor/mean": s.preprocessor["mean"]}, str(path),
              metadata={"contra_ray": json.dumps({"format": "contra_ray.distilled/1", "syn_lr": 0.01, "soft": True,
                                                  "meta": meta})})


def test_format1_file_of_the_old_distiller_is_upgraded(tmp_path):
    cfg = Config().to_dict()
    cfg["distill"]["ipc"] = 2
    old = {"method": "contra", "iteration": 4, "model_spec": ModelSpec("convnet", 3, 8, 3, 8).to_dict(),
           "dataset_id": "toy", "content_hash": "h", "classes": ["a", "b", "c"], "image_size": 8, "channels": 3,
           "zca": False, "zca_eps": 0.1, "preprocessor_fingerprint": "fp", "eval_recipe": {"epochs": 3},
           "config": cfg}
    write_format1(tmp_path / "old.safetensors", old)
    art = DistilledSet.load(tmp_path / "old.safetensors")
    assert art.model_spec() == ModelSpec("convnet", 3, 8, 3, 8, 3)  # was: "meta has no 'model' entry"
    assert art.meta["eval"] == {"epochs": 3} and art.meta["ipc"] == 2 and art.meta["num_classes"] == 3


def test_format1_file_missing_meta_names_what_is_missing(tmp_path):
    write_format1(tmp_path / "bare.safetensors", {"classes": ["a", "b", "c"]})
    with pytest.raises(ArtifactError, match=r"format 1, written by an older contra_ray\) lacks meta "
                                            r"\['model', 'eval', 'config'"):
        DistilledSet.load(tmp_path / "bare.safetensors")


def test_save_refuses_incomplete_meta_before_writing(tmp_path):
    s = make_set()
    del s.meta["eval"], s.meta["method"]
    with pytest.raises(ValueError, match=r"meta lacks \['eval', 'method'\]"):
        s.save(tmp_path / "x.safetensors")
    assert not any(tmp_path.iterdir())


def test_round_trip_is_bit_exact(tmp_path):
    s = make_set()
    p = tmp_path / "sub" / "set.safetensors"
    s.save(p)
    t = DistilledSet.load(p)
    for k in ("images", "label_logits", "hard_labels"):
        a, b = getattr(s, k), getattr(t, k)
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert t.preprocessor.keys() == s.preprocessor.keys()
    for k, v in s.preprocessor.items():
        assert t.preprocessor[k].dtype == v.dtype and torch.equal(t.preprocessor[k], v)
    assert t.syn_lr == s.syn_lr and t.soft is True
    assert t.meta == s.meta
    assert t.model_spec() == ModelSpec("convnet", 3, 8, 3, 8, 3)
    assert t.num_classes == 3 and t.ipc == 2
    assert sorted(os.listdir(p.parent)) == ["set.safetensors"]  # no temporary file left


def test_save_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "set.safetensors"
    make_set(seed=1).save(p)
    before = p.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(art_mod, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        make_set(seed=2).save(p)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["set.safetensors"]
    fresh = tmp_path / "new.safetensors"
    with pytest.raises(OSError):
        make_set().save(fresh)
    assert not fresh.exists()


def test_corrupt_or_missing_file_names_path(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ArtifactError, match="bad.safetensors"):
        DistilledSet.load(p)
    good = tmp_path / "good.safetensors"
    make_set().save(good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="trunc.safetensors"):
        DistilledSet.load(trunc)
    with pytest.raises(ArtifactError, match="missing.safetensors: no such file"):
        DistilledSet.load(tmp_path / "missing.safetensors")
    # a valid safetensors file that is not a contra_ray artifact
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ArtifactError, match="other.safetensors.*header"):
        DistilledSet.load(other)


def test_targets_soft_and_hard():
    s = make_set(soft=True)
    t = s.targets()
    assert t.shape == (6, 3) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    torch.testing.assert_close(t, torch.softmax(s.label_logits, 1))
    h = make_set(soft=False).targets()
    assert torch.equal(h, torch.tensor([[1., 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]))


def test_validate_rejects_bad_shapes(tmp_path):
    s = make_set()
    s.hard_labels = s.hard_labels[:-1]
    with pytest.raises(ValueError, match="hard_labels"):
        s.save(tmp_path / "x.safetensors")
    s = make_set()
    s.meta["path"] = tmp_path  # not JSON
    with pytest.raises(ValueError, match="JSON"):
        s.save(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_build_meta_keys():
    class Pre:
        zca = True

        def fingerprint(self):
            return "abc123"

    class Train:
        images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
        classes = ["a", "b"]
        dataset_id = "toy"
        content_hash = "h0"

    cfg = Config()
    m = build_meta(cfg, ModelSpec("convnet", 2, 8, 3, 8), Pre(), Train(), iteration=5)
    assert m["zca"] is True and m["preprocessor_fingerprint"] == "abc123"
    assert (m["image_size"], m["channels"], m["num_classes"], m["classes"]) == (8, 3, 2, ["a", "b"])
    assert m["train_content_hash"] == "h0" and m["dataset_id"] == "toy" and m["iteration"] == 5
    assert m["eval"] == cfg.to_dict()["eval"] and m["config"]["distill"]["ipc"] == 1
    assert m["method"] == "contra" and m["model"]["depth"] == 3


def test_real_preprocessor_survives_round_trip(tmp_path):
    data = pytest.importorskip("contra_ray.data")
    from contra_ray.config import DataConfig

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.arange(2).repeat(10)
    train = data.ImageSet(imgs, labels, ["a", "b"], "toy/train", data.content_hash(imgs, labels))
    pre = data.fit_preprocessor(train, DataConfig(zca=True, cache_dir=str(tmp_path / "cache")))
    cfg = Config()
    s = DistilledSet(pre(imgs[:4]), torch.zeros(4, 2), labels[:4].clone(), 0.01, True, pre.state_dict(),
                     build_meta(cfg, ModelSpec("convnet", 2, 4, 3, 8, 1), pre, train, iteration=0))
    s.save(tmp_path / "s.safetensors")
    t = DistilledSet.load(tmp_path / "s.safetensors")
    back = data.Preprocessor.from_state_dict(t.preprocessor)
    assert back.zca is True and back.fingerprint() == pre.fingerprint() == t.meta["preprocessor_fingerprint"]
    assert torch.equal(back(imgs), pre(imgs))
    assert t.meta["train_content_hash"] == train.content_hash and t.meta["image_size"] == 4
