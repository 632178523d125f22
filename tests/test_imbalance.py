"""Long-tailed targets: the exponential class profile and what each remedy changes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transfer_lab.data import SyntheticData
from transfer_lab.models import convnet
from transfer_lab.module import TransferModule
from transfer_lab.strategies.finetune import Finetune


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a shared CPU, intra-op threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def longtail(seed=0, **kw):
    base = dict(num_classes=5, shape=(1, 8, 8), n_train=120, n_test=10, val_fraction=0.1,
                imbalance_ratio=100, seed=seed)
    base.update(kw)
    return SyntheticData(**base).prepare()


@pytest.mark.parametrize("ratio, budget", [(100, None), (100, 100), (10, 50)])
def test_profile_is_exponential_from_the_smallest_full_class(ratio, budget):
    dm = longtail(imbalance_ratio=ratio, samples_per_class=budget)
    n_max = budget or 120 - 12  # the validation split (10%) comes off every class first
    expected = [max(1, int(n_max * ratio ** (-i / 4))) for i in range(5)]
    assert np.bincount(dm.y_train.numpy(), minlength=5).tolist() == expected
    assert dm.train_counts.tolist() == expected
    assert expected[0] / expected[-1] == pytest.approx(ratio, rel=0.25)
    assert np.bincount(dm.y_val.numpy()).tolist() == [12] * 5  # validation stays balanced


def test_subset_is_fixed_by_the_seed():
    a, b, c = longtail(seed=3), longtail(seed=3), longtail(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.y_train, c.y_train)  # same profile ...
    assert not torch.equal(a.x_train, c.x_train)  # ... drawn differently


def test_reweight_gives_inverse_frequency_weights_in_the_training_loss():
    dm = longtail(imbalance_remedy="reweight")
    counts = torch.as_tensor(dm.train_counts, dtype=torch.float)
    w = dm.class_weights
    assert torch.allclose(w * counts, (w * counts)[0].expand(5))  # w_c ∝ 1 / n_c
    assert w.mean() == pytest.approx(1.0)
    assert longtail().class_weights is None and longtail(imbalance_remedy="resample").class_weights is None
    torch.manual_seed(0)
    model = convnet(1, 8, 5, channels=[4])
    module = TransferModule(model, Finetune(), torch.optim.SGD, lr=0.1, num_classes=5,
                            class_weights=w)
    x, y = dm.transform(dm.x_train, train=False), dm.y_train
    with torch.no_grad():
        loss = module.training_step((x, y), 0)
        logits = model(x)
    nll = F.cross_entropy(logits, y, reduction="none")
    assert float(loss) == pytest.approx(float((w[y] * nll).sum() / w[y].sum()), rel=1e-5)
    assert float(loss) != pytest.approx(float(nll.mean()), rel=1e-3)
    # with inverse-frequency weights every class contributes equally: the weighted loss is the
    # mean over classes of each class's mean loss
    per_class = torch.stack([nll[y == c].mean() for c in range(5)])
    assert float(loss) == pytest.approx(float(per_class.mean()), rel=1e-5)


def test_resample_draws_classes_uniformly_and_plain_loading_follows_the_profile():
    dm = longtail(imbalance_remedy="resample")
    n = len(dm.y_train)
    loader = dm.train_dataloader()  # each pass over it is a new epoch (a new draw)
    seen = torch.cat([y for _ in range(40) for _, y in loader])
    freq = torch.bincount(seen, minlength=5).float() / len(seen)
    assert torch.allclose(freq, torch.full((5,), 0.2), atol=0.02)
    assert len(seen) == 40 * n  # an epoch is still N draws (with replacement)
    plain = longtail()
    seen = torch.cat([y for _, y in plain.train_dataloader()])
    assert torch.bincount(seen, minlength=5).tolist() == plain.train_counts.tolist()
    # the evaluation loaders are never resampled
    assert torch.equal(torch.cat([y for _, y in dm.test_dataloader()]), dm.y_test)


def test_results_record_balanced_and_per_class_accuracy_and_transferability(tmp_path):
    """results.json's per-class and balanced accuracy equal a recomputation from the saved target
    weights; its LogME/LEEP equal the scores of the stored source on the target training set."""
    from conftest import compose_cfg
    from transfer_lab.analysis import class_metrics, predict
    from transfer_lab.analysis.runs import load_run
    from transfer_lab.analysis.transferability import transferability
    from transfer_lab.run import run

    cfg = compose_cfg("strategy=finetune", "target.data.imbalance_ratio=4", "target.epochs=1",
                      "target.save_weights=full", store=tmp_path / "store")
    res = run(cfg, tmp_path / "run")
    loaded = load_run(tmp_path / "run", tmp_path / "store")
    want = class_metrics(*predict(loaded.target, loaded.target_dm), loaded.target_dm.num_classes)
    assert res["per_class"]["test/acc"] == pytest.approx(want["per_class_acc"], abs=1e-6)
    assert res["metrics"]["test/balanced_acc"] == pytest.approx(want["balanced_acc"], abs=1e-6)
    assert res["metrics"]["test/acc"] == pytest.approx(want["acc"], abs=1e-6)
    scores = transferability(loaded.source, loaded.target_dm, max_samples=2000, seed=0)
    assert res["transferability"]["logme"] == pytest.approx(scores["logme"], rel=1e-5)
    assert res["transferability"]["leep"] == pytest.approx(scores["leep"], rel=1e-5)
    scratch = run(compose_cfg("strategy=scratch", store=tmp_path / "store"), tmp_path / "scratch")
    assert "transferability" not in scratch  # no source, nothing to score


def test_augment_remedy_resamples_uniformly_and_crops_only_minority_classes():
    dm = longtail(imbalance_remedy="augment")
    loader = dm.train_dataloader()  # each pass is a new epoch (a new draw)
    seen = torch.cat([y for _ in range(40) for _, y in loader])
    freq = torch.bincount(seen, minlength=5).float() / len(seen)
    assert torch.allclose(freq, torch.full((5,), 0.2), atol=0.02)
    x, y = dm.x_train, dm.y_train  # class 0 is the largest; 1..4 are minority classes
    torch.manual_seed(0)
    out = dm.transform(x, train=True, y=y)
    plain = dm.transform(x, train=False)
    majority = y == 0
    assert torch.equal(out[majority], plain[majority])  # the head class is never touched
    changed = (out != plain).flatten(1).any(1)
    assert changed[~majority].float().mean() > 0.5  # most minority draws are shifted crops
    assert not torch.equal(dm.transform(x, train=True, y=y)[~majority], out[~majority])  # new each draw
    with pytest.raises(Exception, match="imbalance_remedy=augment: needs"):
        longtail(imbalance_remedy="augment", loader="torchvision")
