"""Failures of the machine and of the data, each on the real command line: read-only and full destinations, a
file where a folder goes, a truncated JPEG, a damaged CIFAR-10 copy, Ctrl-C. Every one is one ``error:`` (or
``interrupted``) line on stderr and a documented exit status, never a traceback."""

import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contra_ray import data
from contra_ray.config import DataConfig, load_config
from contra_ray.data.sources import CIFAR10_CLASSES, check_known_counts, load_split
from contra_ray.distill.cli import experts_interrupted_message
from helpers import CIFAR_TARBALL, ROOT, make_tiny_imagenet

FIXTURE = ROOT / "tests" / "fixtures" / "layout_0_1" / "distilled.safetensors"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"),
                                                                  os.environ.get("PYTHONPATH")]))}
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small read-only or full tmpfs (in a private "
                                                            "mount namespace, unshare -m) needs root")
needs_cifar = pytest.mark.skipif(not CIFAR_TARBALL.is_file(), reason=f"CIFAR-10 tarball not at {CIFAR_TARBALL}")


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


def in_tmpfs(mount: Path, options: str, argv: list[str], timeout=120):
    """Run ``argv`` with a tmpfs (``options``, e.g. ``size=1m,ro``) mounted at ``mount`` in a private mount
    namespace: the mount ends with the command, nothing outside sees it."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} && exec {shlex.join(argv)}"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=timeout)
    if "mount:" in proc.stderr and "permission denied" in proc.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert not os.listdir(mount)  # the tmpfs was private to the command
    return proc


def one_error_line(proc, code: int) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------- destinations


def test_data_prepare_refuses_a_file_as_out_before_any_work(tmp_path):
    out = tmp_path / "betons"
    out.write_text("a file, not a folder\n")
    proc = cli("contra_ray.data", "prepare", "--dataset", "cifar10-jpeg", "--root", tmp_path / "none.tar.gz",
               "--out", out, "--cache-dir", tmp_path / "cache")
    assert one_error_line(proc, 2) == f"error: --out={str(out)!r}: is a file, expected a folder"
    assert out.read_text() == "a file, not a folder\n" and not (tmp_path / "cache").exists()


@needs_root
def test_read_only_output_dir_is_refused_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    proc = in_tmpfs(ro, "size=1m,ro", [sys.executable, "-m", "contra_ray.distill", "--preset", "tiny_cpu",
                                       "--no-tracking", "--output-dir", str(ro / "runs")])
    assert one_error_line(proc, 2) == (f"error: output_dir={str(ro / 'runs')!r}: directory {ro / 'runs'} cannot be "
                                       "created or written (read-only file system)")


@needs_root
@needs_cifar
def test_read_only_cache_dir_is_refused_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    proc = in_tmpfs(ro, "size=1m,ro", [sys.executable, "-m", "contra_ray.evaluate", "--artifact", str(FIXTURE),
                                       "--no-tracking", "--inline", "--cache-dir", str(ro)])
    assert one_error_line(proc, 2) == (f"error: data.cache_dir={str(ro)!r}: directory {ro} cannot be created or "
                                       "written (read-only file system)")


@needs_root
@needs_cifar
def test_a_full_cache_dir_is_one_disk_full_line(tmp_path):
    """1 MB of cache: extracting the CIFAR-10 tarball fills it during the work -> exit 1, said as disk full."""
    full = tmp_path / "full"
    proc = in_tmpfs(full, "size=1m", [sys.executable, "-m", "contra_ray.evaluate", "--artifact", str(FIXTURE),
                                      "--no-tracking", "--inline", "--cache-dir", str(full)])
    line = one_error_line(proc, 1)
    assert line.startswith(f"error: {full}") and line.endswith(": disk full"), line


@needs_root
def test_atomic_write_says_disk_full_for_torch_save(tmp_path):
    """torch.save reports a short write as a RuntimeError that never says why: atomic_write names the file and
    ENOSPC, and leaves no temporary file on the full disk."""
    full = tmp_path / "full"
    code = ("import errno, os, sys, torch\n"
            "from contra_ray.common.fileio import atomic_write\n"
            f"d = {str(full)!r}\n"
            "try:\n"
            "    atomic_write(os.path.join(d, 'x.pt'), lambda t: torch.save(torch.zeros(1 << 20), t))\n"
            "except OSError as e:\n"
            "    print(e.errno == errno.ENOSPC, e.filename, type(e.__cause__).__name__, os.listdir(d))\n")
    proc = in_tmpfs(full, "size=1m", [sys.executable, "-c", code])
    assert proc.stdout.split("\n")[0] == f"True {full / 'x.pt'} RuntimeError []", proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- damaged data


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


@pytest.mark.parametrize("resolution", [None, 32])  # native size (decode_images) and resized (decode_resized)
def test_a_truncated_jpeg_names_the_file(tmp_path, resolution):
    root = make_tiny_imagenet(tmp_path / "tiny", size=40)
    bad = sorted((root / "train").glob("*/images/*.JPEG"))[1]
    _truncate(bad)
    extra = ["--resolution", str(resolution)] if resolution else []
    proc = cli("contra_ray.data", "prepare", "--dataset", "tiny-imagenet", "--root", root, "--out", tmp_path / "out",
               "--cache-dir", tmp_path / "cache", *extra)
    line = one_error_line(proc, 2)
    assert line.startswith(f"error: {bad}: image data cannot be decoded, the file is truncated or corrupt ("), line


def test_known_counts_name_the_short_class():
    labels = np.repeat(np.arange(10), 5000)[:-2500]  # a CIFAR-10 train split that lost half its trucks
    with pytest.raises(ValueError) as e:
        check_known_counts("cifar10-jpeg", "data.root='/d/c.tar'", "train", labels, list(CIFAR10_CLASSES))
    assert str(e.value) == ("data.root='/d/c.tar': split train has 2,500 images of class truck (9), expected 5,000 "
                            "per class (50,000 in all, found 47,500); the copy is damaged (e.g. a truncated "
                            "tarball): replace it with a complete one")
    check_known_counts("cifar10-jpeg", "x", "train", np.repeat(np.arange(10), 5000), list(CIFAR10_CLASSES))
    check_known_counts("cifar100", "x", "test", np.repeat(np.arange(100), 100), [f"c{i}" for i in range(100)])
    with pytest.raises(ValueError, match=r"split test has 99 images of class c3 \(3\), expected 100 per class"):
        check_known_counts("cifar100", "x", "test", np.delete(np.repeat(np.arange(100), 100), 300),
                           [f"c{i}" for i in range(100)])
    with pytest.raises(ValueError, match="split test has 9 classes, expected the 10 of cifar10; missing: truck;"):
        check_known_counts("cifar10", "x", "test", np.repeat(np.arange(9), 1000), list(CIFAR10_CLASSES[:9]))


def _cifar_like_tar(tmp_path: Path, train: int, test: int) -> Path:
    """An uncompressed tar in the CIFAR-10 layout (test/ then train/, the ten class folders, tiny JPEGs), cut
    exactly at the header of the last truck of train/: tarfile reads it as a whole archive."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for split, n in (("test", test), ("train", train)):
        for name in CIFAR10_CLASSES:
            (src / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / split / name / f"{i}.jpg")
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tf:
        for split in ("test", "train"):
            tf.add(src / split, arcname=split)
    with tarfile.open(whole) as tf:
        cut = [m for m in tf.getmembers() if m.name.startswith("train/truck/") and m.isfile()][-1].offset
    tb = tmp_path / "cifar10-jpeg.tar"
    tb.write_bytes(whole.read_bytes()[:cut])
    with tarfile.open(tb) as tf:  # what made the damage silent: the cut archive reads without an error
        assert len([m for m in tf.getmembers() if m.isfile()]) == 10 * (train + test) - 1
    return tb


def test_a_cifar10_tar_cut_at_a_header_boundary_is_refused(tmp_path):
    """The command line on a CIFAR-10-layout tar cut at a header boundary, with the known counts scaled down to
    the tiny tree (4 train, 2 test per class): the real tarball would cost a 57,500-file extraction per run.
    With data.train_per_class set, the full split is still checked before the subset."""
    tb = _cifar_like_tar(tmp_path, train=4, test=2)
    code = ("import sys\n"
            "from contra_ray.data import sources\n"
            "from contra_ray.data.cli import main\n"
            "sources.KNOWN_SPLITS['cifar10-jpeg'] = (10, sources.CIFAR10_CLASSES, {'train': 4, 'test': 2})\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "prepare", "--dataset", "cifar10-jpeg", "--root", str(tb),
                           "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                           "--train-per-class", "2"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert one_error_line(proc, 2) == (f"error: data.root={str(tb)!r}: split train has 3 images of class truck (9), "
                                       "expected 4 per class (40 in all, found 39); the copy is damaged (e.g. a "
                                       "truncated tarball): replace it with a complete one")
    assert not list((tmp_path / "cache").glob("decoded/*.pt"))  # refused before decoding anything


def test_load_split_checks_the_full_split_before_the_subset(tmp_path, monkeypatch):
    tb = _cifar_like_tar(tmp_path, train=4, test=2)
    monkeypatch.setitem(data.sources.KNOWN_SPLITS, "cifar10-jpeg", (10, CIFAR10_CLASSES, {"train": 4, "test": 2}))
    cfg = DataConfig(dataset="cifar10-jpeg", root=str(tb), cache_dir=str(tmp_path / "cache"), train_per_class=2)
    assert load_split(cfg, "test").class_counts().tolist() == [2] * 10  # the test split is whole
    with pytest.raises(ValueError, match=r"split train has 3 images of class truck \(9\), expected 4 per class"):
        load_split(cfg, "train")  # a 2-per-class subset of it would be balanced: the check comes first


# ---------------------------------------------------------------------------------------------- Ctrl-C


@needs_cifar
def test_sigint_during_evaluate_is_130_and_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "contra_ray.evaluate", "--artifact", str(FIXTURE), "--no-tracking",
                             "--inline", "--epochs", "2000", "--runs", "3",
                             "--cache-dir", os.environ.get("CONTRA_RAY_TEST_CACHE") or str(tmp_path / "cache")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        started = proc.stdout.readline()  # "evaluate: training ..." once the data are loaded
        assert started.startswith("evaluate: training 1 set(s) x 1 model(s) x 3 run(s) of 2000 epochs"), started
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines() == ["interrupted: evaluate keeps no partial results; rerunning the same command "
                                        "trains and evaluates every run again (the decoded data stay cached)"]


def test_expert_interruption_says_the_rerun_resumes(tmp_path):
    cfg = load_config("tiny_cpu", {"experts": {"store": str(tmp_path / "store"), "num_experts": 4},
                                   "output_dir": str(tmp_path)})
    store = tmp_path / "store"
    assert experts_interrupted_message(cfg) == (
        f"interrupted before the experts were trained (0 of 4 finished in {store}): rerunning the same command "
        "trains all 4 from their first epoch, then distills")
    store.mkdir()
    (store / "expert_0000.safetensors").write_bytes(b"x")
    (store / "expert_0001.partial").mkdir()
    torch.save({}, store / "expert_0001.partial" / "state.pt")
    (store / "expert_0002.partial").mkdir()  # no saved epoch yet: trained from its first epoch
    assert experts_interrupted_message(cfg, then="computes the correlations") == (
        f"interrupted before the experts were trained (1 of 4 finished in {store}): rerunning the same command "
        "keeps the 1 finished one(s), resumes 1 unfinished one(s) after its last saved epoch, trains the other 2 "
        "from their first epoch, then computes the correlations")
    for i in (1, 2, 3):
        (store / f"expert_{i:04d}.safetensors").write_bytes(b"x")
    assert experts_interrupted_message(cfg) is None  # all finished: the distillation's own message applies
