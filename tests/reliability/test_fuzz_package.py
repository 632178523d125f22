"""Property tests over package configs: random resolver strings, nested ``_target_``s, odd value
types and keys. Every generated config is either refused with one ``ConfigError`` line or builds
the allow-listed model it names — never anything else, never another exception, never a side
effect."""

from __future__ import annotations

import atexit
import fnmatch
import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reliability.test_safe_loading import make_spec, write_package
from transfer_lab.errors import ConfigError
from transfer_lab.model_spec import MODEL_FACTORIES, build_model_from_spec, parse_config
from transfer_lab.models import Classifier, mlp
from transfer_lab.package import read_package

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
VICTIM = Path(tempfile.mkdtemp(prefix="fuzz_package_")) / "victim.txt"
VICTIM.write_text("precious")
atexit.register(shutil.rmtree, VICTIM.parent, True)
PAYLOADS = [f"${{oc.create:${{oc.decode:'{{_target_: builtins.open, _args_: [{VICTIM}, w]}}'}}}}",
            "${oc.env:HOME}", "${model.hidden}", "${oc.decode:'[1, 2]'}", "x${y}", "${", "$ {}"]
TARGETS = ["transfer_lab.models.mlp", "transfer_lab.models.convnet", "transfer_lab.models.lenet",
           "transfer_lab.models.resnet_cifar", "transfer_lab.models.torchvision_model",
           "transfer_lab.models.Classifier", "transfer_lab.models.backbones.mlp", "builtins.open",
           "os.system", "torch.nn.Linear", "transfer_lab.models.timm_model", "", "mlp"]
KEYS = ["hidden", "dropout", "batch_norm", "channels", "depth", "width", "arch", "weights",
        "checkpoint", "in_channels", "num_classes", "_args_", "_partial_", "_recursive_",
        "_convert_", "_target_"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 64), st.sampled_from([4094, 2**31 - 2, -2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(PAYLOADS),
    st.text(max_size=12), st.sampled_from(["resnet18", "mobilenet_v3_small", "IMAGENET1K_V1"]))
nodes = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=4),
        st.builds(lambda t, rest: {"_target_": t, **rest}, st.sampled_from(TARGETS),
                  st.dictionaries(st.sampled_from(KEYS), inner, max_size=2))),
    max_leaves=8)
plausible = {"hidden": st.lists(st.integers(1, 16), max_size=3), "dropout": st.floats(0, 0.9),
             "batch_norm": st.booleans(), "channels": st.lists(st.integers(1, 8), min_size=1, max_size=3),
             "depth": st.sampled_from([8, 14, 9, 20]), "width": st.integers(1, 8),
             "arch": st.sampled_from(["resnet18", "mobilenet_v3_small", "no_such_net"])}


OPTIONS = {"mlp": ["hidden", "dropout", "batch_norm"], "convnet": ["channels", "batch_norm"],
           "lenet": [], "resnet_cifar": ["depth", "width"], "torchvision_model": ["arch"]}


@st.composite
def configs(draw) -> dict:
    """Half near-valid (an allow-listed factory with its own options, sometimes one odd value),
    half anything: foreign targets, wrong keys, nested nodes."""
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(OPTIONS)))
        model = {"_target_": f"transfer_lab.models.{name}"}
        keys = draw(st.lists(st.sampled_from(OPTIONS[name] or KEYS), max_size=3, unique=True))
    else:
        model = {"_target_": draw(st.sampled_from(TARGETS))}
        keys = draw(st.lists(st.sampled_from(KEYS), max_size=4, unique=True))
    for key in keys:
        odd = key not in plausible or draw(st.integers(0, 5)) == 0
        model[key] = draw(nodes) if odd else draw(plausible[key])
    odd = lambda: draw(st.integers(0, 4)) == 0  # noqa: E731 — one field in five is anything
    config: dict = {"model": model,
                    "input_shape": draw(nodes) if odd() else draw(st.sampled_from([[1, 8, 8], [3, 16, 16]])),
                    "num_classes": draw(nodes) if odd() else draw(st.integers(1, 5))}
    if odd():
        config[draw(st.sampled_from(["data", "optimizer", "seed", "note"]))] = draw(nodes)
    return config


def _allowed(target: object) -> bool:
    return isinstance(target, str) and any(fnmatch.fnmatchcase(target, p) for p in MODEL_FACTORIES)


@FUZZ
@given(config=configs())
def test_random_package_config_is_refused_or_builds_the_allow_listed_model(config):
    blob = json.dumps(config).encode()  # NaN/Infinity are written as such: the parser must refuse
    try:
        model = build_model_from_spec(parse_config(blob, "fuzz.zip"), "fuzz.zip", device="meta")
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.zip: "), str(e)
        event("refused")
    else:
        event("built")
        assert isinstance(model, Classifier) and _allowed(config["model"]["_target_"])
        assert "${" not in blob.decode()
    assert VICTIM.read_text() == "precious"


STATE = mlp(1, 8, 3, hidden=[16], batch_norm=True).state_dict()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(config=configs(), keyed=st.booleans())
def test_random_package_is_refused_or_read_whole(tmp_path, config, keyed):
    spec = make_spec(config["model"]) if keyed and isinstance(config["model"], dict) else config
    pkg = write_package(tmp_path / "p.zip", STATE, {**config, **spec})
    try:
        state, read, _ = read_package(pkg)
    except ConfigError as e:
        assert "\n" not in str(e) and str(pkg) in str(e), str(e)
    else:  # only an mlp config matching the weights exactly can pass
        assert read["model"]["_target_"] == "transfer_lab.models.mlp" and state.keys() == STATE.keys()
    assert VICTIM.read_text() == "precious"
