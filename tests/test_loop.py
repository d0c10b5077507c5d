"""The one loop: local checkpoints with fallback and config check, seed roles, module structure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contra_ray.common.seeds import ROLES, derive_seed
from contra_ray.config import ConfigError, load_config
from contra_ray.distill.checkpoint import LocalCheckpoints, checkpoint_dirs, read_checkpoint
from contra_ray.distill.distiller import Distiller
from contra_ray.distill.loop import LocalSync, run_loop
from contra_ray.evaluate.training import evaluation_seeds
from contra_ray.models import ModelSpec, build_model, flat_params
from helpers import patch_everywhere

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec("convnet", num_classes=3, image_size=8, channels=3, width=4, depth=2)


class FakeStore:
    def __init__(self, epochs=6):
        torch.manual_seed(0)
        theta = flat_params(build_model(SPEC))
        noise = torch.randn_like(theta)
        self.traj = {i: [theta + 0.01 * (e + i) * noise for e in range(epochs + 1)] for i in (0, 1)}
        self.expert_ids = [0, 1]

    def params(self, expert_id, epoch):
        return self.traj[expert_id][epoch]


def make(tmp_path, overrides=()):
    cfg = load_config("tiny_cpu", ["model.width=4", "model.depth=2", "distill.ipc=2", "distill.batch_syn=3",
                                   "distill.syn_steps=2", "distill.K=2", "distill.R=1", "distill.beta=0.5",
                                   "distill.max_start_epoch=2", "distill.expert_epochs=1", "experts.epochs=6",
                                   "distill.iterations=6", "distill.checkpoint_every=2", f"output_dir={tmp_path}",
                                   *overrides])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(18, 3, 8, 8, generator=g)
    y = torch.arange(3).repeat_interleave(6)
    return cfg, Distiller(cfg, FakeStore(), SPEC, x, y)


def test_local_checkpoints_resume_exactly_and_keep_two(tmp_path):
    cfg, full = make(tmp_path / "a")
    run_loop(full, cfg, sync=LocalSync(), progress=None)
    cfg, part = make(tmp_path / "b", ["distill.iterations=4"])
    ck = LocalCheckpoints(tmp_path / "b" / "ck")
    run_loop(part, cfg, checkpoints=ck, progress=None)
    assert [d.name for d in checkpoint_dirs(ck.root)] == ["iter_00000004", "iter_00000002"]  # newest 2 kept
    cfg6, resumed = make(tmp_path / "b", ["distill.iterations=6"])  # more iterations: a resumable change
    res = run_loop(resumed, cfg6, checkpoints=ck, progress=None)
    assert res.start_iteration == 4 and res.resumed_from.endswith("iter_00000004")
    for k in ("images", "label_logits", "syn_lr"):
        assert torch.equal(getattr(resumed, k), getattr(full, k)), k
    assert len(res.history["loss"]) == 6  # the history continues


def test_torn_newest_checkpoint_is_reported_and_the_older_one_used(tmp_path, capsys):
    cfg, d = make(tmp_path, ["distill.iterations=4"])
    ck = LocalCheckpoints(tmp_path / "ck")
    run_loop(d, cfg, checkpoints=ck, progress=None)
    newest = ck.root / "iter_00000004" / "state.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    state = ck.load()
    assert state["distiller"]["iteration"] == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
    assert len(lines) == 1 and "iter_00000004" in lines[0] and "sha256" in lines[0]


@pytest.mark.parametrize("change, field", [(["distill.beta=1.0", "distill.K=0"], "distill.beta=0.5 in the checkpoint"),
                                           (["distill.lr_img=7"], "distill.lr_img"),
                                           (["experts.num_experts=3"], "experts.num_experts")])
def test_resume_with_a_changed_result_field_is_refused_by_name(tmp_path, change, field):
    cfg, d = make(tmp_path, ["distill.iterations=2"])
    ck = LocalCheckpoints(tmp_path / "ck")
    run_loop(d, cfg, checkpoints=ck, progress=None)
    cfg2, d2 = make(tmp_path, ["distill.iterations=4", *change])
    with pytest.raises(ConfigError, match=field) as e:
        run_loop(d2, cfg2, checkpoints=ck, progress=None)
    assert "--no-resume" in str(e.value)
    assert d2.iteration == 0  # nothing loaded


def test_checkpoint_state_carries_config_and_history(tmp_path):
    cfg, d = make(tmp_path, ["distill.iterations=2"])
    ck = LocalCheckpoints(tmp_path / "ck")
    run_loop(d, cfg, checkpoints=ck, progress=None)
    state = read_checkpoint(ck.root / "iter_00000002")
    assert state["config"] == cfg.to_dict() and len(state["history"]["loss"]) == 2
    manifest = json.loads((ck.root / "iter_00000002" / "manifest.json").read_text())
    assert manifest["config"]["distill"]["beta"] == 0.5 and manifest["iteration"] == 2


# ---------------------------------------------------------------------------------------------- seed roles

def test_seed_roles_never_share_a_seed():
    seeds = [derive_seed(s, role, i) for s in range(3) for role in ROLES for i in range(200)]
    assert len(set(seeds)) == len(seeds)
    assert derive_seed(0, "eval", 0) == derive_seed(0, "eval", 0)  # a pure function
    with pytest.raises(ValueError, match="unknown"):
        derive_seed(0, "evaluation")
    with pytest.raises(ValueError, match="must be >= 0"):
        derive_seed(-1, "eval")


def test_evaluation_never_starts_from_an_experts_initialization():
    """The issue: with the CLI's default seed, evaluation network i was torch.manual_seed(i) like expert i."""
    torch.manual_seed(derive_seed(0, "expert", 0))  # what experts_ray passes to train_expert for expert 0
    expert0 = flat_params(build_model(SPEC))
    for s in evaluation_seeds(0, 3):
        torch.manual_seed(s)  # what train_and_test does
        assert not torch.allclose(flat_params(build_model(SPEC)), expert0)
    assert set(evaluation_seeds(0, 5)).isdisjoint(derive_seed(0, "expert", i) for i in range(5))


# ---------------------------------------------------------------------------------------------- resume

def test_lowering_iterations_below_the_checkpoint_is_refused(tmp_path):
    """A user finding: resuming at iteration 4 with distill.iterations=2 saved the 4-iteration set."""
    cfg, d = make(tmp_path, ["distill.iterations=4"])
    ck = LocalCheckpoints(tmp_path / "ck")
    run_loop(d, cfg, checkpoints=ck, progress=None)
    cfg2, d2 = make(tmp_path, ["distill.iterations=2"])
    with pytest.raises(ConfigError, match="iteration 4, beyond distill.iterations=2"):
        run_loop(d2, cfg2, checkpoints=ck, progress=None)


@pytest.mark.parametrize("override, field", [("distill.lr_label=.inf", "distill.lr_label"),
                                             ("experts.lr=.nan", "experts.lr"),
                                             ("threads=-1", "threads"),
                                             ("distill.checkpoint_every=-1", "distill.checkpoint_every"),
                                             ("eval.batch_size=0", "eval.batch_size")])
def test_non_finite_and_negative_settings_are_refused_by_name(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config("tiny_cpu", [override])


def test_switching_num_workers_does_not_bypass_the_resume_check(tmp_path):
    """A Ray Train checkpoint of a run name also guards the in-process run of that name (and vice versa)."""
    from contra_ray.distill.checkpoint import write_checkpoint
    from contra_ray.distill.cli import precheck_resume

    cfg, d = make(tmp_path, ["distill.iterations=2", "name=nw2"])
    write_checkpoint(tmp_path / "ray_train" / "nw2" / "checkpoint_x",
                     {"distiller": d.state_dict(), "history": {}, "config": cfg.to_dict()})
    cfg2, _ = make(tmp_path, ["distill.iterations=2", "name=nw2", "distill.beta=0.2"])
    with pytest.raises(ConfigError, match="distill.beta=0.5 in the checkpoint, 0.2 now"):
        precheck_resume(cfg2, distributed=False)


def _checkpointed_run(tmp_path, name):
    """A run directory holding one valid local checkpoint of ``make``'s config (beta 0.5)."""
    from contra_ray.distill.checkpoint import write_checkpoint

    cfg, d = make(tmp_path, ["distill.iterations=2", f"name={name}"])
    write_checkpoint(cfg.run_dir() / "checkpoints" / "iter_00000002",
                     {"distiller": d.state_dict(), "history": {}, "config": cfg.to_dict()})
    return cfg


@pytest.mark.parametrize("module", ["distill", "pipeline"])
def test_cli_resume_refusal_is_one_line_exit_2_and_no_resume_passes_the_check(tmp_path, module, capsys,
                                                                              monkeypatch):
    """A user finding: the pipeline had no --no-resume and printed a traceback after data preparation."""
    import importlib

    cli = importlib.import_module(f"contra_ray.{module}")
    cfg = _checkpointed_run(tmp_path, "cli")
    args = ["--preset", "tiny_cpu", "--name", "cli", "--output-dir", str(tmp_path), "--no-tracking",
            "--set", "model.width=4", "--set", "model.depth=2", "--set", "distill.beta=0.2",
            "--set", "distill.K=2", "--set", "distill.R=1", "--set", "distill.max_start_epoch=2",
            "--set", "distill.expert_epochs=1", "--set", "experts.epochs=6", "--set", "distill.ipc=2"]
    started = []
    patch_everywhere(monkeypatch, "contra_ray.data.prepare.prepare_data", lambda *a, **k: started.append(1) or 1 / 0)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "distill.beta=0.5 in the checkpoint, 0.2 now" in err and "Traceback" not in err and not started
    with pytest.raises(ZeroDivisionError):  # --no-resume: past the check, into the (stubbed) data stage
        cli.main(args + ["--no-resume"])
    assert started == [1] and (cfg.run_dir() / ".lock").read_text() == ""  # lock released after the run


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    from contra_ray.common.fileio import RunInUse, run_lock

    with run_lock(tmp_path / "run"):
        code = ("import sys; from contra_ray.common.fileio import run_lock\n"
                f"with run_lock({str(tmp_path / 'run')!r}): pass")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 1 and "RunInUse" in out.stderr
        assert f"run directory {tmp_path / 'run'} is in use by another process (pid {__import__('os').getpid()})" \
            in out.stderr
        with pytest.raises(RunInUse, match="choose another --name"):  # also within one process
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released: free again
        pass


@pytest.mark.parametrize("module", ["distill", "pipeline"])
def test_ctrl_c_prints_how_to_resume_and_exits_130(tmp_path, module, capsys, monkeypatch):
    import importlib

    cli = importlib.import_module(f"contra_ray.{module}")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    patch_everywhere(monkeypatch, "contra_ray.data.prepare.prepare_data", interrupted)
    base = ["--preset", "tiny_cpu", "--name", "c", "--output-dir", str(tmp_path), "--no-tracking"]
    rc = cli.main(base + ["--set", "distill.checkpoint_every=5"])
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err
    # no expert trained yet: the rerun trains them (test_environment_errors checks the resume wording)
    assert "interrupted before the experts were trained (0 of " in err and "from their first epoch" in err
    store = tmp_path / "c" / "experts"
    store.mkdir(parents=True)
    for i in range(load_config("tiny_cpu").experts.num_experts):  # finished experts: the distillation's message
        (store / f"expert_{i:04d}.safetensors").write_bytes(b"stands in for a finished expert")
    assert cli.main(base + ["--set", "distill.checkpoint_every=5"]) == 130
    err = capsys.readouterr().err
    assert "interrupted before the first checkpoint (every distill.checkpoint_every=5 iterations): rerunning" in err
    cfg, d = make(tmp_path, ["name=c"])
    from contra_ray.distill.checkpoint import write_checkpoint

    write_checkpoint(tmp_path / "c" / "checkpoints" / "iter_00000002",
                     {"distiller": d.state_dict(), "history": {}, "config": cfg.to_dict()})
    assert cli.main(base + ["--set", "distill.checkpoint_every=5", "--no-resume"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: {tmp_path / 'c'} keeps the newest checkpoint (every distill.checkpoint_every=5" in err
    assert "rerun the same command to resume" in err
    assert cli.main(base + ["--no-resume"]) == 130  # tiny_cpu keeps no checkpoint: the message says a rerun starts over
    assert "distill.checkpoint_every=0 keeps no checkpoint" in capsys.readouterr().err


def test_a_second_expert_training_waits_for_the_first(tmp_path, capsys):
    """A user finding: two runs sharing one expert store trained the same experts at once and corrupted it."""
    from contra_ray.common.fileio import wait_lock

    lock, done = tmp_path / ".experts.lock", tmp_path / "first_done"
    code = ("import sys, time; from pathlib import Path; from contra_ray.common.fileio import wait_lock\n"
            f"with wait_lock({str(lock)!r}, 'first'):\n"
            "    print('held', flush=True); time.sleep(1.0)\n"
            f"    Path({str(done)!r}).write_text('x')\n")
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert first.stdout.readline().strip() == "held"
    with wait_lock(lock, "training the experts of X"):
        assert done.exists()  # entered only after the first holder finished its work
    assert first.wait() == 0
    assert f"waiting for pid {first.pid}, which is training the experts of X ({lock})" in capsys.readouterr().out
