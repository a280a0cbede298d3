"""Every paper model: forward/backward, any input size, the timm model surface, bad input."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import tokenmixers

from .conftest import MICRO_MODELS


# the four scales of a family run the same code: shapes and sizes are checked at micro scale (the parity
# tests in test_checkpoint.py cover every scale)
@pytest.mark.parametrize("name", MICRO_MODELS)
def test_forward_backward_small(name: str) -> None:
    model = timm.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 64, 48)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MICRO_MODELS)
def test_any_input_size(name: str) -> None:
    model = timm.create_model(name).eval()
    for size in [(32, 32), (65, 97), (224, 224), (256, 320)]:
        with torch.no_grad():
            feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
        for i, f in enumerate(feats):
            stride = 4 * 2**i
            assert f.shape[-2:] == (math.ceil(size[0] / stride), math.ceil(size[1] / stride)), size
            assert torch.isfinite(f).all()


@pytest.mark.parametrize("family", ["halo", "pvt", "swin", "convnext", "dcn_v3"])
def test_the_model_compiles_as_one_graph(family: str) -> None:
    # torch.compile fuses only within a graph: a break (data-dependent Python, an untraceable call) would leave
    # part of the model eager. One block per stage traces the same code as the full model; a size that is
    # no whole number of windows takes the padding paths too.
    cfg = tokenmixers.zoo.FAMILIES[family].configs["micro"].replace(depths=(1, 1, 1, 1))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(tokenmixers.UnifiedNet(cfg).eval())(torch.randn(1, 3, 200, 168))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("name", MICRO_MODELS)
def test_features_only(name: str) -> None:
    model = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(1, 3, 96, 128))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [f.shape[-2:] for f in feats] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    partial = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert len(partial(torch.randn(1, 3, 64, 64))) == 2


@pytest.mark.parametrize("name", MICRO_MODELS)
def test_timm_model_surface(name: str) -> None:
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, *model.pretrained_cfg["pool_size"])
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        logits = model(x)
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, feats) and torch.allclose(inter[-1], feats)
        model.set_grad_checkpointing(True)
        assert torch.allclose(model(x), logits, atol=1e-5)
        model.set_grad_checkpointing(False)
        model.reset_classifier(0)
        assert model(x).shape == pre.shape
        model.reset_classifier(0, "")
        assert model(x).shape == (2, model.head_hidden_size, 7, 7)
        model.reset_classifier(5, "avg")
        assert model(x).shape == (2, 5)
    assert model.get_classifier() is model.head.fc
    groups = model.group_matcher()
    assert groups["stem"] == r"^stem"


@pytest.mark.parametrize("name", MICRO_MODELS)
def test_grad_checkpointing_gives_the_same_gradients(name: str) -> None:
    # training mode (batch statistics, recomputed forward): the loss and every gradient are those without it
    model = timm.create_model(name, num_classes=3).double().train()
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        loss = model(x).logsumexp(-1).sum()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, a), (loss_b, b) = grads
    assert torch.equal(loss_a, loss_b)
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-12, atol=1e-15), n


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """``fn()`` and the bytes of the distinct storages autograd keeps for its backward pass."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("convnext_style", [False, True])
@pytest.mark.parametrize("tokens", [(9, 11), (8, 8)])  # 2 x 9 x 11 tokens > 128 hidden channels: folded; 2 x 8 x 8 not
def test_layer_scale_folded_into_the_mlp_keeps_less(convnext_style: bool, tokens: tuple[int, int]) -> None:
    from tokenmixers.backbone import Block
    from tokenmixers.mixers import create_mixer

    torch.manual_seed(0)
    block = Block(32, create_mixer("dwconv", 32), layer_scale_init=0.5, convnext_style=convnext_style).double()
    with torch.no_grad():
        block.ls2.gamma.normal_()  # every channel scaled differently
    x = torch.randn(2, *tokens, 32, dtype=torch.float64, requires_grad=True)

    def unfolded() -> torch.Tensor:  # the block as written in the paper: gamma scales the MLP's output
        if convnext_style:
            return x + block.ls2(block.mlp(block.norm2(block.mixer(x))))
        y = x + block.ls1(block.mixer(block.norm1(x)))
        return y + block.ls2(block.mlp(block.norm2(y)))

    reference, reference_bytes = _saved_bytes(unfolded)
    out, kept_bytes = _saved_bytes(lambda: block(x))
    fc2 = block.mlp.fc2
    if x[..., 0].numel() > fc2.in_features:  # kept: the scaled weights and bias instead of the MLP's output
        assert reference_bytes - kept_bytes == 8 * (x.numel() - fc2.weight.numel() - fc2.bias.numel()) > 0
        assert torch.allclose(out, reference, rtol=0, atol=1e-13)
    else:
        assert kept_bytes == reference_bytes and torch.equal(out, reference)
    with torch.no_grad():  # without autograd the output is scaled as written
        assert torch.equal(block(x), unfolded())
    u = torch.randn_like(out)
    wanted = [x, block.ls2.gamma, fc2.weight, fc2.bias, block.mlp.fc1.weight]
    for a, b in zip(torch.autograd.grad(out, wanted, u), torch.autograd.grad(reference, wanted, u)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_the_3x3_kernels_are_stored_channels_last() -> None:
    model = timm.create_model("unified_swin_micro")
    kernels = [model.stem.conv1, model.stem.conv2, *(s.downsample.conv for s in model.stages[1:])]
    assert all(k.weight.is_contiguous(memory_format=torch.channels_last) for k in kernels)
    assert not model.stem.conv1.weight.is_contiguous()  # so this test would notice the layout going
    # the layout changes nothing computed: an NCHW copy gives the same outputs and gradients
    nchw = timm.create_model("unified_swin_micro").to(memory_format=torch.contiguous_format)
    nchw.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 56)
    out, ref = model(x), nchw(x)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    assert torch.allclose(model.stem.conv1.weight.grad, nchw.stem.conv1.weight.grad, rtol=1e-4, atol=1e-5)


def test_no_weight_decay_names() -> None:
    nwd = timm.create_model("unified_swin_micro").no_weight_decay()
    assert "stages.0.blocks.0.mixer.relative_position_bias_table" in nwd
    nwd = timm.create_model("unified_halo_micro").no_weight_decay()
    assert {"stages.2.blocks.3.mixer.height_rel", "stages.2.blocks.3.mixer.width_rel"} <= nwd
    model = timm.create_model("unified_pvt_micro")
    nwd = model.no_weight_decay()
    assert nwd == {f"stages.{i}.blocks.0.pos.pos_embed" for i in range(4)}
    names = dict(model.named_parameters())
    assert all(n in names for n in nwd)
    assert timm.create_model("unified_convnext_micro").no_weight_decay() == set()


def test_pvt_pos_embed_resized_to_grid() -> None:
    model = timm.create_model("unified_pvt_micro")
    pos = model.stages[0].blocks[0].pos
    assert pos.pos_embed.shape == (1, 32, 56, 56)
    x = torch.zeros(1, 20, 30, 32)
    out = pos(x)
    assert out.shape == x.shape
    # corners are kept by align_corners=True resizing
    assert torch.allclose(out[0, 0, 0], pos.pos_embed[0, :, 0, 0])
    assert torch.allclose(out[0, -1, -1], pos.pos_embed[0, :, -1, -1])
    assert torch.equal(pos(torch.zeros(1, 56, 56, 32))[0], pos.pos_embed[0].permute(1, 2, 0))


def test_table_vi_switches() -> None:
    base = tokenmixers.ModelCfg("dwconv", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    b = tokenmixers.UnifiedNet(base, norm_after_pool=True)
    assert isinstance(b.head.norm, torch.nn.LayerNorm)
    c = tokenmixers.UnifiedNet(base.replace(norm_after_pool=True, stage_norms=False))
    assert all(isinstance(s.norm, torch.nn.Identity) for s in c.stages)
    d = tokenmixers.UnifiedNet(base, block_style="convnext", mixer_args={"projections": False})
    block = d.stages[0].blocks[0]
    assert isinstance(block.norm1, torch.nn.Identity) and isinstance(block.ls1, torch.nn.Identity)
    x = torch.randn(1, 3, 64, 64)
    for model in (b, c, d):
        assert model(x).shape == (1, 1000)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 1, 64, 64), "expected 3 input channels, got 1"),
        ((3, 64, 64), r"add a batch dimension"),
        ((1, 3, 31, 64), "below the minimum size 32x32"),
        ((1, 3, 64, 16), "below the minimum size 32x32"),
    ],
)
def test_bad_input_is_clear(shape: tuple[int, ...], message: str) -> None:
    model = timm.create_model("unified_halo_micro")
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


@pytest.mark.parametrize("dtype, message", [
    (torch.float64, r"input is torch.float64 but the model's weights are torch.float32: convert the input"),
    (torch.uint8, r"input is torch.uint8, the model needs floating-point images"),
])
def test_wrong_input_dtype_is_clear(dtype: torch.dtype, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        timm.create_model("unified_convnext_micro").eval()(torch.zeros(1, 3, 32, 32, dtype=dtype))


@pytest.mark.parametrize("name", ["unified_convnext_micro", "unified_idyn_dwconv_micro"])
def test_single_sample_training_fails_clearly(name: str) -> None:
    # at 32 px the last stage is 1x1: one sample gives the head's (and idyn_dwconv's) BatchNorm one value per channel
    model = timm.create_model(name, num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="uses BatchNorm over the batch, so training needs more than one value per "
                                         "channel: use at least 2 samples per process"):
        model(x)
    assert model.eval()(x).shape == (1, 3)


def test_bad_config_is_clear() -> None:
    with pytest.raises(ValueError, match="unknown option.*'window'.*accepted options: window_size, shift_size"):
        timm.create_model("unified_swin_micro", mixer_args={"window": 5})
    with pytest.raises(KeyError, match="unknown mixer .attention.; registered mixers: .*dwconv.*halo.*swin"):
        tokenmixers.UnifiedNet(tokenmixers.ModelCfg("attention", (1,), (32,)))
    with pytest.raises(ValueError, match="unknown block_style 'metaformer'; accepted: transformer, convnext"):
        timm.create_model("unified_halo_micro", block_style="metaformer")
    with pytest.raises(ValueError, match="depths has 4 stages but dims has 3"):
        tokenmixers.ModelCfg("halo", (1, 1, 1, 1), (32, 64, 128))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tokenmixers.UnifiedNet(tokenmixers.ModelCfg("halo", (1,), (30,), heads=(4,)))
    with pytest.raises(ValueError, match="unknown model argument.*'depth'.*architecture arguments: mixer, depths"):
        timm.create_model("unified_halo_micro", depth=(1, 1, 1, 1))
