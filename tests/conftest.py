"""Fixtures; helpers live in `griffin_cases` (this directory is on sys.path)."""

import pytest
from griffin_cases import CASES, OfficialCase


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def official_case(request) -> OfficialCase:
    return CASES[request.param]
