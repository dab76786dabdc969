"""The models the suite times, with their inputs and calibration data.

Zoo models (the DCGAN generator and U-Net too), BERT-base, the small Llama and the mixture of experts start from seeded random weights (latency depends only on shapes, and
every run rebuilds the same weights); EfficientNet-Lite1 and all-MiniLM-L6-v2 are the real
pretrained models of `benchmarks._real`, calibrated on real images and sentences.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fxlrd import zoo

__all__ = ["ModelSpec", "MODELS", "get", "describe_inputs"]

Inputs = Any  # a tensor, or a dict of keyword tensors
SEQUENCE = 128
CALIBRATION_BATCHES, CALIBRATION_BATCH = 4, 8
# MiniLM's text: docstrings of standard-library modules, calibration and timed inputs from different ones.
CALIBRATION_MODULES = ("collections", "argparse", "json", "pathlib", "logging", "typing")
TIMED_MODULES = ("unittest", "subprocess", "shutil", "csv")


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and feed it.

    Args:
        name: the name on the command line.
        describe: one line for reports.
        build: a fresh model in eval mode (the same weights in every process).
        inputs: batch size -> the inputs of one timed call.
        calibration: the calibration batches of the data-aware variants.
        tokens: the inputs are token ids (no channels_last layout).
    """

    name: str
    describe: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Inputs]
    calibration: Callable[[], list[Inputs]]
    tokens: bool = False


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return make().eval()

    return build


def _images(size: int, seed: int = 0) -> Callable[[int], torch.Tensor]:
    return lambda batch: torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _random_images(size: int) -> Callable[[], list[torch.Tensor]]:
    return lambda: [_images(size, seed=100 + i)(CALIBRATION_BATCH) for i in range(CALIBRATION_BATCHES)]


def _random_tokens(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import BertConfig

    ids = torch.randint(0, BertConfig().vocab_size, (batch, SEQUENCE), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig())


# SmolLM-135M's shape (HuggingFaceTB/SmolLM-135M's config): a small Llama, its MLPs gated (SwiGLU)
LLAMA_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)  # fmt: skip


def _llama_small() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(**LLAMA_SHAPE, use_cache=False))


# a mixture of experts of Qwen3-MoE's design, scaled to a 2-core CPU: 8 experts per layer, 2 per token, stacked
# expert weights run as transformers' batched_mm (the implementation torch.export captures and fxlrd factorizes)
MOE_SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=768,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=8,
                 num_experts_per_tok=2, norm_topk_prob=True, use_cache=False)  # fmt: skip
MOE_SEQUENCE = 32


def _moe() -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeModel

    return Qwen3MoeModel._from_config(Qwen3MoeConfig(**MOE_SHAPE), experts_implementation="batched_mm")


def _moe_grouped() -> nn.Module:
    """The same mixture in bfloat16 on transformers' default experts (grouped_mm, which export
    traces in bfloat16 only)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeModel

    return Qwen3MoeModel._from_config(Qwen3MoeConfig(**MOE_SHAPE), experts_implementation="grouped_mm").to(torch.bfloat16)


def _moe_tokens(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, MOE_SHAPE["vocab_size"], (batch, MOE_SEQUENCE), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _efficientnet() -> nn.Module:
    from ._real import efficientnet_lite1

    return efficientnet_lite1()


def _real_views(batch: int) -> torch.Tensor:
    from ._real import image_views

    return image_views(batch, seed=1000)


def _real_calibration_views() -> list[torch.Tensor]:
    from ._real import image_views

    views = image_views(CALIBRATION_BATCHES * CALIBRATION_BATCH, seed=0)
    return list(views.split(CALIBRATION_BATCH))


def _minilm() -> nn.Module:
    from ._real import minilm

    return minilm()[0]


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer():
    from ._real import minilm

    return minilm()[1]


def _minilm_inputs(batch: int) -> dict[str, torch.Tensor]:
    """``batch`` sentences (not calibration ones), padded to the full sequence length."""
    from ._real import docstring_sentences

    pool = docstring_sentences(TIMED_MODULES)
    sentences = [pool[i % len(pool)] for i in range(batch)]
    enc = _minilm_tokenizer()(sentences, padding="max_length", truncation=True, max_length=SEQUENCE, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _minilm_calibration() -> list[dict[str, torch.Tensor]]:
    from ._real import docstring_sentences, token_batches

    sentences = docstring_sentences(CALIBRATION_MODULES)[: CALIBRATION_BATCHES * CALIBRATION_BATCH]
    return token_batches(_minilm_tokenizer(), sentences, batch=CALIBRATION_BATCH, max_length=SEQUENCE)


def _latents(batch: int, seed: int = 0) -> torch.Tensor:
    """The DCGAN generator's inputs: standard normal latent vectors, as it is fed (its real data)."""
    return torch.randn(batch, 100, 1, 1, generator=torch.Generator().manual_seed(seed))


def _zoo_spec(name: str, describe: str) -> ModelSpec:
    return ModelSpec(name, describe, _seeded(lambda: zoo.get(name)), _images(224), _random_images(224))


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _zoo_spec("resnet50", "ResNet-50 (fxlrd.zoo, random weights), 224×224"),
        _zoo_spec("resnet101", "ResNet-101 (fxlrd.zoo, random weights), 224×224"),
        _zoo_spec("resnet152", "ResNet-152 (fxlrd.zoo, random weights), 224×224"),
        _zoo_spec("vit_b_16", "ViT-B/16 (fxlrd.zoo, random weights), 224×224"),
        ModelSpec("dcgan", "DCGAN generator (fxlrd.zoo, random weights): five transposed convs, 100-d latent to 64×64",
                  _seeded(zoo.dcgan_generator), _latents,
                  lambda: [_latents(CALIBRATION_BATCH, seed=100 + i) for i in range(CALIBRATION_BATCHES)]),  # fmt: skip
        ModelSpec("unet", "U-Net (fxlrd.zoo: the paper's 64–1024 channels, padded convs, four 2×2 transposed-conv "
                  "upsamplings; random weights), 128×128", _seeded(zoo.unet), _images(128), _random_images(128)),  # fmt: skip
        ModelSpec("bert_base", f"BERT-base (transformers BertModel(BertConfig()), random weights), sequence {SEQUENCE}",
                  _seeded(_bert_base), _random_tokens,
                  lambda: [_random_tokens(CALIBRATION_BATCH, seed=100 + i) for i in range(CALIBRATION_BATCHES)],
                  tokens=True),  # fmt: skip
        ModelSpec("llama_small", f"Llama of SmolLM-135M's shape (transformers LlamaModel, 30 layers, 576 wide, gated "
                  f"MLPs of 1536, random weights), sequence {SEQUENCE}", _seeded(_llama_small), _random_tokens,
                  lambda: [_random_tokens(CALIBRATION_BATCH, seed=100 + i) for i in range(CALIBRATION_BATCHES)],
                  tokens=True),  # fmt: skip
        ModelSpec("moe", f"mixture of experts (transformers Qwen3MoeModel, 8 layers, 512 wide, 8 stacked experts of 768 "
                  f"per layer, 2 per token, batched_mm; random weights), sequence {MOE_SEQUENCE}", _seeded(_moe), _moe_tokens,
                  lambda: [_moe_tokens(CALIBRATION_BATCH, seed=100 + i) for i in range(CALIBRATION_BATCHES)],
                  tokens=True),  # fmt: skip
        ModelSpec("moe_grouped", f"the mixture of experts above in bfloat16 on transformers' default grouped_mm experts "
                  f"(random weights), sequence {MOE_SEQUENCE}; torch.onnx cannot export grouped_mm", _seeded(_moe_grouped),
                  _moe_tokens, lambda: [_moe_tokens(CALIBRATION_BATCH, seed=100 + i) for i in range(CALIBRATION_BATCHES)],
                  tokens=True),  # fmt: skip
        ModelSpec("efficientnet_lite1", "EfficientNet-Lite1 (ImageNet weights), 240×240, real images",
                  _efficientnet, _real_views, _real_calibration_views),  # fmt: skip
        ModelSpec("minilm", f"all-MiniLM-L6-v2 (pretrained), sequence {SEQUENCE}, real sentences",
                  _minilm, _minilm_inputs, _minilm_calibration, tokens=True),  # fmt: skip
    )
}


def get(name: str) -> ModelSpec:
    """The `ModelSpec` called ``name``.

    Raises:
        KeyError: no such model (the message lists them).
    """
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose among {', '.join(MODELS)}") from None


def describe_inputs(inputs: Inputs) -> str:
    """Shapes of the inputs, e.g. ``1×3×224×224`` or ``input_ids 8×128, attention_mask 8×128``."""
    shape = lambda t: "×".join(map(str, t.shape))  # noqa: E731
    if isinstance(inputs, torch.Tensor):
        return shape(inputs)
    return ", ".join(f"{k} {shape(v)}" for k, v in inputs.items())
