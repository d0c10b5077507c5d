import hashlib
import os
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from contra_ray import data
from contra_ray.config import DataConfig
from contra_ray.data.preprocess import Preprocessor, fit_preprocessor, real_images_per_class
from contra_ray.data.sources import ImageSet, load_split
from helpers import CIFAR_TARBALL, CLASSES, make_tree


def folder_cfg(root, tmp_path, **kw):
    return DataConfig(dataset="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def test_imagefolder_loads_exact_pixels_labels_and_classes(tmp_path):
    truth = make_tree(tmp_path / "ds")
    cfg = folder_cfg(tmp_path / "ds", tmp_path)
    train = load_split(cfg, "train")
    assert train.images.dtype == torch.uint8 and train.images.shape == (18, 3, 8, 8)
    assert train.labels.dtype == torch.int64
    assert torch.equal(train.images, truth["train"][0]) and torch.equal(train.labels, truth["train"][1])
    assert train.classes == list(CLASSES) and train.num_classes == 3
    assert train.image_size == 8 and train.channels == 3 and len(train) == 18
    assert train.class_counts().tolist() == [6, 6, 6]
    assert train.dataset_id == "imagefolder/train"
    assert train.content_hash == hashlib.sha256(train.images.numpy().tobytes()
                                                + train.labels.numpy().tobytes()).hexdigest()[:16]
    test = load_split(cfg, "test")
    assert torch.equal(test.images, truth["test"][0]) and test.class_counts().tolist() == [2, 2, 2]
    # decoded once: the cache holds one file per split and a reload gives the same set
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 2
    again = load_split(cfg, "train")
    assert torch.equal(again.images, train.images) and again.content_hash == train.content_hash


def test_val_folder_serves_as_test_split_and_grayscale_and_bmp(tmp_path):
    truth = make_tree(tmp_path / "ds", test_name="val", mode="L")
    Image.fromarray(np.full((8, 8), 7, np.uint8), "L").save(tmp_path / "ds" / "val" / "frog" / "zzz.bmp")
    test = load_split(folder_cfg(tmp_path / "ds", tmp_path), "test")
    # grayscale is replicated to RGB, as torchvision's ImageFolder loader (PIL convert("RGB")) does
    assert test.images.shape == (7, 3, 8, 8) and test.class_counts().tolist() == [2, 2, 3]
    assert torch.equal(test.images[:6], truth["val"][0].expand(-1, 3, -1, -1))
    assert (test.images[6] == 7).all()  # the PIL fallback decoded the BMP


def test_content_hash_changes_when_one_pixel_changes(tmp_path):
    make_tree(tmp_path / "ds")
    cfg = folder_cfg(tmp_path / "ds", tmp_path)
    before = load_split(cfg, "train")
    path = tmp_path / "ds" / "train" / "dog" / "003.png"
    arr = np.array(Image.open(path))
    arr[2, 5, 1] ^= 0xFF
    Image.fromarray(arr).save(path)
    after = load_split(cfg, "train")  # the cache key follows file sizes/mtimes: no stale cache
    assert after.content_hash != before.content_hash
    diff = torch.nonzero(after.images != before.images).tolist()
    assert diff == [[6 + 3, 1, 2, 5]]


def test_class_balanced_subset(tmp_path):
    truth = make_tree(tmp_path / "ds", counts={"train": 6, "test": 1})
    sub = load_split(folder_cfg(tmp_path / "ds", tmp_path, train_per_class=2), "train")
    assert sub.images.shape == (6, 3, 8, 8) and sub.class_counts().tolist() == [2, 2, 2]
    assert sub.dataset_id == "imagefolder/train[2pc,seed0]"
    full = truth["train"][0]
    rows = [next(i for i in range(len(full)) if torch.equal(full[i], im)) for im in sub.images]
    assert rows == sorted(rows) and [r // 6 for r in rows] == [0, 0, 1, 1, 2, 2]
    same = load_split(folder_cfg(tmp_path / "ds", tmp_path, train_per_class=2), "train")
    assert torch.equal(same.images, sub.images) and same.content_hash == sub.content_hash
    other = load_split(folder_cfg(tmp_path / "ds", tmp_path, train_per_class=2, subset_seed=1), "train")
    assert other.class_counts().tolist() == [2, 2, 2] and other.dataset_id.endswith("[2pc,seed1]")
    assert not torch.equal(other.images, sub.images) and other.content_hash != sub.content_hash
    test = load_split(folder_cfg(tmp_path / "ds", tmp_path, train_per_class=2), "test")
    assert len(test) == 3 and test.dataset_id == "imagefolder/test"  # the subset applies to train only


def test_errors_name_field_value_and_path(tmp_path):
    make_tree(tmp_path / "ds", counts={"train": 3})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_split(folder_cfg(tmp_path / "nowhere", tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="test/ or val/"):
        load_split(folder_cfg(tmp_path / "ds", tmp_path), "test")
    with pytest.raises(ValueError, match="split='valid'"):
        load_split(folder_cfg(tmp_path / "ds", tmp_path), "valid")
    with pytest.raises(ValueError, match=r"data.train_per_class=4: class 0 \('cat'\) has only 3"):
        load_split(folder_cfg(tmp_path / "ds", tmp_path, train_per_class=4), "train")
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(tmp_path / "ds" / "train" / "dog" / "wide.png")
    with pytest.raises(ValueError, match=r"wide\.png"):
        load_split(folder_cfg(tmp_path / "ds", tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="data.root"):
        load_split(DataConfig(dataset="cifar10-jpeg", root=str(tmp_path / "x.tar.gz"), cache_dir=str(tmp_path)),
                   "test")
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        load_split(DataConfig(dataset="cifar10", root=str(tmp_path / "tv"), cache_dir=str(tmp_path)), "test")


# ------------------------------------------------------------------------------------ inputs never silently wrong

def class_tree(root, classes_per_split, size=4):
    """ImageFolder tree with one RGB PNG per class folder (its pixels = the class's index in its split)."""
    for split, classes in classes_per_split.items():
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            Image.fromarray(np.full((size, size, 3), c, np.uint8)).save(root / split / name / "0.png")


@pytest.mark.parametrize("test_classes, difference", [
    (["a", "c"], "lacks ['b']. Labels"),  # c's test images would be labelled 1 = b; no "has extra []"
    (["a", "b", "c", "d"], "has extra ['d']. Labels"),
    (["a", "c", "d"], "lacks ['b'] and has extra ['d']. Labels"),
])
@pytest.mark.parametrize("test_name", ["test", "val"])
def test_splits_with_different_classes_are_refused(tmp_path, test_classes, difference, test_name):
    class_tree(tmp_path / "ds", {"train": ["a", "b", "c"], test_name: test_classes})
    for split in ("train", "test"):  # refused whichever split is loaded first, before decoding
        with pytest.raises(ValueError) as e:
            load_split(folder_cfg(tmp_path / "ds", tmp_path), split)
        msg = str(e.value)
        assert str(tmp_path / "ds" / "train") in msg and str(tmp_path / "ds" / test_name) in msg
        assert "['a', 'b', 'c']" in msg and str(test_classes) in msg
        assert f"{test_name}/ {difference}" in msg and "[]" not in msg
    assert not (tmp_path / "cache" / "decoded").exists()


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    truth = make_tree(tmp_path / "ds")
    for split in ("train", "test"):
        (tmp_path / "ds" / split / ".ipynb_checkpoints").mkdir()  # would be class 0 and shift every label
        (tmp_path / "ds" / split / ".ipynb_checkpoints" / "x.png").write_bytes(b"")
        (tmp_path / "ds" / split / "cat" / "._000.png").write_bytes(b"\0\5\26\7")  # macOS AppleDouble
        (tmp_path / "ds" / split / "dog" / ".cache").mkdir()
        (tmp_path / "ds" / split / "dog" / ".cache" / "thumb.png").write_bytes(b"")
    (tmp_path / "ds" / "test" / ".Trash-1000").mkdir()  # in one split only: not a class difference either
    for split in ("train", "test"):
        got = load_split(folder_cfg(tmp_path / "ds", tmp_path), split)
        assert got.classes == list(CLASSES) and torch.equal(got.images, truth[split][0])
        assert torch.equal(got.labels, truth[split][1])


def test_empty_class_folder_is_named_by_its_path(tmp_path):
    make_tree(tmp_path / "ds")
    empty = tmp_path / "ds" / "train" / "eel"
    empty.mkdir()
    (tmp_path / "ds" / "test" / "eel").mkdir()
    (empty / "notes.txt").write_text("no images here")
    for split, folder in (("train", empty), ("test", tmp_path / "ds" / "test" / "eel")):
        with pytest.raises(FileNotFoundError) as e:
            load_split(folder_cfg(tmp_path / "ds", tmp_path), split)
        assert str(e.value).startswith(f"{folder}: class folder holds no image files (.jpg, ")
    (tmp_path / "ds" / "train" / "eel").rename(tmp_path / "ds" / "train" / ".eel")
    (tmp_path / "ds" / "test" / "eel").rename(tmp_path / "ds" / "test" / ".eel")
    assert load_split(folder_cfg(tmp_path / "ds", tmp_path), "train").num_classes == 3


def test_tarball_splits_with_different_classes_are_refused(tmp_path):
    class_tree(tmp_path / "src", {"train": ["a", "b", "c"], "test": ["a", "c"]})
    tb = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(tb, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(tmp_path / "src" / split, arcname=split)
    cfg = DataConfig(dataset="cifar10-jpeg", root=str(tb), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"test/ lacks \['b'\]\. Labels"):
        load_split(cfg, "test")
    extracted = DataConfig(dataset="cifar10-jpeg", root=str(tmp_path / "src"), cache_dir=str(tmp_path / "c2"))
    with pytest.raises(ValueError, match=r"test/ lacks \['b'\]"):
        load_split(extracted, "train")


def _write_png16(path, arr, color_type):
    """A 16-bit PNG (color type 0 gray, 2 RGB, 6 RGBA) written by hand: PIL cannot write 16-bit RGB."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_mode(path_stem, mode, seed):
    """One 8x8 image in PIL ``mode`` (suffix chosen by format); returns its path."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
    if mode == "RGB48":
        path = path_stem.with_suffix(".png")
        _write_png16(path, rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16), 2)
    elif mode in ("CMYK", "L.jpg", "RGB.jpg"):
        path = path_stem.with_suffix(".jpg")
        base.convert(mode.split(".")[0]).save(path, quality=90)
    elif mode == "P":
        path = path_stem.with_suffix(".png")
        base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, transparency=3)
    else:
        path = path_stem.with_suffix(".png")
        base.convert(mode).save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1", "CMYK", "L.jpg", "RGB48"])
def test_every_mode_decodes_as_pil_convert_rgb_whatever_comes_first(tmp_path, mode):
    """The first file of the train split is in ``mode``; the rest (and all of test) are RGB PNGs."""
    files = {}
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            (tmp_path / "ds" / split / name).mkdir(parents=True)
            for i in range(2):
                m = mode if (split, c, i) == ("train", 0, 0) else "RGB"
                files.setdefault(split, []).append(write_mode(tmp_path / "ds" / split / name / f"{i}", m, 10 * c + i))
    cfg = folder_cfg(tmp_path / "ds", tmp_path)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.channels == test.channels == 3
    for split, got in (("train", train), ("test", test)):
        for k, path in enumerate(files[split]):
            with Image.open(path) as im:
                ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # ImageFolder's loader
            assert torch.equal(got.images[k], ref), (split, path)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_images_that_are_not_8_bit_are_refused_naming_file_and_mode(tmp_path, mode):
    make_tree(tmp_path / "ds")
    path = tmp_path / "ds" / "train" / "dog" / "zz"
    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    if mode == "I;16":
        path = path.with_suffix(".png")
        _write_png16(path, values, 0)
    else:
        path = path.with_suffix(".tif")
        Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32)).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
    with pytest.raises(ValueError, match=rf"{path.name}: image mode '{re.escape(mode)}' is not 8 bits"):
        load_split(folder_cfg(tmp_path / "ds", tmp_path), "train")


@pytest.fixture
def toy_cifar10(monkeypatch):
    """make_tree's toy tree stands in for CIFAR-10: the known-counts check expects its classes and counts."""
    monkeypatch.setitem(data.sources.KNOWN_SPLITS, "cifar10-jpeg", (3, CLASSES, {"train": 6, "test": 2}))


def _tarball(tmp_path, sums=True):
    truth = make_tree(tmp_path / "src")
    shared = tmp_path / "shared"
    shared.mkdir()
    tb = shared / "cifar10-jpeg.tar.gz"
    with tarfile.open(tb, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(tmp_path / "src" / split, arcname=split)
    if sums:
        digest = hashlib.sha256(tb.read_bytes()).hexdigest()
        (shared / "SHA256SUMS").write_text(f"{digest}  cifar10-jpeg.tar.gz\n")
    return tb, truth


def test_tarball_verified_once_extracted_into_cache_only(tmp_path, monkeypatch, toy_cifar10):
    tb, truth = _tarball(tmp_path)
    before = sorted(os.listdir(tb.parent))
    cfg = DataConfig(dataset="cifar10-jpeg", root=str(tb), cache_dir=str(tmp_path / "cache"))
    test = load_split(cfg, "test")
    assert torch.equal(test.images, truth["test"][0]) and test.dataset_id == "cifar10-jpeg/test"
    assert sorted(os.listdir(tb.parent)) == before  # nothing written next to the tarball
    marker = tmp_path / "cache" / "cifar10-jpeg" / data.sources._MARKER
    assert hashlib.sha256(tb.read_bytes()).hexdigest() in marker.read_text()
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".")]  # no temp dirs left

    def no_hashing(path):
        raise AssertionError("hashed the tarball a second time")

    monkeypatch.setattr(data.sources, "sha256_file", no_hashing)
    train = load_split(cfg, "train")  # not decoded yet, but already verified and extracted
    assert torch.equal(train.images, truth["train"][0])


def test_tarball_with_wrong_checksum_is_rejected(tmp_path):
    tb, _ = _tarball(tmp_path)
    (tb.parent / "SHA256SUMS").write_text("0" * 64 + "  cifar10-jpeg.tar.gz\n")
    with pytest.raises(ValueError, match="SHA256SUMS"):
        load_split(DataConfig(dataset="cifar10-jpeg", root=str(tb), cache_dir=str(tmp_path / "c")), "test")
    assert not (tmp_path / "c" / "cifar10-jpeg").exists()


@pytest.mark.parametrize("damage, message", [
    ("text", "is not a tar archive (plain, gzip, bzip2 or xz) or is damaged at its start"),
    ("truncated.gz", "is truncated or corrupt (EOFError: Compressed file ended"),
    ("truncated.tar", "is truncated or corrupt (ReadError: unexpected end of data)"),
])
def test_a_file_that_is_not_a_whole_tarball_is_refused_and_leaves_nothing(tmp_path, damage, message):
    tb, _ = _tarball(tmp_path, sums=False)
    if damage == "text":
        tb.write_text("not a tarball\n")
    elif damage == "truncated.tar":
        with tarfile.open(tb.with_suffix(""), "w") as tf:  # an uncompressed tar cut in a member's data
            tf.add(tmp_path / "src" / "train", arcname="train")
        tb.write_bytes(tb.with_suffix("").read_bytes()[:5000])
    else:
        tb.write_bytes(tb.read_bytes()[:len(tb.read_bytes()) // 2])
    cache = tmp_path / "cache"
    cfg = DataConfig(dataset="cifar10-jpeg", root=str(tb), cache_dir=str(cache))
    for _ in range(2):  # a second try fails the same way: no half extraction counts as the data set
        with pytest.raises(ValueError) as e:
            load_split(cfg, "test")
        assert str(e.value).startswith(f"data.root: {tb} {message}") and "\n" not in str(e.value)
        assert "nothing was extracted" in str(e.value)
        assert os.listdir(cache) == []  # no cifar10-jpeg/, no .cifar10-jpeg.extract-* left behind


def test_distill_cli_exits_2_on_a_broken_tarball(tmp_path, capsys):
    from contra_ray.distill.cli import main

    tb = tmp_path / "cifar10-jpeg.tar.gz"
    tb.write_bytes(b"\x1f\x8b" + b"\0" * 100)  # a gzip magic number, then nothing usable
    assert main(["--preset", "tiny_cpu", "--output-dir", str(tmp_path / "runs"), "--no-tracking",
                 "--set", f"data.root={tb}", "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data.root: {tb} is ") and err.count("\n") == 1


# ------------------------------------------------------------------------------------ preprocessing

def image_set(images, labels=None, name="synthetic"):
    labels = torch.zeros(len(images), dtype=torch.int64) if labels is None else labels
    return ImageSet(images, labels, ["a"], name, data.content_hash(images, labels))


def smooth_images(n=400, c=3, size=4, seed=0):
    """uint8 images with correlated pixels (a low-res field plus noise), so ZCA has work to do."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, 2, 2, generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear") * 200 + torch.rand(n, c, size, size,
                                                                                          generator=g) * 50
    return x.round().clamp(0, 255).to(torch.uint8)


def test_normalisation_gives_zero_mean_unit_std(tmp_path):
    imgs = torch.randint(0, 256, (300, 3, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    imgs[:, 1] //= 2  # different per-channel statistics
    pre = fit_preprocessor(image_set(imgs), DataConfig(zca=False, cache_dir=str(tmp_path)))
    x = pre(imgs)
    assert x.dtype == torch.float32 and x.shape == imgs.shape
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    assert pre.mean[1] < 0.3 < pre.mean[0]


@pytest.mark.parametrize("normalized", [False, True])
def test_zca_whitens_to_shrunk_identity_and_inverts(tmp_path, normalized):
    imgs = smooth_images()
    cfg = DataConfig(zca=True, zca_eps=0.01, cache_dir=str(tmp_path))
    pre = fit_preprocessor(image_set(imgs), cfg, zca_on_normalized=normalized)
    if not normalized:  # MTT / DATM: ZCA directly on images / 255
        assert torch.equal(pre.mean, torch.zeros(3)) and torch.equal(pre.std, torch.ones(3))
    z = pre(imgs).double().flatten(1)
    cov_white = torch.cov(z.T)
    fitted = ((imgs.double() / 255 - pre.mean.double().view(1, -1, 1, 1)) / pre.std.double().view(1, -1, 1, 1))
    s = torch.linalg.eigvalsh(torch.cov(fitted.flatten(1).T))
    ev = torch.linalg.eigvalsh(cov_white)
    assert ev.max() <= 1.0 + 1e-4
    torch.testing.assert_close(ev, s / (s + 0.01), atol=2e-4, rtol=0)  # U S/(S+eps) U^T
    assert ev.max() > 0.9  # the dominant directions are whitened to ~1
    rnd = torch.randint(0, 256, (50, 3, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    torch.testing.assert_close(pre.to_display(pre(rnd)), rnd.float() / 255, atol=1e-3, rtol=0)


def test_to_display_clamps_to_unit_range(tmp_path):
    imgs = smooth_images()
    pre = fit_preprocessor(image_set(imgs), DataConfig(zca=True, cache_dir=str(tmp_path)))
    out = pre.to_display(torch.randn(5, 3, 4, 4) * 10)
    assert out.min() >= 0 and out.max() <= 1 and out.shape == (5, 3, 4, 4)


def test_state_dict_round_trip_and_fingerprint(tmp_path):
    imgs = smooth_images()
    pre = fit_preprocessor(image_set(imgs), DataConfig(zca=True, zca_eps=0.1, cache_dir=str(tmp_path)))
    save_file(pre.state_dict(), str(tmp_path / "pre.safetensors"))
    back = Preprocessor.from_state_dict(load_file(str(tmp_path / "pre.safetensors")))
    assert back.zca and back.zca_eps == 0.1
    assert torch.equal(back(imgs), pre(imgs))
    # the inverse is not stored (it would double every artifact): recomputed in float64, equal to display precision
    assert torch.allclose(back.to_display(pre(imgs)), pre.to_display(pre(imgs)), atol=1e-5)
    assert back.fingerprint() == pre.fingerprint() and len(pre.fingerprint()) == 16
    other = fit_preprocessor(image_set(imgs), DataConfig(zca=True, zca_eps=0.2, cache_dir=str(tmp_path)))
    assert other.fingerprint() != pre.fingerprint()
    plain = fit_preprocessor(image_set(imgs), DataConfig(zca=False, cache_dir=str(tmp_path)))
    back = Preprocessor.from_state_dict(plain.state_dict())
    assert not back.zca and back.zca_matrix is None and torch.equal(back(imgs), plain(imgs))
    with pytest.raises(TypeError, match="uint8"):
        pre(imgs.float())


def test_fit_preprocessor_is_cached_by_content_hash(tmp_path, monkeypatch):
    imgs = smooth_images()
    cfg = DataConfig(zca=True, cache_dir=str(tmp_path))
    first = fit_preprocessor(image_set(imgs), cfg)
    files = list((tmp_path / "preprocessors").glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith(image_set(imgs).content_hash)
    import kornia

    monkeypatch.setattr(kornia.enhance, "ZCAWhitening", None)  # a refit would fail
    assert fit_preprocessor(image_set(imgs), cfg).fingerprint() == first.fingerprint()


def test_real_images_per_class():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    images = torch.zeros(10, 3, 2, 2)
    idx = real_images_per_class(images, labels, 2, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and labels[idx].tolist() == [0, 0, 1, 1, 2, 2]
    assert len(set(idx.tolist())) == 6
    again = real_images_per_class(images, labels, 2, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    with pytest.raises(ValueError, match="ipc=4: class 1 has only 3"):
        real_images_per_class(images, labels, 4, torch.Generator())


# ------------------------------------------------------------------------------------ real data

@pytest.mark.skipif(not CIFAR_TARBALL.is_file(), reason=f"CIFAR-10 JPEG tarball not found at {CIFAR_TARBALL}")
def test_real_cifar10_jpeg_test_split(cache_dir):
    cfg = DataConfig(dataset="cifar10-jpeg", root=str(CIFAR_TARBALL), cache_dir=cache_dir)
    test = load_split(cfg, "test")
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.class_counts().tolist() == [1000] * 10
    assert test.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"]
    assert test.dataset_id == "cifar10-jpeg/test"
    mean = (test.images.float() / 255).mean((0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor([0.4894, 0.4815, 0.4471]), atol=0.01, rtol=0)  # README
