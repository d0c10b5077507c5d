"""Resumable experts: a task killed after epoch 3 of 5 resumes there with a bit-identical trajectory
(in a killed subprocess, and as a Ray task whose worker is SIGKILLed and retried); the store grows."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from contra_ray.common.seeds import derive_seed
from contra_ray.config import Config, ExpertConfig
from contra_ray.experts.store import ExpertStore, PartialExpert
from contra_ray.experts.training import train_expert
from contra_ray.models import ModelSpec
from helpers import flip_noise_augment as augment
from helpers import toy_data

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec("convnet", num_classes=4, image_size=8, channels=3, width=8, depth=2)
CFG = ExpertConfig(epochs=5, lr=0.05, momentum=0.9, batch_size=32, dsa=True, eval_every=2)


def data():
    return (*toy_data(120, 1), *toy_data(40, 2))


def test_killed_subprocess_resumes_at_epoch_3_and_matches_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    resume = tmp_path / "expert_0000.partial"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from helpers import flip_noise_augment as augment, toy_data
        from contra_ray.config import ExpertConfig
        from contra_ray.experts import train_expert
        from contra_ray.models import ModelSpec
        spec = ModelSpec.from_dict({SPEC.to_dict()!r})
        cfg = ExpertConfig(**{dataclasses.asdict(CFG)!r})
        def progress(s):
            print("epoch", s.epoch, flush=True)
            if s.epoch == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # dies hard: no cleanup, no exception handling
        train_expert(0, 7, *toy_data(120, 1), *toy_data(40, 2), spec, cfg, augment=augment, threads=1,
                     progress=progress, resume_dir={str(resume)!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert proc.stdout.split() == ["epoch", "1", "epoch", "2", "epoch", "3"]
    assert sorted(p.name for p in resume.iterdir()) == ["row_0000.pt", "row_0001.pt", "row_0002.pt",
                                                        "row_0003.pt", "state.pt"]

    seen = []
    resumed, acc_r = train_expert(0, 7, *data(), SPEC, CFG, augment=augment, progress=lambda s: seen.append(s.epoch),
                                  resume_dir=resume)
    assert seen == [4, 5]  # resumed after epoch 3: epochs 1-3 were not trained again
    plain, acc_p = train_expert(0, 7, *data(), SPEC, CFG, augment=augment)
    assert torch.equal(resumed, plain)
    assert acc_r[1] == acc_p[1] and acc_r[3:] == acc_p[3:]  # evaluated epochs (2, 4, 5) agree, NaN elsewhere

    # the saved state is only resumed by the same expert: another seed starts over (with a warning)
    with pytest.warns(UserWarning, match="starting from epoch 0"):
        other, _ = train_expert(0, 8, *data(), SPEC, dataclasses.replace(CFG, epochs=1), augment=augment,
                                resume_dir=resume)
    assert torch.equal(other, train_expert(0, 8, *data(), SPEC, dataclasses.replace(CFG, epochs=1),
                                           augment=augment)[0])


def test_partial_state_written_before_progress_and_torn_state_ignored(tmp_path):
    states = []

    def progress(s):
        state = torch.load(tmp_path / "p" / "state.pt", weights_only=True)
        states.append(state["epoch"])

    train_expert(0, 3, *data(), SPEC, dataclasses.replace(CFG, epochs=2), progress=progress,
                 resume_dir=tmp_path / "p")
    assert states == [1, 2]
    (tmp_path / "p" / "state.pt").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="cannot be resumed"):
        again, _ = train_expert(0, 3, *data(), SPEC, dataclasses.replace(CFG, epochs=2), resume_dir=tmp_path / "p")
    assert torch.equal(again, train_expert(0, 3, *data(), SPEC, dataclasses.replace(CFG, epochs=2))[0])
    assert PartialExpert(tmp_path / "nothing", {}).read() is None


def test_ray_task_killed_at_epoch_3_is_retried_and_resumes_then_store_grows(tmp_path, ray_local):
    from contra_ray.experts.remote import train_experts

    store_dir, log = tmp_path / "experts", tmp_path / "epochs.log"
    cfg = Config()
    cfg.experts = dataclasses.replace(CFG, num_experts=1, seed=5, store=str(store_dir), max_retries=2)
    log_path, marker = str(log), str(tmp_path / "killed-once")

    def kill_once_at_3(expert_id, epoch):  # a closure: pickled by value into the Ray task
        import os as _os
        import signal as _signal

        with open(log_path, "a") as f:
            f.write(f"{expert_id} {epoch} {_os.getpid()}\n")
        if epoch == 3 and not _os.path.exists(marker):
            open(marker, "w").close()
            _os.kill(_os.getpid(), _signal.SIGKILL)  # the worker dies; Ray retries the task elsewhere

    meta = {"dataset_id": "toy-8px", "content_hash": "abc", "zca": False, "zca_eps": 0.1,
            "preprocessor_fingerprint": "fp", "classes": list("abcd")}
    store = train_experts(cfg, *data(), SPEC, meta, {"mean": torch.zeros(3)}, augment_factory=lambda: augment,
                          epoch_hook=kill_once_at_3)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [int(e) for _, e, _ in lines] == [1, 2, 3, 4, 5]  # epochs 4 and 5 after the retry, nothing repeated
    assert lines[2][2] != lines[3][2]  # ... in another worker process
    seed0 = derive_seed(5, "expert", 0)
    plain, acc = train_expert(0, seed0, *data(), SPEC, cfg.experts, augment=augment, threads=1)
    assert torch.equal(store.trajectory(0), plain)
    assert not store.partial_dir(0).exists()  # removed once the expert is stored

    # experts.num_experts grows: expert 0 is neither retrained nor rewritten, expert 1 is added
    f0 = store.file(0)
    before = (f0.stat().st_mtime_ns, store.index.loc[0, "sha256"])
    log.unlink()
    cfg.experts.num_experts = 2
    grown = train_experts(cfg, *data(), SPEC, meta, {"mean": torch.zeros(3)}, augment_factory=lambda: augment,
                          epoch_hook=kill_once_at_3)
    assert grown.expert_ids == [0, 1]
    assert (f0.stat().st_mtime_ns, grown.index.loc[0, "sha256"]) == before
    assert {int(i) for i, _, _ in (line.split() for line in log.read_text().splitlines())} == {1}
    assert torch.equal(ExpertStore.open(store_dir).trajectory(0), plain)
