"""The public API (``contra_ray.load_distilled``, ``train_on_distilled``; the README's example) and
``python -m contra_ray.export`` on the real output of ``python -m contra_ray.distill --preset tiny_cpu``, made once
for the module; export round trips through each consumer's own reader."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from contra_ray.api import Distilled, load_distilled, train_on_distilled
from contra_ray.augment import dsa_if
from contra_ray.data.preprocess import Preprocessor
from contra_ray.evaluate.training import train_and_test
from contra_ray.export import class_dirs, export_set, formats
from contra_ray.export.cli import main as export_main
from helpers import ROOT


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, cache_dir):
    """``(folder holding runs/, artifact path)`` of a real ``distill --preset tiny_cpu`` run."""
    root = tmp_path_factory.mktemp("api")
    out = subprocess.run([sys.executable, "-m", "contra_ray.distill", "--preset", "tiny_cpu", "--set",
                          f"data.cache_dir={cache_dir}", "--no-tracking", "--output-dir", str(root / "runs")],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    path = root / "runs" / "tiny_cpu" / "distilled.safetensors"
    assert path.is_file()
    return root, path


@pytest.fixture(scope="module")
def ds(tiny_set):
    return load_distilled(tiny_set[1])


def test_import_contra_ray_loads_no_torch_and_the_api_names_resolve_on_use():
    code = ("import sys, contra_ray; assert 'torch' not in sys.modules, 'torch at import'; "
            "f = contra_ray.load_distilled; assert f.__module__ == 'contra_ray.api'; "
            "assert contra_ray.train_on_distilled.__module__ == 'contra_ray.api'; "
            "print(hasattr(contra_ray, 'no_such_name'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_readme_example_runs_and_trains_exactly_what_evaluate_trains(tiny_set, monkeypatch):
    root, path = tiny_set
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using a distilled set outside contra_ray"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'load_distilled("runs/tiny_cpu/distilled.safetensors")' in code
    monkeypatch.chdir(root)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's example, as a user runs it
    ds, test_x, test_y = ns["ds"], ns["test_x"], ns["test_y"]
    assert isinstance(ds, Distilled) and len(ds) == 10 and ds.images.dtype == torch.float32
    assert test_x.dtype == torch.uint8 and tuple(test_x.shape) == (10000, 3, 32, 32)
    # the ConvNet of the example is exactly evaluate's network: same seed, same recipe, same accuracy
    ecfg = ds.eval_config
    want = train_and_test(ds.images, ds.targets(), ds.syn_lr, ds.model_spec(), ecfg, ds.preprocess(test_x), test_y,
                          seed=0, augment=dsa_if(ecfg.dsa))
    assert ns["acc"] == want
    # the user's module was trained in place: its accuracy is what it scores now
    linear = ns["linear"]
    with torch.no_grad():
        pred = linear(ds.preprocess(test_x)).argmax(1)
    assert ns["acc_linear"] == (pred == test_y).sum().item() / len(test_y)
    batch = next(iter(ns["loader"]))
    assert batch[0].shape == (10, 3, 32, 32) and torch.allclose(batch[1].sum(1), torch.ones(10))


def test_the_set_as_a_dataset_pixels_and_recipe(ds, tiny_set):
    assert ds.soft and ds.num_classes == 10 and ds.classes[0] == "airplane"
    assert ds.hard_labels.tolist() == list(range(10))
    assert ds.eval_config.epochs == 5 and ds.lr == ds.syn_lr  # tiny_cpu: 5 epochs, eval.lr unset
    soft, hard = ds.dataset(), ds.dataset(hard_labels=True)
    assert len(soft) == 10
    x, t = soft[3]
    assert torch.equal(x, ds.images[3]) and torch.equal(t, torch.softmax(ds.label_logits[3], 0))
    assert hard[3][1].item() == 3 and hard[3][1].dtype == torch.int64
    # no ZCA in tiny_cpu: pixels = images * std + mean, unclamped
    pre = ds.preprocessor
    want = ds.images * pre.std.view(1, 3, 1, 1) + pre.mean.view(1, 3, 1, 1)
    assert torch.allclose(ds.pixels(), want, atol=1e-6)
    u8 = ds.pixels_uint8()
    assert torch.equal(u8, (want.clamp(0, 1) * 255).round().to(torch.uint8))
    assert torch.equal(ds.preprocess(u8), pre(u8))  # uint8 and [0, 1] floats give the same model input
    assert torch.allclose(ds.preprocess(u8.float() / 255), pre(u8), atol=1e-6)
    with pytest.raises(ValueError, match="10000 images but test_y has 3"):
        train_on_distilled(ds, ds.build_model, torch.zeros(10000, 3, 32, 32), torch.zeros(3, dtype=torch.long))


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """uint8 [n, 3, 8, 8] with strong pixel correlations (upsampled 2x2 noise), like natural images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 2, 2, generator=g)
    x = torch.nn.functional.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    return ((x + 0.05 * torch.rand(n, 3, 8, 8, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)


def test_zca_pixels_invert_the_whitening_within_float32_precision():
    import kornia

    train = _smooth_images(400, 0)
    zca = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)
    zca.fit(train.float() / 255)
    fitted = Preprocessor(mean=torch.zeros(3), std=torch.ones(3), zca=True, zca_eps=0.1,
                          zca_mean=zca.mean_vector.float(), zca_matrix=zca.transform_matrix.float())
    pre = Preprocessor.from_state_dict(fitted.state_dict())  # as an artifact carries it: inverse recomputed
    test = _smooth_images(200, 1)
    x = pre(test)
    assert torch.allclose(x, zca(test.float() / 255), atol=1e-5)  # the forward transform is kornia's
    back = pre.to_pixels(x) * 255
    assert (back - test.float()).abs().max() < 1e-3
    assert torch.equal(back.round().to(torch.uint8), test)
    assert torch.allclose(pre.from_unit(test.float() / 255), x, atol=1e-6)
    assert torch.equal(pre.to_display(x * 3), pre.to_pixels(x * 3).clamp(0, 1))  # display = clamped pixels


# ---------------------------------------------------------------------------------------------- export

def _export(artifact, fmt, out, capsys) -> tuple[int, str]:
    try:
        rc = export_main([str(artifact), "--format", fmt, "--out", str(out)])
    except SystemExit as e:  # argparse refusals
        rc = e.code
    return rc, capsys.readouterr().err


def test_export_mtt_trio_reads_back_exactly_with_torch_load(tiny_set, ds, tmp_path, capsys):
    rc, err = _export(tiny_set[1], "mtt", tmp_path / "mtt", capsys)
    assert rc == 0, err
    files = sorted(p.name for p in (tmp_path / "mtt").iterdir())
    assert files == ["contra_ray_export.json", "images_best.pt", "labels_best.pt", "lr_best.pt"]
    images = torch.load(tmp_path / "mtt" / "images_best.pt")
    labels = torch.load(tmp_path / "mtt" / "labels_best.pt")
    lr = torch.load(tmp_path / "mtt" / "lr_best.pt")
    assert torch.equal(images, ds.images) and images.dtype == torch.float32
    assert torch.equal(labels, ds.label_logits)  # DATM label_syn: logits; its loss softmaxes them
    assert torch.equal(torch.softmax(labels, 1), ds.targets())
    assert lr.dim() == 0 and lr.item() == torch.tensor(ds.syn_lr, dtype=torch.float32).item()
    doc = json.loads((tmp_path / "mtt" / "contra_ray_export.json").read_text())
    assert doc["syn_lr"] == ds.syn_lr and doc["preprocessing"]["zca"] is False and doc["classes"] == ds.classes


def test_export_imagefolder_reads_back_with_torchvision_within_8_bit(tiny_set, ds, tmp_path, capsys):
    from torchvision import datasets as tvd
    from torchvision.transforms.functional import pil_to_tensor

    out = tmp_path / "folder"
    rc, err = _export(tiny_set[1], "imagefolder", out, capsys)
    assert rc == 0, err
    folder = tvd.ImageFolder(str(out))
    assert folder.class_to_idx == {c: i for i, c in enumerate(ds.classes)}
    soft = torch.load(out / "soft_labels.pt")
    listed = json.loads((out / "labels.json").read_text())["files"]
    assert len(folder) == len(soft) == len(listed) == 10
    pixels, u8, targets = ds.pixels(), ds.pixels_uint8(), ds.targets()
    for j, (path, label) in enumerate(folder.samples):
        i = int(os.path.basename(path)[:-4])  # <index in the set>.png
        img = pil_to_tensor(folder.loader(path))
        assert label == ds.hard_labels[i].item() and listed[j]["index"] == i and listed[j]["label"] == label
        assert torch.equal(img, u8[i])
        assert (img.float() / 255 - pixels[i].clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6
        assert torch.equal(soft[j], targets[i]) and listed[j]["soft_label"] == targets[i].tolist()


def test_export_hf_reads_back_with_load_from_disk(tiny_set, ds, tmp_path, capsys):
    datasets = pytest.importorskip("datasets", reason="the hf extra is not installed: pip install 'contra_ray[hf]'")
    rc, err = _export(tiny_set[1], "hf", tmp_path / "hf", capsys)
    assert rc == 0, err
    back = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(back) == 10 and back.features["label"].names == ds.classes
    u8, targets = ds.pixels_uint8(), ds.targets()
    for i, row in enumerate(back):
        assert torch.equal(torch.from_numpy(np.array(row["image"])).permute(2, 0, 1), u8[i])
        assert row["label"] == ds.hard_labels[i].item()
        assert torch.equal(torch.tensor(row["soft_label"], dtype=torch.float32), targets[i])


@pytest.mark.parametrize("case", ["missing artifact", "unknown format", "non-empty out", "out is a file",
                                  "hf without datasets"])
def test_export_refuses_bad_input_with_one_line_and_writes_nothing(case, tiny_set, tmp_path, capsys, monkeypatch):
    artifact, fmt, out = tiny_set[1], "mtt", tmp_path / "out"
    if case == "missing artifact":
        artifact = tmp_path / "nope.safetensors"
    elif case == "unknown format":
        fmt = "zip"
    elif case == "non-empty out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out is a file":
        out.write_text("mine")
    else:
        fmt = "hf"
        monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, err = _export(artifact, fmt, out, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    want = {"missing artifact": "nope.safetensors", "unknown format": "invalid choice: 'zip'",
            "non-empty out": "not empty", "out is a file": "is a file",
            "hf without datasets": "pip install 'contra_ray[hf]'"}[case]
    assert want in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_failed_export_leaves_no_folder_behind(ds, tmp_path, monkeypatch):
    def half_then_fail(distilled, folder):
        (folder / "images_best.pt").write_bytes(b"partial")
        raise RuntimeError("writer died")

    monkeypatch.setitem(formats.WRITERS, "mtt", half_then_fail)
    with pytest.raises(RuntimeError, match="writer died"):
        export_set(ds, "mtt", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_class_folders_sort_in_class_order():
    assert class_dirs(["airplane", "bird", "cat"]) == ["airplane", "bird", "cat"]
    assert class_dirs(["n02", "n01"]) == ["0_n02", "1_n01"]  # ImageFolder sorts names: keep the class order
    assert class_dirs([str(i) for i in range(11)])[:3] == ["00_0", "01_1", "02_2"]  # "10" < "2" as strings
    assert class_dirs(["a/b", "c"]) == ["0_a_b", "1_c"]
