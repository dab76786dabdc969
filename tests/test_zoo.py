"""The reference models have torchvision's layout: names, shapes and parameter counts."""

import importlib.util

import pytest
import torch

from fxlrd import count_params, zoo


def _expected_resnet_shapes(blocks, num_classes=1000):
    """torchvision's ResNet state-dict keys and shapes, written out from its architecture."""
    shapes = {"conv1.weight": (64, 3, 7, 7), "fc.weight": (num_classes, 2048), "fc.bias": (num_classes,)}

    def bn(prefix, c):
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{k}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for b in range(n):
            p = f"layer{i}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            for j, c in ((1, planes), (2, planes), (3, planes * 4)):
                bn(f"{p}.bn{j}", c)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return shapes


def _expected_vit_b_16_shapes():
    h, m = 768, 3072
    shapes = {
        "class_token": (1, 1, h), "conv_proj.weight": (h, 3, 16, 16), "conv_proj.bias": (h,),
        "encoder.pos_embedding": (1, 197, h), "encoder.ln.weight": (h,), "encoder.ln.bias": (h,),
        "heads.head.weight": (1000, h), "heads.head.bias": (1000,),
    }  # fmt: skip
    for i in range(12):
        p = f"encoder.layers.encoder_layer_{i}"
        shapes |= {
            f"{p}.ln_1.weight": (h,), f"{p}.ln_1.bias": (h,), f"{p}.ln_2.weight": (h,), f"{p}.ln_2.bias": (h,),
            f"{p}.self_attention.in_proj_weight": (3 * h, h), f"{p}.self_attention.in_proj_bias": (3 * h,),
            f"{p}.self_attention.out_proj.weight": (h, h), f"{p}.self_attention.out_proj.bias": (h,),
            f"{p}.mlp.0.weight": (m, h), f"{p}.mlp.0.bias": (m,), f"{p}.mlp.3.weight": (h, m), f"{p}.mlp.3.bias": (h,),
        }  # fmt: skip
    return shapes


CASES = [
    ("resnet50", _expected_resnet_shapes([3, 4, 6, 3]), 25_557_032),
    ("resnet101", _expected_resnet_shapes([3, 4, 23, 3]), 44_549_160),
    ("resnet152", _expected_resnet_shapes([3, 8, 36, 3]), 60_192_808),
    ("vit_b_16", _expected_vit_b_16_shapes(), 86_567_656),
]


@pytest.mark.parametrize("name, shapes, n_params", CASES, ids=[c[0] for c in CASES])
def test_torchvision_state_dict_loads_strictly(name, shapes, n_params):
    model = zoo.get(name)
    assert count_params(model) == n_params
    state = {k: torch.zeros(s) if s else torch.tensor(0) for k, s in shapes.items()}
    model.load_state_dict(state, strict=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16"])
def test_zoo_models_run(name):
    model = zoo.get(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_unknown_zoo_name():
    with pytest.raises(ValueError, match="unknown zoo model 'resnet18'"):
        zoo.get("resnet18")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")
@pytest.mark.parametrize("name", ["resnet50", "vit_b_16"])
def test_same_keys_as_installed_torchvision(name):
    import torchvision

    theirs = getattr(torchvision.models, name)(weights=None)
    ours = zoo.get(name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval(), ours.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")
@pytest.mark.parametrize("name", ["resnet50", "vit_b_16"])
def test_full_rank_reproduces_torchvision_models(name):
    import torchvision

    import fxlrd

    model = getattr(torchvision.models, name)(weights=None).eval()
    gm = fxlrd.transform(model, fxlrd.LRDConfig(rank_rule="fixed", rank=100_000, allow_larger=True))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
def test_full_rank_reproduces_a_timm_model():
    import timm

    import fxlrd

    model = timm.create_model("resnet18", pretrained=False).eval()
    gm = fxlrd.transform(model, fxlrd.LRDConfig(rank_rule="fixed", rank=100_000, allow_larger=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_dcgan_generator_has_the_papers_shape():
    """Latent (N, 100, 1, 1) → (N, 3, 64, 64) in [-1, 1] through five 4×4 transposed convs
    (512, 256, 128, 64, 3 channels, no biases), 3.58 M parameters."""
    model = zoo.get("dcgan_generator").eval()
    out = model(torch.randn(2, 100, 1, 1))
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    convs = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3] and all(c.bias is None for c in convs)
    assert count_params(model) == 3_576_704


def test_unet_has_the_papers_shape_and_decomposes_exactly_at_full_rank():
    """Padded U-Net: (N, 3, H, W) → (N, 2, H, W), 64–1024 channels, four 2×2 stride-2
    transposed convs, 31.04 M parameters; its transposed convs and skip concatenations
    survive capture (full rank reproduces it, fx and export)."""
    import fxlrd

    model = zoo.get("unet").eval()
    assert count_params(model) == 31_037_698
    ups = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels, u.stride) for u in ups] == [(128, 64, (2, 2)), (256, 128, (2, 2)),
                                                                        (512, 256, (2, 2)), (1024, 512, (2, 2))]  # fmt: skip
    small = zoo.unet(width=4).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert small(x).shape == (1, 2, 32, 32)
    full = fxlrd.LRDConfig(rank_rule="fixed", rank=100_000, allow_larger=True)
    for capture in ("fx", "export"):
        gm = fxlrd.transform(small, full, example_inputs=x, capture=capture)
        assert sum(lp.layer_type.endswith(("ConvTranspose2d", "conv_transpose2d")) for lp in gm.fxlrd_plan.decomposed) == 4
        torch.testing.assert_close(gm(x), small(x), rtol=1e-10, atol=1e-10)
