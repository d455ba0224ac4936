import pytest

from tests.cases import CASES, make_case


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    """(name, config, canonical weights, x) for every option case."""
    cfg = CASES[request.param]
    weights, x = make_case(cfg)
    return request.param, cfg, weights, x
