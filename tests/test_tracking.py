import struct

import pytest
import torch

from contra_ray.config import Config
from contra_ray.tracking import RunLogger, flatten_params, init_tracking, save_curves, save_image_grid


@pytest.fixture
def cfg(tmp_path):
    c = Config(output_dir=str(tmp_path / "runs"))
    c.tracking.experiment = "unit"
    return c


def test_flatten_params():
    flat = flatten_params({"a": {"b": 1, "c": [1, "x"], "d": None}, "e": 0.5, "f": "y" * 7000})
    assert flat["a.b"] == "1" and flat["a.c"] == '[1, "x"]' and flat["a.d"] == "None" and flat["e"] == "0.5"
    assert len(flat["f"]) == 6000 and flat["f"].endswith("...")
    assert set(flat) == {"a.b", "a.c", "a.d", "e", "f"}
    assert all(isinstance(v, str) for v in flatten_params(Config().to_dict()).values())


def test_init_tracking_creates_sqlite_store(tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "deep" / "dir" / "mlflow.db"
    uri = f"sqlite:///{db}"
    exp_id = init_tracking(uri, "exp1")
    assert db.is_file() and db.stat().st_size > 0
    assert init_tracking(uri, "exp1") == exp_id  # idempotent
    exp = MlflowClient(uri).get_experiment(exp_id)
    assert exp.name == "exp1" and exp.artifact_location == (tmp_path / "deep" / "dir" / "mlartifacts").as_uri()


def test_run_logger_logs_and_nests(cfg, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

    note = tmp_path / "note.txt"
    note.write_text("hello")
    with RunLogger(cfg, "parent") as parent:
        parent.log_params({"extra": {"k": 3}})
        parent.log_metrics({"loss": 1.5, "acc": torch.tensor(0.25)}, step=0)
        parent.log_metrics({"loss": 0.5}, step=1)
        parent.log_artifact(note)
        fig = Figure()
        fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
        parent.log_figure(fig, "plots/line.png")
        with RunLogger(cfg, "child", nested=True) as child:
            child.log_metrics({"x": 2.0}, step=3)
    client = MlflowClient(cfg.tracking_uri())
    assert cfg.tracking_uri() == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    p = client.get_run(parent.run_id)
    assert p.info.status == "FINISHED" and p.info.run_name == "parent"
    assert p.data.params["extra.k"] == "3" and p.data.params["distill.K"] == "3"
    assert p.data.params["eval.models"] == '["convnet"]'
    assert [(m.step, m.value) for m in client.get_metric_history(parent.run_id, "loss")] == [(0, 1.5), (1, 0.5)]
    assert p.data.metrics["acc"] == 0.25
    assert sorted(a.path for a in client.list_artifacts(parent.run_id)) == ["note.txt", "plots"]
    assert [a.path for a in client.list_artifacts(parent.run_id, "plots")] == ["plots/line.png"]
    c = client.get_run(child.run_id)
    assert c.data.tags["mlflow.parentRunId"] == parent.run_id
    assert c.data.metrics["x"] == 2.0 and c.info.status == "FINISHED"


def test_failed_run_is_marked_failed(cfg):
    from mlflow.tracking import MlflowClient

    with pytest.raises(RuntimeError):
        with RunLogger(cfg, "boom") as log:
            raise RuntimeError("x")
    assert MlflowClient(cfg.tracking_uri()).get_run(log.run_id).info.status == "FAILED"


def test_disabled_logger_is_noop(cfg, tmp_path):
    cfg.tracking.uri = f"sqlite:///{tmp_path}/never/mlflow.db"
    with RunLogger(cfg, "off", enabled=False) as log:
        log.log_params({"a": 1})
        log.log_metrics({"m": 1.0}, step=0)
        log.log_artifact(tmp_path / "does-not-exist")
        log.log_figure(None, "x.png")
    assert log.run_id is None
    cfg.tracking.enabled = False
    with RunLogger(cfg, "off2") as log2:
        log2.log_metrics({"m": 1.0}, step=0)
    assert log2.run_id is None
    assert not (tmp_path / "never").exists()


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])  # width, height


def test_save_image_grid_png_size(tmp_path):
    imgs = torch.rand(5, 3, 8, 6)
    p = tmp_path / "g" / "grid.png"
    save_image_grid(imgs, nrow=3, path=p)
    assert png_size(p) == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)
    import numpy as np
    from PIL import Image

    with Image.open(p) as im:
        px = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32))
    assert px.shape == (22, 26, 3)
    # first image sits at offset (2, 2); save_image rounds x*255+0.5
    expected = (imgs[0].permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).floor()
    assert torch.equal(px[2:10, 2:8], expected)
    assert sorted(x.name for x in p.parent.iterdir()) == ["grid.png"]


def test_save_curves(tmp_path):
    p = tmp_path / "curves.png"
    save_curves({"loss": [3.0, 2.0, 1.5], "syn_lr": [0.01, 0.012]}, p, "matching")
    w, h = png_size(p)
    assert (w, h) == (600, 400)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["curves.png"]
