import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Per-session cache; the real CIFAR-10 extraction is shared through CONTRA_RAY_TEST_CACHE if set."""
    return os.environ.get("CONTRA_RAY_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray instance for the module (never a cluster that RAY_ADDRESS or `ray start` names);
    one that is already running is reused and left running. Workers print to the driver (tests read it with
    capfd), and get tests/helpers.py by value, as they cannot import it."""
    import ray

    import helpers

    ray.cloudpickle.register_pickle_by_value(helpers)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    if started:
        ray.shutdown()
