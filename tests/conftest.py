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


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1 for the session, with the standard AWS settings pointing at it
    (AWS_ENDPOINT_URL, test credentials) in this process's environment, so subprocesses and Ray workers
    started from here inherit them. Yields the endpoint URL."""
    import helpers

    proc, endpoint = helpers.start_s3_server()
    saved = {k: os.environ.get(k) for k in [*helpers.S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(helpers.S3_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.kill()
    proc.wait()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on :func:`s3_server`; yields ``s3://<bucket>``."""
    import re

    import helpers

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 10000}"
    return helpers.make_bucket(s3_server, name)
