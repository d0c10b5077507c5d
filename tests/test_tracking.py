import contextlib
import os
import re
import socket
import struct
from pathlib import Path

import pytest
import torch

from contra_ray.config import Config, ConfigError
from contra_ray.tracking import (RunLogger, check_destinations, flatten_params, init_tracking, save_curves,
                                 save_image_grid, store_lock)

ROOT = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------------------ concurrent first use

_FIRST_USE = """
import sys, time
from pathlib import Path
from contra_ray.config import Config
from contra_ray.tracking import RunLogger
i, out = int(sys.argv[1]), Path(sys.argv[2])
cfg = Config(output_dir=str(out))
cfg.tracking.experiment = "together"
(out.parent / f"ready{i}").touch()  # mlflow and sqlalchemy imported: wait for the others, then go at once
while not (out.parent / "go").exists():
    time.sleep(0.01)
with RunLogger(cfg, f"job{i}") as log:
    log.log_metrics({"x": float(i)}, step=1)
"""


@pytest.mark.slow  # ~90 s on 2 shared cores: 4 x (torch + mlflow imports), one schema migration
def test_four_processes_share_a_fresh_sqlite_store(tmp_path):
    """Four jobs started together on a fresh store: the schema is created and migrated once (under the
    store lock), the experiment created once, and every job logs its run."""
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE, str(i), str(out)], env=env, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-1500:] for e in errs)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "together"]
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2", "job3"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["x"] == int(r.info.run_name[3:]) for r in runs)


def test_store_lock_excludes_other_processes(tmp_path):
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    probe = ("import fcntl, sys\nf = open(sys.argv[1], 'a')\ntry:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError:\n    sys.exit(3)\n")
    lock = tmp_path / "db" / "mlflow.db.lock"
    with store_lock(uri):
        assert lock.is_file()
        assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 0
    with store_lock("http://example.invalid:5000"):  # other stores: nothing to lock
        pass


# ------------------------------------------------------------------------------------ destinations checked first

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _http_server(status: int):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_check_destinations(tmp_path):
    import time

    (tmp_path / "file").write_text("")
    check_destinations(tmp_path / "new" / "out", f"sqlite:///{tmp_path / 'new' / 'db' / 'mlflow.db'}")
    assert (tmp_path / "new" / "out").is_dir() and (tmp_path / "new" / "db").is_dir()
    check_destinations(None, None)
    with pytest.raises(ConfigError, match=rf"^output_dir='{tmp_path / 'file' / 'o'}': directory .* cannot be "):
        check_destinations(tmp_path / "file" / "o", None)
    with pytest.raises(ConfigError, match=rf"^tracking.uri='sqlite:///{tmp_path / 'file'}/mlflow.db': directory"):
        check_destinations(None, f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"^tracking.uri='file:.*': directory"):
        check_destinations(None, (tmp_path / "file" / "mlruns").as_uri())
    with _http_server(404) as url:  # any answer means a server is there
        check_destinations(None, url)
    with _http_server(502) as url, pytest.raises(ConfigError, match="HTTP 502"):  # a gateway without its server
        check_destinations(None, url)
    port = _closed_port()
    for uri in (f"http://127.0.0.1:{port}", f"postgresql://u@127.0.0.1:{port}/db"):
        with pytest.raises(ConfigError, match=rf"^tracking.uri='{re.escape(uri)}': tracking store not reachable "
                                              r"within 5 s"):
            check_destinations(None, uri)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="not reachable within 0.5 s"):
            check_destinations(None, f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("cli", ["distill", "pipeline", "analyze"])
def test_clis_check_destinations_before_any_work(tmp_path, monkeypatch, capsys, cli):
    import importlib

    import contra_ray.stages

    def work(*a, **k):
        raise AssertionError("work started before the destinations were checked")

    monkeypatch.setattr(contra_ray.stages, "prepare_data", work)
    main = importlib.import_module(f"contra_ray.{cli}").main
    head = ["correlation"] if cli == "analyze" else []
    (tmp_path / "file").write_text("")
    assert main(head + ["--preset", "tiny_cpu", "--output-dir", str(tmp_path / "file" / "runs")]) == 2
    assert f"error: output_dir='{tmp_path / 'file' / 'runs'}'" in capsys.readouterr().err
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert main(head + ["--preset", "tiny_cpu", "--output-dir", str(tmp_path / "runs"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"error: tracking.uri='{uri}': tracking store not reachable" in err and len(err.strip().splitlines()) == 1
