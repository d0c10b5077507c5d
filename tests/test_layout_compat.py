"""Files written by the flat layout (contra_ray 0.1, commit aa04583) still load after the move to one package
per stage: an expert store, a distilled set and a checkpoint from ``python -m contra_ray.pipeline --preset
tiny_cpu`` (tests/fixtures/layout_0_1, 0.5 MB), compared with the values the old code read from them
(expected.json, written by that code). The old module names still import, with a DeprecationWarning."""

import hashlib
import importlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from contra_ray.distill.artifact import DistilledSet
from contra_ray.distill.checkpoint import CHECKPOINT_FORMAT, newest_valid, read_checkpoint
from contra_ray.experts.store import STORE_FORMAT, ExpertStore

FIXTURES = Path(__file__).parent / "fixtures" / "layout_0_1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def test_expert_store_of_the_flat_layout_reads_the_same_trajectories():
    store = ExpertStore.open(FIXTURES / "experts")
    want = EXPECTED["store"]
    assert list(store.expert_ids) == want["expert_ids"] and store.epochs == want["epochs"]
    got = {f"{i}/{e}": sha(store.params(i, e)) for i in store.expert_ids for e in range(store.epochs + 1)}
    assert got == want["params_sha256"]
    # the format names this code writes are the ones the flat layout wrote
    assert json.loads((FIXTURES / "experts" / "store.json").read_text())["format"] == STORE_FORMAT
    assert json.loads((FIXTURES / "checkpoints" / "iter_00000004" / "manifest.json").read_text())["format"] == \
        CHECKPOINT_FORMAT


def test_distilled_set_of_the_flat_layout_loads_bit_identically():
    art = DistilledSet.load(FIXTURES / "distilled.safetensors")
    want = EXPECTED["artifact"]
    assert sha(art.images) == want["images_sha256"]
    assert sha(art.label_logits) == want["label_logits_sha256"]
    assert sha(art.targets()) == want["targets_sha256"]
    assert art.hard_labels.tolist() == want["hard_labels"]
    assert float(art.syn_lr) == want["syn_lr"] and art.ipc == want["ipc"]
    assert int(art.meta["iteration"]) == want["iteration"]


def test_checkpoint_of_the_flat_layout_validates_and_loads_with_weights_only(tmp_path):
    run = tmp_path / "checkpoints"
    shutil.copytree(FIXTURES / "checkpoints", run)
    found = newest_valid(sorted(run.iterdir(), reverse=True))
    assert found is not None and found[0].name == "iter_00000004"
    state = read_checkpoint(found[0])  # torch.load(weights_only=True) after the manifest's sha256 check
    assert torch.equal(state["distiller"]["images"], found[1]["distiller"]["images"])
    want = EXPECTED["checkpoint"]
    assert state["distiller"]["iteration"] == want["iteration"]
    assert sha(state["distiller"]["images"]) == want["images_sha256"]
    assert float(state["distiller"]["syn_lr"]) == want["syn_lr"]
    assert sorted(state["history"]) == want["history_keys"]


@pytest.mark.parametrize("old, new", [("artifact", "distill.artifact"), ("matching", "distill.matching"),
                                      ("expert_store", "experts.store"), ("distributed", "distill.remote"),
                                      ("fileio", "common.fileio"), ("analysis", "analyze.correlation")])
def test_flat_module_names_import_the_moved_module_with_a_deprecation_warning(old, new):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"contra_ray.{old}")
    assert module is importlib.import_module(f"contra_ray.{new}")
    assert module.__spec__.name == f"contra_ray.{new}"  # the alias does not rename the real module
    assert any(issubclass(w.category, DeprecationWarning) and f"contra_ray.{new}" in str(w.message) for w in caught)
