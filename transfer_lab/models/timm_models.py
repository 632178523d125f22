"""Any ``timm.create_model`` architecture as ``Classifier(backbone, head)``, with local weights.

``weights``: a local file (``.safetensors``, ``.pth``, ``.bin``, ... read weights-only), ``cache``
(the file timm would download, if the Hugging Face hub cache or torch hub cache already holds it;
nothing is fetched), or None (random init). The file's classifier (timm's ``pretrained_cfg
["classifier"]``) becomes the head when it has ``num_classes`` outputs (the model as it is) and is
left out otherwise (a new head); everything else must match the model
key for key and shape for shape, after timm's own ``checkpoint_filter_fn`` for the architecture
(which converts original-format checkpoints and resizes a ViT's position embedding to the
``image_size`` built here). A grey model gets the RGB first-layer filters summed (timm's
``adapt_input_conv``), as timm does for ``in_chans=1``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier, linear_head
from transfer_lab.models.timm_blocks import split_blocks
from transfer_lab.models.weights import load_head, load_strict, stats_config


def timm_model(in_channels: int, image_size: int, num_classes: int, name: str = "resnet18",
               weights: str | None = None, mean: list[float] | None = None,
               std: list[float] | None = None) -> Classifier:
    """A timm model's features (``num_classes=0``) split into blocks, plus a linear head: the
    weights file's classifier when it has ``num_classes`` outputs (``head_from_weights``), else new.

    Args:
        name: a ``timm.create_model`` name, optionally with a pretrained tag (``resnet18.a1_in1k``;
            the tag picks the statistics and the cached file).
        weights: local weights file, ``cache``, or None (random init).
        mean, std: input statistics of the weights, overriding timm's ``pretrained_cfg`` (e.g.
            weights you trained yourself on another dataset).

    The model carries ``data_config`` (see ``models.model_data_config``): timm's mean, std,
    input size and interpolation for the weights; None for a random init without ``mean``/``std``;
    and ``weights_file``: the file its weights came from (resolved for ``cache``), or None.
    """
    net = create(name, in_channels, image_size)
    path = None if weights is None else resolve_weights(net, name, weights)
    classifier = {} if path is None else load_timm_weights(net, path, name, in_channels)
    backbone, dim = split_blocks(net, (in_channels, image_size, image_size))
    model = Classifier(backbone, linear_head(dim, num_classes), dim,
                       (in_channels, image_size, image_size))
    model.timm_name, model.timm_classifier = name, _classifier_prefixes(net)[0]
    model.head_from_weights = load_head(model.head, classifier, model.timm_classifier)
    model.weights_file = None if path is None else str(path)  # for the run to hash and record
    model.data_config = timm_data_config(name, weights, mean, std, in_channels)
    return model


def create(name: str, in_channels: int, image_size: int) -> nn.Module:
    """``timm.create_model`` without its classifier; ``img_size`` for models that take it (ViTs
    build their position embedding for it)."""
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        raise ConfigError(f"model.name={name!r}: not a timm model (close: {', '.join(close) or '-'}; "
                          "list them with timm.list_models('pattern*'))")
    kw = dict(pretrained=False, num_classes=0, in_chans=in_channels)
    try:
        return timm.create_model(name, img_size=image_size, **kw)
    except TypeError:  # the architecture has no img_size argument (CNNs take any size)
        return timm.create_model(name, **kw)


def _classifier_prefixes(net: nn.Module) -> list[str]:
    head = net.pretrained_cfg.get("classifier") or "head"
    return [head] if isinstance(head, str) else list(head)


def cache_candidates(pretrained_cfg: dict) -> list[Path]:
    """Where timm's download would be, if it is on this machine: the hub cache, then torch hub's."""
    out: list[Path] = []
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        root = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                    or home / "hub")
        repo = root / ("models--" + hub_id.split("@")[0].replace("/", "--"))
        ref = repo / "refs" / "main"
        snaps = ([repo / "snapshots" / ref.read_text().strip()] if ref.is_file()
                 else sorted((repo / "snapshots").glob("*")))
        out += [s / f for s in snaps for f in ("model.safetensors", "pytorch_model.bin")]
    url = pretrained_cfg.get("url")
    if url:
        out.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name)
    return out


def resolve_weights(net: nn.Module, name: str, weights: str) -> Path:
    if weights != "cache":
        return Path(weights)
    candidates = cache_candidates(net.pretrained_cfg)
    for p in candidates:
        if p.is_file():
            return p
    where = ", ".join(str(p) for p in candidates) or "no download location in timm's pretrained_cfg"
    raise ConfigError(f"model.weights=cache: no cached weights for timm {name} (looked in: {where}); "
                      "download them once with network, or set model.weights=<local file>")


def load_timm_weights(net: nn.Module, path: Path, name: str, in_channels: int) -> dict:
    """Load the file into ``net``; returns the file's classifier tensors (not in ``net``)."""
    from transfer_lab.io import read_weights

    where = f"model.weights={path}"
    state = read_weights(path, "model.weights")
    filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own remapping for this architecture's checkpoints
        try:
            state = filter_fn(state, net)
        except Exception as e:  # noqa: BLE001 — a file for another architecture trips it
            raise ConfigError(f"{where}: not a checkpoint of timm {name} (timm's checkpoint filter: "
                              f"{type(e).__name__}: {e})") from None
    _adapt_first_conv(state, net, in_channels)
    return load_strict(net, state, where, f"timm {name}", skip=tuple(_classifier_prefixes(net)))


def _adapt_first_conv(state: dict, net: nn.Module, in_channels: int) -> None:
    first = net.pretrained_cfg.get("first_conv")
    if in_channels == 3 or not isinstance(first, str) or f"{first}.weight" not in state:
        return
    from timm.models import adapt_input_conv

    w = state[f"{first}.weight"]
    if w.ndim == 4 and w.shape[1] == 3:
        state[f"{first}.weight"] = adapt_input_conv(in_channels, w)


def timm_data_config(name: str = "resnet18", weights: str | None = None,
                     mean: list[float] | None = None, std: list[float] | None = None,
                     in_channels: int = 3, **_: object) -> dict | None:
    """Input statistics of a timm model's weights (timm's ``pretrained_cfg``), or None when it
    starts from random weights and no ``mean``/``std`` is given."""
    if weights is None and mean is None:
        return None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"model.name={name!r}: timm has no pretrained_cfg for it")
    return stats_config(mean if mean is not None else cfg.mean, std if std is not None else cfg.std,
                        cfg.input_size, cfg.interpolation,
                        "model.mean/std" if mean is not None else f"timm:{name}", in_channels)


timm_model.data_config = timm_data_config  # the run asks before it builds the data module


def timm_state_dict(model: Classifier) -> dict[str, torch.Tensor]:
    """The model's weights under timm's names (head as timm's classifier): a file that
    ``timm.create_model(name, num_classes=k)`` loads strictly, and ``model.weights`` reads back."""
    keys = getattr(model.backbone, "timm_keys", None)
    if keys is None or not isinstance(model.head, nn.Linear):
        raise ConfigError("timm_state_dict: not a model built by transfer_lab.models.timm_model")
    out = {keys[k]: v for k, v in model.backbone.state_dict().items()}
    out.update({f"{model.timm_classifier}.{k}": v for k, v in model.head.state_dict().items()})
    return out
