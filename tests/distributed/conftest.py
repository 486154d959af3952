"""One local Ray for all Ray tests (started once, shut down after this package)."""

import pytest


@pytest.fixture(scope="package", autouse=True)
def ray_session():
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    yield
    if started:
        ray.shutdown()
