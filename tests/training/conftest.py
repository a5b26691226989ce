"""One intra-op thread for every test here (see ``training_fixtures.one_torch_thread``)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield
