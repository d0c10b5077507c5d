from pathlib import Path

import pytest
import yaml

from contra_ray.common.fileio import YAMLFileError, ensure_writable_dir, load_yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_YAML = sorted(p.relative_to(ROOT).as_posix() for d in ("contra_ray/presets", "tune_spaces", "clusters")
                      for p in (ROOT / d).glob("*.yaml"))


def test_duplicate_key_is_refused_with_file_key_and_lines(tmp_path):
    p = tmp_path / "preset.yaml"
    p.write_text("name: x\ndata:\n  zca: false\n  root: null\n  zca: true\n")
    assert yaml.safe_load(p.read_text())["data"]["zca"] is True  # what PyYAML silently does
    with pytest.raises(YAMLFileError, match=rf"^{p}:5: duplicate key 'zca' \(first given at line 3\)"):
        load_yaml(p)
    with pytest.raises(YAMLFileError, match=r"^<text>:2: duplicate key 'a'"):
        load_yaml(text="a: 1\na: 1\n")  # even with the same value
    with pytest.raises(YAMLFileError, match=r"s.yaml:3: duplicate key 'k'"):
        load_yaml(text="- {x: 1}\n- k: 1\n  k: 2\n", name="s.yaml")  # inside a list
    with pytest.raises(YAMLFileError, match=r"duplicate key True"):
        load_yaml(text="true: 1\nyes: 2\n")  # equal after YAML 1.1 resolution


def test_strict_loader_keeps_safe_load_semantics():
    text = "base: &b {p: 1, q: 2}\nd:\n  <<: *b\n  p: 3\nl: [1, 2.5, null, on]\n"
    assert load_yaml(text=text) == yaml.safe_load(text) == {"base": {"p": 1, "q": 2}, "d": {"p": 3, "q": 2},
                                                         "l": [1, 2.5, None, True]}
    assert load_yaml(text="") is None
    assert load_yaml(text="a: 1\n---\nb: 2\n", all_documents=True) == [{"a": 1}, {"b": 2}]
    with pytest.raises(YAMLFileError, match="<text>: invalid YAML"):
        load_yaml(text="a: [1\n")
    with pytest.raises(YAMLFileError, match="invalid YAML"):
        load_yaml(text="!!python/object:os.system {}\n")  # safe tags only
    with pytest.raises(TypeError):
        load_yaml()


@pytest.mark.parametrize("path", PROJECT_YAML)
def test_every_project_yaml_loads_strictly_and_as_before(path):
    docs = load_yaml(ROOT / path, all_documents=True)
    assert docs == list(yaml.safe_load_all((ROOT / path).read_text()))


def test_ensure_writable_dir(tmp_path):
    assert ensure_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError, match=rf"directory {tmp_path / 'f' / 'x'} cannot be created"):
        ensure_writable_dir(tmp_path / "f" / "x")


def test_atomic_write_gives_files_the_umask_mode_even_from_writers_that_create_0600(tmp_path):
    """safetensors' writer creates its file 0600; the renamed result must have the mode open() gives
    (0666 & ~umask), like every other file of the run directory."""
    import os

    import torch
    from safetensors.torch import save_file

    from contra_ray.common.fileio import atomic_write

    old = os.umask(0o022)
    try:
        a = atomic_write(tmp_path / "a.safetensors", lambda t: save_file({"x": torch.zeros(2)}, str(t)))
        b = atomic_write(tmp_path / "b.txt", "text")
        os.umask(0o027)
        c = atomic_write(tmp_path / "c.txt", b"bytes")
    finally:
        os.umask(old)
    assert (a.stat().st_mode & 0o777, b.stat().st_mode & 0o777, c.stat().st_mode & 0o777) == (0o644, 0o644, 0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.txt", "c.txt"]  # no temp file left
