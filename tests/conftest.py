import collections.abc

import pytest

from .ringutil import end_computes


@pytest.fixture(autouse=True)
def _compute_threads_end_as_a_nodes_do() -> collections.abc.Iterator[None]:
    yield
    end_computes()
