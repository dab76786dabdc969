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

# `make test` runs the suite in pytest-xdist workers, one per core: each worker takes its share
# of the cores for torch's threads, so the workers do not oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the error relative to the output's scale."""
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected.double()).abs().max().item() / scale


def tiny_bert(layers: int = 1, heads: int = 2, seed: int = 0):
    """A BertModel of hidden size 32 (intermediate 64, 100 tokens, 64 positions) in eval mode."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()
