import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fxlrd", deadline=None, max_examples=int(os.environ.get("FXLRD_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow],
    # CI gets the same examples every run (a red CI must mean a change broke something);
    # locally each run explores new ones.
    derandomize=bool(os.environ.get("CI")),
)  # fmt: skip
settings.load_profile("fxlrd")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the error relative to the output's scale."""
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected.double()).abs().max().item() / scale
