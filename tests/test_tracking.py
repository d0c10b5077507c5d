import contextlib
import os
import re
import socket
import struct
from pathlib import Path

import pytest
import torch

from contra_ray.config import Config, ConfigError
from contra_ray.plots import save_curves, save_image_grid
from contra_ray.tracking import RunLogger, check_destinations, flatten_params, init_tracking, store_lock
from helpers import patch_everywhere

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


def test_image_grid_one_row_per_class_upscaled_with_names(tmp_path):
    import numpy as np
    from PIL import Image

    imgs = torch.rand(6, 3, 32, 32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    p = tmp_path / "g" / "grid.png"
    lay = save_image_grid(imgs, labels, ["airplane", "automobile", "bird"], p, title="IPC 2")
    assert lay["rows"] == 3 and lay["cols"] == 2 and lay["cell_px"] == (64, 64)  # nearest x2: >= 64 px
    w, h = png_size(p)
    assert (w, h) == lay["size"] and w >= 2 * 64 and h >= 3 * 64
    left, top, bw, bh = lay["image_box"]
    assert left > 0 and bh == 3 * (64 + 4) + 4  # one row per class; the class names sit left of the images
    with Image.open(p) as im:
        px = np.asarray(im.convert("RGB")).astype(np.int64)
    for r, i in ((0, 0), (1, 3), (2, 5)):  # row r starts with the first image of class r, 2x2 pixel blocks
        y0, x0 = top + 4 + r * 68, left + 4 + (i % 2) * 68
        block = px[y0:y0 + 64, x0:x0 + 64]
        expected = (imgs[i].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.int64)
        assert np.array_equal(block[::2, ::2], expected) and np.array_equal(block[1::2, 1::2], expected)
    assert px[:, :left].min() < 128  # dark text in the label column
    assert sorted(x.name for x in p.parent.iterdir()) == ["grid.png"]  # atomic: no temporary left


def test_image_grid_caps_columns_and_handles_grayscale(tmp_path):
    lay = save_image_grid(torch.rand(30, 1, 28, 28), torch.arange(2).repeat_interleave(15), None,
                          tmp_path / "g.png", max_per_class=4)
    assert lay["rows"] == 2 and lay["cols"] == 4 and lay["cell_px"] == (84, 84)  # ceil(64 / 28) = 3


def test_save_curves_puts_each_quantity_on_its_own_axis(tmp_path):
    p = tmp_path / "curves.png"
    n = save_curves({"matching loss": {"loss": [3.0, 2.0, 1.5], "loss/sampled": [2.0, 1.0, 1.0]},
                     "syn_lr": {"syn_lr": [0.01, 0.012, 0.011]}, "eval_acc (%)": {}}, p, "matching")
    assert n == 2  # loss and syn_lr on separate axes; the empty eval_acc panel is left out
    assert png_size(p)[1] == 80 + 200 * 2
    assert save_curves({"loss": {"loss": [1.0]}, "syn_lr": {"syn_lr": [0.01]},
                        "eval_acc (%)": {"eval_acc": ([2, 4], [10.0, 12.0])}}, p, "t") == 3
    assert sorted(x.name for x in tmp_path.iterdir()) == ["curves.png"]


def test_run_tags_params_and_iteration_metrics(cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    from contra_ray.tracking import PATH_FIELDS, accuracy_metrics, run_tags, source_version

    cfg.distill.K, cfg.distill.beta = 0, 1.0
    cfg.data.root = str(tmp_path / "data")
    tags = run_tags(cfg, "distill", "contra_ray.distill", note="first try")
    assert tags["method"] == "mtt" and tags["K"] == "0" and tags["beta"] == "1.0" and tags["ipc"] == "1"
    assert tags["mlflow.note.content"] == "first try" and tags["path.data.root"] == str(tmp_path / "data")
    version, sha = source_version()  # a checkout: git rev-parse HEAD of the package's repository
    assert tags["git_commit"] == version
    assert sha is None or (len(sha) == 40 and tags["mlflow.source.git.commit"] == sha)
    with pytest.raises(ValueError, match="method='datm'"):
        run_tags(cfg, "distill", "x", method="datm")
    assert accuracy_metrics({"convnet": (50.0, 1.0), "resnet18": (40.0, 2.0)}, "convnet", "random_real_acc") == {
        "random_real_acc": 50.0, "random_real_acc_std": 1.0, "random_real_acc/convnet": 50.0,
        "random_real_acc_std/convnet": 1.0, "random_real_acc/resnet18": 40.0, "random_real_acc_std/resnet18": 2.0}

    with RunLogger(cfg, "r", note="n") as log:  # created outside contra_ray: entry point "contra_ray"
        for it in range(6):
            log.log_metrics({"loss": 1.0 / (it + 1), "loss/start_2": 0.5, "syn_lr": 0.01}, step=it)
            if it in (1, 3, 5):
                log.log_metrics({"eval_acc": {1: 20.0, 3: 30.2, 5: 30.5}[it]}, step=it + 1)
    client = MlflowClient(cfg.tracking_uri())
    run = client.get_run(log.run_id)
    assert not set(PATH_FIELDS) & set(run.data.params) and run.data.params["distill.K"] == "0"
    assert run.data.tags["path.output_dir"] == cfg.output_dir and run.data.tags["mlflow.note.content"] == "n"
    assert run.data.tags["mlflow.source.name"] == "contra_ray" and "loss/start_2" in run.data.metrics
    assert run.data.metrics["iters_to_plateau"] == 4.0  # first eval within 0.5 points of the best (30.5)
    assert run.data.metrics["s_per_iter"] >= 0
    exp = client.get_experiment_by_name("unit")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's "Model training" view


def test_every_entry_module_run_with_python_m_tags_its_stage(cfg):
    """A RunLogger created by a module run as ``python -m NAME`` (its ``__name__`` is ``__main__``, its
    ``__spec__`` names it; runpy gives exactly these globals) is tagged with NAME's stage, read back from the
    store; so is one created by the module imported under its own name, by a script path, or from outside."""
    import importlib.util

    from mlflow.tracking import MlflowClient

    expected = {"contra_ray.pipeline": "pipeline", "contra_ray.nas": "nas", "contra_ray.distill.cli": "distill",
                "contra_ray.distill.remote": "distill", "contra_ray.distill.__main__": "distill",
                "contra_ray.evaluate.cli": "evaluate", "contra_ray.analyze.cli": "analyze",
                "contra_ray.tune.sweep": "trial"}  # the sweep and its trials name role and entry point themselves
    callers = {m: {"__name__": "__main__", "__spec__": importlib.util.find_spec(m)} for m in expected}
    callers["imported pipeline"] = {"__name__": "contra_ray.pipeline"}
    callers["script"] = {"__name__": "__main__", "__spec__": None, "__file__": str(ROOT / "contra_ray" / "nas.py")}
    callers["notebook"] = {"__name__": "__main__", "__spec__": None}
    client, got = MlflowClient(cfg.tracking_uri()), {}
    for caller, g in callers.items():
        exec("with RunLogger(cfg, caller) as log:\n    run_id = log.run_id", {**g, "RunLogger": RunLogger,
                                                                             "cfg": cfg, "caller": caller}, g)
        tags = client.get_run(g["run_id"]).data.tags
        got[caller] = (tags["mlflow.source.name"], tags["contra_ray.role"])
    want = {m: (".".join(m.split(".")[:2]), role) for m, role in expected.items()}
    assert got == {**want, "imported pipeline": ("contra_ray.pipeline", "pipeline"),
                   "script": ("contra_ray.nas", "nas"), "notebook": ("contra_ray", "contra_ray")}


def test_moved_runs_folder_keeps_its_artifacts(cfg, tmp_path, capsys):
    """MLflow records absolute artifact locations: after moving the runs folder a plain client lists nothing;
    ``report --relocate`` (or any contra_ray opening of the store) points them at the new folder again."""
    from mlflow.tracking import MlflowClient

    from contra_ray.report import main as report_main
    from contra_ray.tracking import tracking_client

    (tmp_path / "note.txt").write_text("kept")
    with RunLogger(cfg, "r") as log:
        log.log_artifact(tmp_path / "note.txt", "notes")
    moved = tmp_path / "laptop" / "runs"
    moved.parent.mkdir()
    os.rename(cfg.output_dir, moved)
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    assert MlflowClient(uri).list_artifacts(log.run_id, "notes") == []  # broken, as MLflow leaves it
    assert report_main(["--relocate", "--tracking-uri", uri]) == 0
    assert f"{(Path(cfg.output_dir) / 'mlartifacts').as_uri()} -> {(moved / 'mlartifacts').as_uri()}" in \
        capsys.readouterr().out
    read = lambda client: Path(client.download_artifacts(log.run_id, "notes/note.txt", str(tmp_path))).read_text()  # noqa: E731
    assert read(MlflowClient(uri)) == "kept"
    os.rename(moved, tmp_path / "again")  # moved once more: contra_ray's own opening of the store relocates it
    assert read(tracking_client(f"sqlite:///{tmp_path / 'again' / 'mlflow.db'}")) == "kept"
    assert MlflowClient(uri).get_run(log.run_id).info.artifact_uri.startswith((tmp_path / "again").as_uri())


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
    for uri in ((tmp_path / "mlruns").as_uri(), str(tmp_path / "mlruns")):  # MLflow 3 refuses the file store
        with pytest.raises(ConfigError, match=rf"^tracking.uri='{re.escape(uri)}': a file store .* use sqlite:///"):
            check_destinations(None, uri)
    assert not (tmp_path / "mlruns").exists()
    (tmp_path / "notdb").write_text("hello")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'notdb'} exists and is not an SQLite database"):
        check_destinations(None, f"sqlite:///{tmp_path / 'notdb'}")
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


    def work(*a, **k):
        raise AssertionError("work started before the destinations were checked")

    patch_everywhere(monkeypatch, "contra_ray.data.prepare.prepare_data", work)
    main = importlib.import_module(f"contra_ray.{cli}").main
    head = ["correlation"] if cli == "analyze" else []
    (tmp_path / "file").write_text("")
    assert main(head + ["--preset", "tiny_cpu", "--output-dir", str(tmp_path / "file" / "runs")]) == 2
    assert f"error: output_dir='{tmp_path / 'file' / 'runs'}'" in capsys.readouterr().err
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert main(head + ["--preset", "tiny_cpu", "--output-dir", str(tmp_path / "runs"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"error: tracking.uri='{uri}': tracking store not reachable" in err and len(err.strip().splitlines()) == 1


def test_unknown_tracking_uri_schemes_are_refused_early(tmp_path, monkeypatch, capsys):
    import importlib.metadata

    from contra_ray.distill.cli import main

    for uri in ("bogus://x", "s3://bucket/mlruns", "mlflow:/x"):
        with pytest.raises(ConfigError, match=rf"^tracking.uri='{re.escape(uri)}': unknown scheme "
                                              rf"'{uri.split(':')[0]}:'; MLflow tracking URIs are sqlite:///PATH"):
            check_destinations(None, uri)
    for uri in ("uc", "databricks-uc://x"):
        with pytest.raises(ConfigError, match=rf"^tracking.uri='{uri}': a Unity Catalog model registry URI"):
            check_destinations(None, uri)
    monkeypatch.chdir(tmp_path)
    for uri in ("databricks", "databricks://profile", "sqlite://"):
        check_destinations(None, uri)  # accepted
    for uri in (str(tmp_path / "mlruns"), (tmp_path / "m2").as_uri(), "relative/mlruns"):
        with pytest.raises(ConfigError, match="a file store"):  # MLflow 3's refused file store, refused here first
            check_destinations(None, uri)
    assert not (tmp_path / "databricks").exists() and not (tmp_path / "relative").exists()

    class EntryPoint:
        name = "bogus"

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [EntryPoint()] if
                        group == "mlflow.tracking_store" else [])
    check_destinations(None, "bogus://x")  # an installed plugin's scheme is MLflow's to open
    monkeypatch.undo()


    def work(*a, **k):
        raise AssertionError("work started before the tracking URI was checked")

    patch_everywhere(monkeypatch, "contra_ray.data.prepare.prepare_data", work)
    assert main(["--preset", "tiny_cpu", "--output-dir", str(tmp_path / "runs"), "--tracking-uri", "bogus://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tracking.uri='bogus://x': unknown scheme 'bogus:'") and err.count("\n") == 1
