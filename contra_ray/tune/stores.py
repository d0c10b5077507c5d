"""Expert stores of a sweep: which trials share one (:func:`expert_key`) and where each lives
(:func:`expert_store_resolver`). Design: docs/SWEEPS.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Callable

from contra_ray.config import flatten_dotted, get_dotted, load_config
from contra_ray.tune.space import SweepSpec, merge_nested, searched_fields, short_label

__all__ = ["EXPERT_KEY_IGNORED", "expert_key", "expert_store_resolver", "expert_fields"]

#: Settings that do not change what an expert store holds (paths, resources, how often experts are tested).
EXPERT_KEY_IGNORED = ("data.cache_dir", "data.shared_cache", "data.download", "experts.store",
                      "experts.cpus_per_expert", "experts.gpus_per_expert", "experts.eval_every")


def expert_key(config: dict) -> str:
    """What an expert store depends on: the ``data``, ``model`` and ``experts`` settings of a config dict
    (without :data:`EXPERT_KEY_IGNORED`), as canonical JSON. ``distill.*`` (``distill.seed`` included)
    never enters: trials differing only there distil from the same experts."""
    flat = flatten_dotted({k: config[k] for k in ("data", "model", "experts")})
    return json.dumps({k: v for k, v in flat.items() if k not in EXPERT_KEY_IGNORED}, sort_keys=True, default=str)


def expert_fields(spec: SweepSpec) -> list[str]:
    """The searched fields an expert store depends on (``experts.curriculum``, ``model.width``, ...)."""
    return [f for f in searched_fields(spec)
            if f.split(".", 1)[0] in ("data", "model", "experts") and f not in EXPERT_KEY_IGNORED]


def expert_store_resolver(spec: SweepSpec, base_overrides: dict | None,
                          default_store: str) -> Callable[[dict], str]:
    """``store(config dict) -> expert store directory`` for the trials of a sweep.

    Trials whose data, model and experts settings (:func:`expert_key`) equal those of the space's
    unsearched configuration (preset + ``overrides``) use ``default_store`` (shared with every other run
    of the preset); a trial that searches such a setting (``experts.curriculum``, ``experts.seed``,
    ``model.width``...) to another value uses ``<default_store>-<searched values>`` (e.g.
    ``experts-curriculumTrue``), trained once by the driver. So both arms of a curriculum on/off sweep
    never share one store, while every ``distill.seed`` of a configuration does.
    """
    overrides = merge_nested(copy.deepcopy(spec.overrides), copy.deepcopy(base_overrides or {}))
    unsearched = load_config(spec.preset, overrides, validate=False).to_dict()
    base_key = expert_key(unsearched)
    relevant = expert_fields(spec)

    def store(config: dict) -> str:
        key = expert_key(config)
        if key == base_key:
            return default_store
        suffix = "-".join(short_label(f, get_dotted(config, f)) for f in relevant)
        if not suffix:  # not reachable from a space file; a stable name all the same
            suffix = hashlib.sha256(key.encode()).hexdigest()[:8]
        return f"{default_store}-{re.sub(r'[^A-Za-z0-9_.=+-]', '_', suffix)}"

    return store
