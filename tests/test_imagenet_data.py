"""Tiny ImageNet in its published layout, ImageNet from an ImageFolder tree (resized), the on-disk
streamed cache (DiskImages / PreprocessedImages) and ZCA on a seeded sample."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contra_ray.common.seeds import derive_seed
from contra_ray.config import ConfigError, DataConfig, load_config
from contra_ray.data.disk_images import DiskImages, PreprocessedImages, write_npy
from contra_ray.data.imagenet import decode_resized
from contra_ray.data.preprocess import Preprocessor, fit_preprocessor
from contra_ray.data.sources import load_split
from helpers import WNIDS, make_tiny_imagenet


def pil_rgb(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def tiny_cfg(root, tmp_path, **kw):
    return DataConfig(dataset="tiny-imagenet", root=str(root), cache_dir=str(tmp_path / "cache"), zca=False, **kw)


# ---------------------------------------------------------------------------------------------- Tiny ImageNet


def test_tiny_imagenet_published_layout_labels_names_and_pixels(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    cfg = tiny_cfg(root, tmp_path)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    classes = sorted(WNIDS)  # labels index the sorted wnids, as ImageFolder would number them
    assert train.classes == test.classes == classes
    assert train.class_names == ["goldfish", "Chihuahua", "reel"] and train.names == train.class_names
    assert train.images.shape == (9, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.dataset_id == "tiny-imagenet/train" and test.dataset_id == "tiny-imagenet/test"
    files = [root / "train" / w / "images" / f"{w}_{i}.JPEG" for w in classes for i in range(3)]
    assert torch.equal(train.images, torch.stack([pil_rgb(f) for f in files]))  # grayscale -> RGB like PIL
    # val: labels from val_annotations.txt, listed class by class; the unlabelled test/ folder is not used
    ann = dict(line.split("\t")[:2] for line in (root / "val/val_annotations.txt").read_text().splitlines())
    assert len(test) == 6 and test.class_counts().tolist() == [2, 2, 2]
    expect = sorted(ann, key=lambda f: (classes.index(ann[f]), f))
    assert torch.equal(test.images, torch.stack([pil_rgb(root / "val/images" / f) for f in expect]))
    assert test.labels.tolist() == [classes.index(ann[f]) for f in expect]
    # the decoded cache is reused: a second load gives the same content hash without decoding
    assert load_split(cfg, "train").content_hash == train.content_hash


def test_tiny_imagenet_errors_name_the_path(tmp_path):
    root = make_tiny_imagenet(tmp_path / "t")
    ann = root / "val" / "val_annotations.txt"
    text = ann.read_text()

    ann.unlink()
    with pytest.raises(FileNotFoundError, match=f"{ann}.*is missing"):
        load_split(tiny_cfg(root, tmp_path), "test")

    ann.write_text(text.replace("val_0.JPEG\t", "val_0.JPEG\tn00000001\t0\t0\t1\t1\nignored\t", 1))
    with pytest.raises(ValueError, match=rf"{ann}:1: image val_0.JPEG is labelled 'n00000001', which is not a "
                                         rf"class of {root / 'wnids.txt'}"):
        load_split(tiny_cfg(root, tmp_path), "test")

    ann.write_text(text + "val_99.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(FileNotFoundError, match=rf"{ann}:7 lists val_99.JPEG, but {root / 'val/images/val_99.JPEG'} "
                                                "does not exist"):
        load_split(tiny_cfg(root, tmp_path), "test")

    ann.write_text(text)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "val/images/val_extra.JPEG")
    with pytest.raises(ValueError, match=rf"{root / 'val/images/val_extra.JPEG'} is not listed in {ann}"):
        load_split(tiny_cfg(root, tmp_path), "test")

    (root / "train" / WNIDS[1]).rename(root / "train" / "n00000002")
    with pytest.raises(ValueError, match=r"train holds other classes than .*wnids.txt: missing \['n01443537'\], "
                                         r"extra \['n00000002'\]"):
        load_split(tiny_cfg(root, tmp_path), "train")

    (root / "words.txt").write_text("n01443537\tgoldfish\n")
    with pytest.raises(ValueError, match=r"words.txt: no name for class id\(s\) \['n02085620', 'n04067472'\]"):
        load_split(tiny_cfg(root, tmp_path), "train")


def test_tiny_imagenet_streamed_and_resized(tmp_path):
    root = make_tiny_imagenet(tmp_path / "t")
    whole = load_split(tiny_cfg(root, tmp_path), "train")
    streamed = load_split(tiny_cfg(root, tmp_path, in_memory=False), "train")
    assert isinstance(streamed.images, DiskImages) and streamed.streamed
    assert streamed.content_hash == whole.content_hash and torch.equal(streamed.images[:], whole.images)
    small = load_split(tiny_cfg(root, tmp_path, resolution=32), "train")
    assert small.images.shape == (9, 3, 32, 32) and small.dataset_id == "tiny-imagenet@32px/train"


def test_presets_use_the_published_tiny_imagenet_and_imagenet(tmp_path):
    for name in ("tiny_ipc1", "tiny_ipc10", "tiny_ipc50"):
        cfg = load_config(name, [f"data.root={tmp_path}"])
        assert cfg.data.dataset == "tiny-imagenet" and cfg.model_spec(200, 64).resolved_depth() == 4
    for name, ipc in (("imagenet1k_ipc1", 1), ("imagenet1k_ipc10", 10)):
        cfg = load_config(name, [f"data.root={tmp_path}"])
        assert cfg.data.dataset == "imagenet" and cfg.distill.ipc == ipc and cfg.data.in_memory is False
    with pytest.raises(ConfigError, match="data.root=None: data.dataset=tiny-imagenet needs"):
        load_config("tiny_ipc1")
    with pytest.raises(ConfigError, match="data.resolution=32: resizing is only implemented"):
        load_config("tiny_cpu", ["data.resolution=32"])


# ---------------------------------------------------------------------------------------------- ImageNet tree


def make_imagefolder(root, classes, per_class, sizes=((40, 30), (30, 50)), splits=("train", "val"), seed=0):
    rng = np.random.default_rng(seed)
    for split, n in zip(splits, per_class):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[(i + len(c)) % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{c}_{i}.JPEG")
    return root


def test_imagenet_imagefolder_resized_like_torchvision_and_streamed(tmp_path):
    import torchvision.transforms as T

    root = make_imagefolder(tmp_path / "in", ["n01", "n02"], (3, 1))
    (root / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\n")
    cfg = DataConfig(dataset="imagenet", root=str(root), cache_dir=str(tmp_path / "c"), zca=False, resolution=16)
    train = load_split(cfg, "train")
    assert isinstance(train.images, DiskImages)  # imagenet streams by default
    assert train.dataset_id == "imagenet@16px/train" and train.class_names == ["tench", "goldfish"]
    tv = T.Compose([T.Resize(16), T.CenterCrop(16)])  # MTT's ImageNet transform, on PIL images
    files = sorted((root / "train").rglob("*.JPEG"))
    ref = torch.stack([torch.from_numpy(np.array(tv(Image.open(f).convert("RGB")))).permute(2, 0, 1) for f in files])
    assert torch.equal(train.images[:], ref)
    assert load_split(DataConfig(dataset="imagenet", root=str(root), cache_dir=str(tmp_path / "c")),
                      "test").images.shape == (2, 3, 64, 64)  # default resolution 64
    assert decode_resized(str(files[0]), 16).shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------- disk images


def test_disk_images_index_like_a_tensor_and_pickle_as_a_path(tmp_path):
    full = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    labels = np.arange(10) % 3
    digest = write_npy(tmp_path / "x.npy", tuple(full.shape), [full[:4].numpy(), full[4:].numpy()], labels)
    from contra_ray.data.sources import content_hash

    assert digest == content_hash(full, torch.from_numpy(labels))
    d = DiskImages(tmp_path / "x.npy")
    assert d.shape == full.shape and len(d) == 10 and d.dtype == torch.uint8
    idx = torch.tensor([7, 2, 2, 9, 0])
    assert torch.equal(d[idx], full[idx]) and torch.equal(d[3], full[3]) and torch.equal(d[-1], full[-1])
    assert torch.equal(d[2:8:2], full[2:8:2]) and torch.equal(d[torch.arange(10) > 6], full[7:])
    sub = d.take(torch.tensor([5, 1, 8]))
    assert torch.equal(sub[:], full[[5, 1, 8]]) and torch.equal(sub[torch.tensor([2, 0])], full[[8, 5]])
    assert torch.equal(torch.cat(list(d.split(3))), full)
    assert len(pickle.dumps(d)) < 500 and torch.equal(pickle.loads(pickle.dumps(sub))[:], sub[:])
    with pytest.raises(IndexError):
        d[10]
    with pytest.raises(ValueError, match="float32"):
        np.save(tmp_path / "f.npy", np.zeros((2, 3, 4, 4), np.float32))
        DiskImages(tmp_path / "f.npy")

    pre = Preprocessor(mean=torch.tensor([0.5, 0.4, 0.3]), std=torch.tensor([0.2, 0.3, 0.4]))
    lazy = pre(d)
    assert isinstance(lazy, PreprocessedImages) and lazy.shape == full.shape and lazy.cpu() is lazy
    assert torch.equal(lazy[idx], pre(full)[idx]) and torch.equal(lazy[4], pre(full)[4])
    assert torch.equal(torch.cat(list(lazy.split(4))), pre(full))
    with pytest.raises(TypeError, match="index or split it"):
        lazy.to("cpu")


def test_zca_on_a_seeded_sample_of_a_streamed_set(tmp_path):
    import kornia

    root = make_tiny_imagenet(tmp_path / "t", train_per_class=6, size=8)
    cfg = DataConfig(dataset="tiny-imagenet", root=str(root), cache_dir=str(tmp_path / "c"), in_memory=False,
                     zca=True, zca_samples=10)
    train = load_split(cfg, "train")
    pre = fit_preprocessor(train, cfg)
    idx = torch.randperm(18, generator=torch.Generator().manual_seed(derive_seed(0, "zca_sample")))[:10].sort().values
    ref = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(train.images[idx].float() / 255.0)
    assert torch.allclose(pre.zca_matrix, ref.transform_matrix, atol=1e-6)
    with pytest.raises(ValueError, match="data.zca_samples=None.*streamed"):
        fit_preprocessor(train, DataConfig(dataset="tiny-imagenet", root=str(root), cache_dir=str(tmp_path / "c"),
                                           in_memory=False, zca=True))


# ---------------------------------------------------------------------- read-through on nodes sharing no folder


def test_streamed_set_read_through_from_object_storage(tmp_path, s3_bucket, monkeypatch):
    """The driver publishes a streamed set's decoded folder (prepare_data with a URI output_dir); a process on
    a node without that folder (here: the folder moved away) fills it from the bucket before its first read,
    verified by content hash, once; a corrupt remote copy fails by name and leaves nothing behind."""
    import shutil
    import threading

    from contra_ray.common import storage
    from contra_ray.config import config_from_dict
    from contra_ray.data.imagenet import DecodedReadThrough, decoded_hash
    from contra_ray.data.prepare import prepare_data, streamed_locations

    root = make_imagefolder(tmp_path / "in", ["n01", "n02", "n03"], (4, 1))
    cfg = config_from_dict({"name": "rt", "output_dir": f"{s3_bucket}/runs", "model": {"width": 2},
                            "data": {"dataset": "imagenet", "root": str(root), "resolution": 8, "zca": False,
                                     "cache_dir": str(tmp_path / "cache"), "train_per_class": 2}})
    assert cfg.data_cache_location() == f"{s3_bucket}/runs/data-cache"
    assert streamed_locations(cfg) == {"data.shared_cache": f"{s3_bucket}/runs/data-cache"}
    data = prepare_data(cfg)
    disk = data.train_x.images
    fill = disk.fill
    assert isinstance(fill, DecodedReadThrough) and fill.source.startswith(f"{s3_bucket}/runs/data-cache/decoded/")
    folder = Path(disk.path).parent
    assert fill.folder == str(folder) and fill.content_hash == decoded_hash(folder)
    assert sorted(storage.list_files(fill.source)) == ["images.npy", "labels.npy", "meta.json"]
    assert data.test_x.images.fill is not None and data.test_x.images.fill.folder != fill.folder
    rows = data.train_x[:]  # the 6 train-subset rows, preprocessed, read on the driver
    blob = pickle.dumps(data)  # what ray.put sends: handles, not pixels

    # another node: the folder is not there
    shutil.move(folder, tmp_path / "elsewhere")
    pulls = []
    real_pull = storage.pull
    monkeypatch.setattr(storage, "pull", lambda *a, **k: pulls.append(a[0]) or real_pull(*a, **k))
    copies = [pickle.loads(blob) for _ in range(3)]
    got = []
    threads = [threading.Thread(target=lambda c=c: got.append(c.train_x[:])) for c in copies]  # 3 readers at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and all(torch.equal(g, rows) for g in got)
    assert pulls == [fill.source]  # fetched once for the three readers (the others waited on the lock)
    assert decoded_hash(folder) == fill.content_hash
    assert not list(folder.parent.glob(f".{folder.name}.fill-*"))  # no temporary left
    assert torch.equal(pickle.loads(blob).train_x[:], rows) and len(pulls) == 1  # complete: nothing fetched

    # a crash mid-fill left a temporary; the bucket's copy is corrupt (same size, other bytes)
    shutil.rmtree(folder)
    (folder.parent / f".{folder.name}.fill-crashed").mkdir()
    bad = bytearray((tmp_path / "elsewhere" / "images.npy").read_bytes())
    bad[-1] ^= 0xFF
    storage.write_bytes(storage.join(fill.source, "images.npy"), bytes(bad))
    with pytest.raises(ValueError, match=f"fetched from {fill.source} fails its check: content hash [0-9a-f]{{16}}, "
                                         f"expected {fill.content_hash}"):
        pickle.loads(blob).train_x[:2]
    assert not folder.exists() and not list(folder.parent.glob(f".{folder.name}.fill-*"))

    # an incomplete remote copy (no meta.json: its publication was cut off) is named, not trusted
    storage.delete(storage.join(fill.source, "meta.json"))
    with pytest.raises(storage.StorageError, match="no complete copy"):
        DecodedReadThrough(fill.source, str(folder), fill.content_hash)()
    assert not folder.exists()


def test_publish_decoded_skips_a_copy_already_there_and_locations_are_checked(tmp_path, s3_bucket):
    from contra_ray.common import storage
    from contra_ray.config import config_from_dict
    from contra_ray.data.imagenet import publish_decoded
    from contra_ray.data.prepare import streamed_locations

    root = make_imagefolder(tmp_path / "in", ["n01", "n02"], (2, 1))
    train = load_split(DataConfig(dataset="imagenet", root=str(root), cache_dir=str(tmp_path / "c"), zca=False,
                                  resolution=8), "train")
    folder = Path(train.images.path).parent
    dest = publish_decoded(folder, s3_bucket)
    stamp = storage._remote_files(dest)
    assert publish_decoded(folder, s3_bucket) == dest and storage._remote_files(dest) == stamp  # not re-uploaded
    other = publish_decoded(folder, f"{s3_bucket}/other")  # a second location gets every file too
    assert sorted(storage.list_files(other)) == ["images.npy", "labels.npy", "meta.json"]
    # a shared cache that cannot be written is refused before any decoding, naming the field
    from contra_ray.data.prepare import prepare_data

    cfg = config_from_dict({"output_dir": str(tmp_path / "runs"), "data": {
        "dataset": "imagenet", "root": str(root), "resolution": 8, "zca": False, "cache_dir": str(tmp_path / "c2"),
        "shared_cache": "s3://no-such-bucket-5e1f/sc"}})
    with pytest.raises(storage.StorageError, match="data.shared_cache='s3://no-such-bucket-5e1f/sc': cannot be "
                                                   "written"):
        prepare_data(cfg)
    assert not (tmp_path / "c2" / "decoded").exists()
    with pytest.raises(ConfigError, match="data.shared_cache='foo://x'"):
        config_from_dict({"data": {"shared_cache": "foo://x"}})
    with pytest.raises(ConfigError, match="data.cache_dir='s3://b/c': a URI is not supported"):
        config_from_dict({"data": {"cache_dir": "s3://b/c"}})
    local = config_from_dict({"output_dir": str(tmp_path / "runs"), "data": {"dataset": "imagenet", "root": str(root)}})
    assert local.data_cache_location() is None
    assert streamed_locations(local) == {"data.cache_dir": local.data.cache_dir}  # then it must be shared
    assert streamed_locations(config_from_dict({"output_dir": f"{s3_bucket}/r"})) == {}  # in memory: object store
