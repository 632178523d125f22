"""Performance paths, exercised on the CPU: the two data paths agree, the training step has no
per-step host syncs, and channels_last / torch.compile / bf16 / device-resident data change
speed only, not results. Speed itself is measured by ``python -m transfer_lab.bench``."""

import json
import os
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from transfer_lab.data import SyntheticData
from transfer_lab.errors import ConfigError
from transfer_lab.data.loader import PILDataset, normalize, pil_transform, random_crop
from transfer_lab.models import convnet
from transfer_lab.module import TransferModule
from transfer_lab.perf import ChannelsLast, Compile
from transfer_lab.builders import make_trainer
from transfer_lab.strategies.scratch import Scratch


def synth(**kw):
    base = dict(num_classes=4, shape=(3, 16, 16), n_train=24, n_test=16, val_fraction=0.0, batch_size=8)
    return SyntheticData(**{**base, **kw}).prepare()


def module_for(dm, seed=0):
    torch.manual_seed(seed)
    model = convnet(3, 16, dm.num_classes, channels=[4, 8])
    return TransferModule(model, Scratch(), partial(torch.optim.SGD, lr=0.05), lr=0.05,
                          num_classes=dm.num_classes)


def fit(dm, module, callbacks=(), **kw):
    args = dict(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0)
    trainer = L.Trainer(callbacks=list(callbacks), **{**args, **kw})
    trainer.fit(module, datamodule=dm)
    return trainer


def old_crop(x, padding, generator):
    """The reference: crop by four broadcast index tensors (the previous implementation)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def test_fused_crop_flip_equals_crop_then_mirror():
    x = torch.randint(0, 256, (16, 3, 10, 10), dtype=torch.uint8)
    ref = old_crop(x, 3, torch.Generator().manual_seed(4))
    assert torch.equal(random_crop(x, 3, torch.Generator().manual_seed(4)), ref)
    out = random_crop(x, 3, torch.Generator().manual_seed(4), flip=True)
    mirrored = [torch.equal(o, r.flip(-1)) for o, r in zip(out, ref)]
    assert all(m or torch.equal(o, r) for m, o, r in zip(mirrored, out, ref))
    assert 0 < sum(mirrored) < len(x)  # some images flipped, some not


def test_pil_path_gives_the_same_normalised_images_as_the_memory_path():
    dm = synth()
    tf = pil_transform(dm.mean, dm.std, train=False, augment="none", hflip=True, size=16)
    pil = torch.stack([PILDataset(dm.x_test, dm.y_test, tf)[i][0] for i in range(len(dm.y_test))])
    assert torch.allclose(pil, normalize(dm.x_test, dm.mean, dm.std), atol=1e-5)
    grey = synth(shape=(1, 16, 16))  # PIL mode "L"
    tf = pil_transform(grey.mean, grey.std, train=True, augment="crop", hflip=False, size=16)
    assert PILDataset(grey.x_train, grey.y_train, tf)[0][0].shape == (1, 16, 16)


def test_both_loaders_evaluate_a_model_identically_and_bad_loader_is_one_line():
    mem, pil = synth(), synth(loader="torchvision")
    module = module_for(mem)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    a = trainer.test(module, datamodule=mem, verbose=False)[0]
    b = trainer.test(module, datamodule=pil, verbose=False)[0]
    assert a["test/acc"] == b["test/acc"] and abs(a["test/loss"] - b["test/loss"]) < 1e-5
    seen = torch.cat([y for _, y in pil.train_dataloader()])  # seeded shuffle covers each once
    assert sorted(seen.tolist()) == sorted(pil.y_train.tolist())
    with pytest.raises(ConfigError, match="data.loader='dali': valid: memory, torchvision"):
        synth(loader="dali")


def test_training_makes_no_per_step_host_syncs(monkeypatch):
    """Python-level syncs (.item(), bool(t), float(t), .tolist(), .numpy()) counted over a fit:
    the count must not grow with the number of training steps."""
    calls = {"n": 0}
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            calls["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for steps in (1, 3):
        dm = synth(n_train=32, batch_size=4)
        calls["n"] = 0
        fit(dm, module_for(dm), limit_train_batches=steps, log_every_n_steps=1)
        counts.append(calls["n"])
    assert counts[0] == counts[1], f"host syncs grow with steps: {counts}"


def test_device_resident_data_reaches_the_step_normalised_as_uint8_on_the_device():
    dm = synth()
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["x"] = batch[0]
    trainer = fit(dm, module_for(dm), [Probe()], max_steps=1)
    assert dm.x_train.dtype == torch.uint8 and dm.x_train.device == trainer.strategy.root_device
    assert seen["x"].dtype == torch.float32 and abs(float(seen["x"].mean())) < 1.0


def _weights_after(dm, callbacks=(), **kw):
    module = module_for(dm)
    fit(dm, module, callbacks, max_steps=3, **kw)
    return module


def test_channels_last_changes_layout_not_results():
    dm = synth()
    ref = _weights_after(dm)
    layouts = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            w = pl_module.model.backbone[0][0].weight
            layouts.append(w.is_contiguous(memory_format=torch.channels_last))
    cl = ChannelsLast()
    got = _weights_after(dm, [cl, Probe()])
    assert all(layouts) and cl._handle is None  # hook removed when the Trainer is done
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_compile_keeps_parameter_names_and_results():
    pytest.importorskip("torch._dynamo")
    dm = synth()
    ref = _weights_after(dm)
    got = _weights_after(dm, [Compile(backend="eager")])
    assert list(got.state_dict()) == list(ref.state_dict())  # no "_orig_mod." prefix
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_bf16_mixed_runs_convolutions_in_bf16_and_keeps_float32_weights():
    dm = synth()
    dtypes = []
    module = module_for(dm)
    module.model.backbone[0][0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    fit(dm, module, max_steps=2, precision="bf16-mixed")
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_fast_trainer_preset_wires_the_perf_callbacks(tmp_path):
    cfg = compose_cfg("trainer=fast", "trainer.accelerator=cpu", store=tmp_path)
    trainer = make_trainer(cfg, "target", tmp_path, [])
    kinds = {type(c) for c in trainer.callbacks}
    assert {ChannelsLast, Compile} <= kinds and cfg.trainer.precision == "bf16-mixed"


def test_epoch_sums_merge_a_term_that_appears_mid_epoch():
    from transfer_lab.module import add_row

    sums, names = add_row(None, [], torch.tensor([1.0, 2.0]), ["loss", "task"])
    sums, names = add_row(sums, names, torch.tensor([1.0, 2.0]), ["loss", "task"])
    sums, names = add_row(sums, names, torch.tensor([5.0, 3.0, 7.0]), ["loss", "new", "task"])
    assert names == ["loss", "task", "new"]
    assert sums.tolist() == [7.0, 11.0, 3.0]


def test_nvml_check_is_turned_off_only_where_nvml_cannot_load(monkeypatch):
    """Without an NVIDIA driver the NVML check dlopens on every Adam step and falls back to the
    runtime count anyway; with one (or when the variable is not set) nothing changes."""
    import transfer_lab.perf as perf

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    for loadable, env, changed, after in ((False, "1", True, "0"), (True, "1", False, "1"),
                                          (False, None, False, None)):
        monkeypatch.setattr(perf, "_nvml_loadable", lambda v=loadable: v)
        if env is None:
            monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
        else:
            monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", env)
        assert perf.skip_nvml_check_without_driver() is changed
        assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == after


def test_bench_part_a_alternates_reps_a_pairs_and_reports_the_smaller_ratio(capsys, tmp_path):
    from transfer_lab.bench import main

    main(["--json", "--parts", "a", "--per-class", "4", "--epochs", "1", "--reps-a", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ratios = {name: fig["ratios"] for name, fig in summary["detail"]["a"].items()}
    assert ratios and all(len(r) == 2 and all(x > 0 for x in r) for r in ratios.values())
    assert summary["framework_vs_loop"] == min(fig["ratio"] for fig in summary["detail"]["a"].values())
