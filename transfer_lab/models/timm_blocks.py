"""A timm model's feature extractor as an ``nn.Sequential`` of blocks (input → pooled features).

Every strategy and analysis here addresses a backbone by its children (``Classifier.named_blocks``,
CKA's default layers, Net2Net) and by module path. timm models run their children in order for
most CNNs (ResNet, ConvNeXt, EfficientNet, MobileNet, RegNet, ...): their top-level children
become the blocks, with the ``stages`` / ``blocks`` / ``layers`` containers opened up one level
(``stages_0``, ``stages_1``, ...). A ``VisionTransformer`` also holds tensors outside any child
(class token, position embedding) and pools in code: those become two small modules,
``tokens`` and ``pool``. timm's ``head`` (e.g. ConvNeXt's norm + pooling once ``num_classes=0``)
is renamed ``pre_logits`` so that ``head`` only ever means our classifier.

A split is accepted only if it computes what the timm model computes (checked on one input in
eval mode); otherwise the whole timm model is one block (``backbone.model``): still correct,
addressable by path inside, just coarse for layer-wise strategies.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

CONTAINERS = ("stages", "blocks", "layers")


class TokenEmbed(nn.Module):
    """ViT's class/register tokens and position embedding (timm ``VisionTransformer._pos_embed``
    for a fixed image size), holding the same parameters."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.cls_token, self.reg_token, self.pos_embed = vit.cls_token, vit.reg_token, vit.pos_embed
        self.no_embed_class = vit.no_embed_class
        self.pos_drop = vit.pos_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1, -2) if x.ndim == 4 else x  # NHWC patch grid (some PatchEmbed configs)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token)
                  if t is not None]
        if self.pos_embed is None:
            return self.pos_drop(torch.cat(prefix + [x], dim=1))
        if self.no_embed_class:  # deit-3 / big-vision: add, then prepend the tokens
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:  # original ViT: the embedding covers the class token too
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.pos_drop(x)


class TokenPool(nn.Module):
    """ViT's token pooling (class token, mean, attention pool) then ``fc_norm`` and ``head_drop``."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.attn_pool, self.fc_norm, self.head_drop = vit.attn_pool, vit.fc_norm, vit.head_drop
        self.pool_type, self.num_prefix_tokens = vit.global_pool, vit.num_prefix_tokens
        self.include_prefix = getattr(vit, "pool_include_prefix", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers import global_pool_nlc

        if self.attn_pool is not None:
            x = self.attn_pool(x if self.include_prefix else x[:, self.num_prefix_tokens:])
        else:
            x = global_pool_nlc(x, pool_type=self.pool_type, num_prefix_tokens=self.num_prefix_tokens,
                                reduce_include_prefix=self.include_prefix)
        return self.head_drop(self.fc_norm(x))


def _vit_blocks(net: nn.Module) -> OrderedDict | None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(net, VisionTransformer) or net.dynamic_img_size:
        return None
    out: OrderedDict[str, nn.Module] = OrderedDict(patch_embed=net.patch_embed, tokens=TokenEmbed(net))
    for name in ("patch_drop", "norm_pre"):
        if not isinstance(getattr(net, name), nn.Identity):
            out[name] = getattr(net, name)
    out.update((f"blocks_{i}", b) for i, b in enumerate(net.blocks))
    out["norm"], out["pool"] = net.norm, TokenPool(net)
    return out


def _child_blocks(net: nn.Module) -> OrderedDict:
    out: OrderedDict[str, nn.Module] = OrderedDict()
    for name, m in net.named_children():
        if isinstance(m, nn.Identity):  # num_classes=0 leaves fc/classifier as Identity
            continue
        if name in CONTAINERS and isinstance(m, nn.Sequential):
            out.update((f"{name}_{i}", sub) for i, sub in enumerate(m))
        else:
            out["pre_logits" if name == "head" else name] = m
    return out


def _computes_same(seq: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            out = seq(x)
    except Exception:  # noqa: BLE001 — a wrong split often fails on shapes: fall back
        return False
    if out.is_meta:  # shapes only (a size check on the meta device): values cannot be compared
        return out.shape == ref.shape
    return out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def split_blocks(net: nn.Module, input_shape: tuple[int, int, int]) -> tuple[nn.Sequential, int]:
    """``(backbone, feature_dim)``: ``net`` (built with ``num_classes=0``) as a Sequential of
    blocks sharing its modules, with ``backbone.timm_keys`` = {our state-dict key: timm's}."""
    was_training = net.training
    net.eval()  # the check must not move BatchNorm statistics; Dropout off
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x)
    seq = None
    for build in (_vit_blocks, _child_blocks):
        blocks = build(net)
        if blocks is not None and _computes_same(nn.Sequential(blocks), x, ref):
            seq = nn.Sequential(blocks)
            break
    if seq is None:
        seq = nn.Sequential(OrderedDict(model=net))
    seq.train(was_training)
    theirs = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
    seq.timm_keys = {k: theirs[id(t)] for k, t in seq.state_dict(keep_vars=True).items()}
    return seq, int(ref.shape[1])
