"""Config loading and validation: every bad value is refused before work, naming field and value."""

import re
from pathlib import Path

import pytest

from contra_ray.config import PRESET_DIR, ConfigError, load_config
from helpers import patch_everywhere


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads_and_segments_fit(preset):
    over = ["data.root=/some/imagefolder"] if preset.startswith(("tiny_ipc", "imagenet1k")) else []
    cfg = load_config(preset, over)
    d = cfg.distill
    assert d.concurrent_starts()[-1] <= d.max_start_epoch if d.K else True
    assert d.max_start_epoch + d.expert_epochs <= cfg.experts.epochs


def test_table5_cifar10_ipc1_row():
    d = load_config("cifar10_ipc1").distill
    assert (d.beta, d.R, d.K, d.syn_steps, d.expert_epochs, d.min_start_epoch, d.max_start_epoch, d.batch_syn,
            d.lr_label, d.lr_img) == (0.0, 2, 3, 80, 2, 0, 4, 10, 5.0, 100.0)
    assert d.concurrent_starts() == [0, 2, 4]


def test_overrides_typed():
    cfg = load_config("tiny_cpu", ["distill.K=1", "distill.beta=0.5", "eval.models=convnet,resnet18,vgg11_bn,vit",
                                   "distill.batch_syn=null"])
    assert cfg.distill.K == 1 and cfg.distill.beta == 0.5 and cfg.distill.batch_syn is None
    assert cfg.eval.models == ["convnet", "resnet18", "vgg11_bn", "vit"]


def test_R_defaults_to_floor_range_over_K():
    d = load_config("tiny_cpu", ["distill.R=null", "distill.K=3", "distill.min_start_epoch=0",
                                 "distill.max_start_epoch=10", "experts.epochs=12"]).distill
    assert d.resolved_R() == 3 and d.concurrent_starts() == [0, 3, 6]


@pytest.mark.parametrize("override, field, value", [
    (["distill.min_start_epoch=4", "distill.max_start_epoch=4"], "distill.min_start_epoch", "4"),
    (["distill.max_start_epoch=3", "distill.expert_epochs=2", "experts.epochs=4"], "distill.max_start_epoch", "3"),
    (["distill.K=3", "distill.R=2", "distill.max_start_epoch=3", "experts.epochs=8"], "distill.K", "3"),
    (["data.dataset=mnist"], "data.dataset", "'mnist'"),
    (["model.name=vit_h"], "model.name", "'vit_h'"),
    (["model.name=resnet18_bn"], "model.name", "'resnet18_bn'"),  # batch norm: evaluation only
    (["eval.models=convnet,lenet9"], "eval.models", "'lenet9'"),
    (["distill.beta=1.5"], "distill.beta", "1.5"),
    (["distill.K=0", "distill.beta=0.5"], "distill.beta", "0.5"),
    (["distill.syn_steps=0"], "distill.syn_steps", "0"),
    (["distill.lr_img=-1"], "distill.lr_img", "-1"),
    (["distill.ipc=0"], "distill.ipc", "0"),
    (["distill.ipc=abc"], "distill.ipc", "'abc'"),
    (["distill.nonsense=1"], "distill.nonsense", ""),
    (["data.dataset=imagefolder"], "data.root", "None"),
])
def test_bad_configs_name_field_and_value(override, field, value):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", override)
    assert field in str(e.value) and value in str(e.value)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="preset='nope'.*cifar10_ipc1"):
        load_config("nope")


def test_data_dependent_checks():
    cfg = load_config("tiny_cpu", ["distill.ipc=5", "distill.batch_syn=60"])
    with pytest.raises(ConfigError, match=r"distill.ipc=5.*smallest class of the training set \(4 images\)"):
        cfg.validate_data(num_classes=10, min_class_count=4)
    with pytest.raises(ConfigError, match=r"distill.batch_syn=60.*\(ipc \* classes = 50\)"):
        cfg.validate_data(num_classes=10, min_class_count=100)


def test_yaml_path_preset(tmp_path: Path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\ndistill:\n  K: 1\n  beta: 0.3\n")
    cfg = load_config(str(p))
    assert cfg.name == "mine" and cfg.distill.K == 1


def test_preset_with_a_key_given_twice_is_refused(tmp_path: Path):
    p = tmp_path / "dup.yaml"
    p.write_text("name: dup\ndata:\n  zca: false\n  zca_eps: 0.1\n  zca: true\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:5: duplicate key 'zca' \(first given at line 3\)"):
        load_config(str(p))
    p.write_text("name: a\ndistill: {K: 1}\nname: b\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3: duplicate key 'name'"):
        load_config(str(p))
    p.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"expected a mapping"):
        load_config(str(p))
    assert load_config("tiny_cpu", ["data.zca=false", "data.zca=true"]).data.zca  # --set: the last one wins


# ------------------------------------------------------------------------------------ a new user's tryout

@pytest.mark.parametrize("override, message", [
    ("distill.ipc=true", "distill.ipc=True: expected int"),  # was coerced to 1
    ("distill.beta=false", "distill.beta=False: expected float"),
    ("distill.batch_syn=true", "distill.batch_syn=True: expected int"),  # Optional[int]
    ("distill.monitor_epochs=[0, true]", "distill.monitor_epochs=True: expected int"),
    ("data.zca=2", "data.zca=2: expected bool (true or false)"),  # was True
    ("data.zca=1", "data.zca=1: expected bool (true or false)"),
    ("data.in_memory=0", "data.in_memory=0: expected bool (true or false)"),  # Optional[bool]
    ("data.zca=maybe", "data.zca='maybe': expected bool (true or false)"),
    ("name=[a, b]", "name=['a', 'b']: expected str"),
    ("eval.models={a: 1}", "eval.models.a: eval.models is a single value (list), not a section"),
    ("distill.monitor_epochs=[[1]]", "distill.monitor_epochs=[1]: expected int"),
])
def test_booleans_and_numbers_are_not_interchangeable(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", [override])
    assert str(e.value).startswith(message)


def test_yaml_booleans_still_set_bool_fields(tmp_path: Path):
    for text, want in (("true", True), ("false", False), ("yes", True), ("off", False), ("True", True)):
        assert load_config("tiny_cpu", [f"data.zca={text}"]).data.zca is want
    cfg = load_config("tiny_cpu", ["distill.ipc=2", "distill.beta=1", "experts.lr=0.5"])
    assert cfg.distill.ipc == 2 and cfg.distill.beta == 1.0 and isinstance(cfg.distill.beta, float)
    from contra_ray.config import config_from_dict

    assert config_from_dict({"data": {"zca": "false"}}).data.zca is False  # a string from a dict (tune space)


@pytest.mark.parametrize("overrides, message", [
    (["distill.K.x=1"], "distill.K.x: distill.K is a single value (int), not a section"),
    (["distill.K.x.y=1"], "distill.K.x.y: distill.K is a single value (int), not a section"),
    (["name.x=1"], "name.x: name is a single value (str), not a section"),
    (["eval.models.x=1"], "eval.models.x: eval.models is a single value"),
    (["distill.K=3", "distill.K.x=1"], "distill.K.x: distill.K=3 is a single value, not a section"),
    (["distill=3", "distill.K=1"], "distill.K: distill=3 is a single value, not a section"),
])
def test_a_path_through_a_single_value_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", overrides)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("name", ["../x", "/abs/run", "a/b", "..", ".", "", " ", "a\0b"])
def test_run_name_must_be_one_folder_inside_output_dir(name):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", {"name": name})
    assert str(e.value).startswith(f"name={name!r}: ") and "inside output_dir" in str(e.value)


def test_run_name_from_the_cli_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from contra_ray import distill, pipeline

    def work(*a, **k):
        raise AssertionError("work started before the name was checked")

    patch_everywhere(monkeypatch, "contra_ray.data.prepare.prepare_data", work)
    for main in (distill.main, pipeline.main):
        for name in ("../x", str(tmp_path / "abs"), "a/b"):
            assert main(["--preset", "tiny_cpu", "--output-dir", str(tmp_path / "runs"), "--name", name]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: name={name!r}: ") and len(err.strip().splitlines()) == 1
        assert main(["--preset", "tiny_cpu", "--output-dir", str(tmp_path / "runs"), "--set", "name=[a, b]"]) == 2
        assert "error: name=['a', 'b']: expected str" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()
    assert load_config("tiny_cpu", ["name=run-1.b"]).run_dir().name == "run-1.b"


def test_cli_paths_and_name_are_taken_verbatim(tmp_path):
    from contra_ray.common.cli import config_from_args
    from contra_ray.distill.cli import build_parser

    args = build_parser().parse_args(["--preset", "tiny_cpu", "--name", "yes", "--output-dir", str(tmp_path / "on"),
                                      "--experts", "1e3", "--ipc", "2"])
    cfg = config_from_args(args, {"distill.ipc": vars(args)["distill.ipc"]}, verbatim={"experts.store": args.experts})
    assert (cfg.name, cfg.output_dir, cfg.experts.store, cfg.distill.ipc) == ("yes", str(tmp_path / "on"), "1e3", 2)


def test_cuda_device_without_cuda_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib

    import torch

    from contra_ray.config import check_device

    def work(*a, **k):
        raise AssertionError("work started before the device was checked")

    patch_everywhere(monkeypatch, "contra_ray.data.prepare.prepare_data", work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config("cifar10_ipc1").device == "cuda"  # GPU presets still load and validate on CPU machines
    check_device("cpu")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"^device='{device}': no CUDA device is visible"):
            check_device(device)
        for cli in ("distill", "pipeline", "analyze"):
            main = importlib.import_module(f"contra_ray.{cli}").main
            head = ["correlation"] if cli == "analyze" else []
            assert main(head + ["--preset", "tiny_cpu", "--output-dir", str(tmp_path / "runs"), "--no-tracking",
                                "--set", f"device={device}"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: device='{device}': no CUDA device is visible") and err.count("\n") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda:0")
    with pytest.raises(ConfigError, match=r"^device='cuda:1': only 1 CUDA device\(s\) visible \(cuda:0..cuda:0\)"):
        check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"^device='cuda:x': must be cpu, cuda or cuda:<index>"):
        load_config("tiny_cpu", ["device=cuda:x"])


@pytest.mark.parametrize("override, message", [
    ("eval.cpus_per_run=0", "eval.cpus_per_run=0.0: must be a finite number > 0"),
    ("experts.cpus_per_expert=0", "experts.cpus_per_expert=0.0: must be a finite number > 0"),
    ("experts.cpus_per_expert=-1", "experts.cpus_per_expert=-1.0: must be a finite number > 0"),
    ("experts.gpus_per_expert=-0.5", "experts.gpus_per_expert=-0.5: must be a finite number >= 0"),
    ("eval.gpus_per_run=.nan", "eval.gpus_per_run=nan: must be a finite number >= 0"),
    ("experts.momentum=-1", "experts.momentum=-1.0: SGD momentum must be in [0, 1)"),
    ("experts.momentum=1", "experts.momentum=1.0: SGD momentum must be in [0, 1)"),
    ("eval.momentum=1.5", "eval.momentum=1.5: SGD momentum must be in [0, 1)"),
    ("experts.weight_decay=-0.1", "experts.weight_decay=-0.1: must be a finite number >= 0"),
    ("data.zca_eps=.inf", "data.zca_eps=inf: must be a finite number > 0"),
    ("eval.lr=.inf", "eval.lr=inf: must be a finite number > 0 or null"),
    ("distill.monitor_epochs=7", "distill.monitor_epochs=[7]: epochs [7] have no segment of M=2 epochs in "
                                 "experts.epochs=8 (starts must be in 0..6)"),
])
def test_resources_momentum_and_monitor_epochs_are_checked(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("cifar10_ipc1_cpu", [override])
    assert str(e.value).startswith(message)


def test_valid_edges_of_the_new_checks_load():
    cfg = load_config("cifar10_ipc1_cpu", ["experts.momentum=0", "experts.cpus_per_expert=0.5", "eval.momentum=0.99",
                                           "distill.monitor_epochs=0,6"])
    assert cfg.distill.monitor_epochs == [0, 6] and cfg.experts.cpus_per_expert == 0.5
    # a given expert store may hold more epochs than experts.epochs: experts.remote.ensure_experts checks it
    cfg = load_config("cifar10_ipc1_cpu", ["distill.monitor_epochs=7", "experts.store=/s"])
    assert cfg.distill.monitor_epochs == [7]


def test_directories_given_as_files_empty_output_dir_long_names_and_zero_iterations_are_refused(tmp_path):
    """A user's tryout: each of these failed after minutes of work (FileExistsError, OSError) or silently
    wrote into ./runs or saved the initial set as distilled."""
    from contra_ray.config import ConfigError, load_config

    f = tmp_path / "afile"
    f.write_text("")
    for override, message in ((["output_dir=''"], "output_dir='': must not be empty"),
                              ([f"output_dir={f}"], f"output_dir='{f}': is a file, expected a directory"),
                              ([f"data.cache_dir={f}"], f"data.cache_dir='{f}': is a file"),
                              ([f"experts.store={f}"], f"experts.store='{f}': is a file"),
                              (["name=" + "a" * 201], "bytes long; at most 200"),
                              (["distill.iterations=0"], "distill.iterations=0: must be >= 1")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("tiny_cpu", override)
