"""Issue 8 transferability scores: LogME and LEEP against direct computations, and a trained
source outranking a random network (the other analyses: test_analysis.py)."""

import numpy as np
import pytest
import torch

from transfer_lab.analysis import leep, logme, transferability
from transfer_lab.analysis.transferability import logme_column, logme_evidence
from transfer_lab.data import SyntheticData
from transfer_lab.models import convnet

# these tensors are tiny: conftest's one_thread keeps a shared CPU's intra-op threads out of the way
pytestmark = pytest.mark.usefixtures("one_thread")


F_TINY = np.array([[1.0, 0.0], [0.9, 0.2], [0.1, 1.0], [0.0, 0.8], [0.5, 0.5], [0.8, 0.1]])
Y_TINY = np.array([0, 0, 1, 1, 1, 0])


def gaussian_log_evidence(f, y, alpha, beta):
    """log N(y; 0, FFᵀ/α + I/β) / N: the marginal likelihood LogME maximises, computed directly."""
    cov = f @ f.T / alpha + np.eye(len(y)) / beta
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (y @ np.linalg.solve(cov, y) + logdet + len(y) * np.log(2 * np.pi))) / len(y)


def test_logme_evidence_equals_the_gaussian_marginal_likelihood_and_is_maximised():
    col = (Y_TINY == 1).astype(float)
    for alpha, beta in [(1.0, 1.0), (0.3, 7.0), (5.0, 0.5)]:
        assert logme_evidence(F_TINY, col, alpha, beta) == pytest.approx(
            gaussian_log_evidence(F_TINY, col, alpha, beta), abs=1e-10)
    best, alpha, beta = logme_column(F_TINY, col)
    grid = [gaussian_log_evidence(F_TINY, col, a, b)
            for a in np.geomspace(1e-3, 1e3, 31) for b in np.geomspace(1e-3, 1e3, 31)]
    assert best >= max(grid) - 1e-9  # the fixed point is the maximum, not just a stationary guess
    for da, db in [(1.05, 1), (1 / 1.05, 1), (1, 1.05), (1, 1 / 1.05)]:
        assert best >= gaussian_log_evidence(F_TINY, col, alpha * da, beta * db)
    assert logme(F_TINY, Y_TINY) == pytest.approx(
        np.mean([logme_column(F_TINY, (Y_TINY == c).astype(float))[0] for c in (0, 1)]))


def test_leep_matches_a_hand_computation():
    theta = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    y = np.array([0, 1, 1])
    # P(y,z) = 1/3 Σ θ: y=0: (0.3, 0.0333); y=1: (0.2667, 0.4); P(z) = (0.5667, 0.4333)
    p_y_given_z = np.array([[0.3 / (1.7 / 3), (0.1 / 3) / (1.3 / 3)],
                            [(0.8 / 3) / (1.7 / 3), (1.2 / 3) / (1.3 / 3)]])
    by_hand = np.mean([np.log(theta[i] @ p_y_given_z[y[i]]) for i in range(3)])
    assert leep(theta, y) == pytest.approx(by_hand, abs=1e-12)
    # a source whose classes map one-to-one onto the target's scores log 1 = 0
    assert leep(np.eye(2)[[0, 1, 1, 0]], np.array([1, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_trained_source_outranks_a_random_network_on_synthetic_data():
    dm = SyntheticData(num_classes=4, shape=(1, 12, 12), n_train=60, n_test=10, noise=0.5,
                       val_fraction=0.0).prepare()
    torch.manual_seed(0)
    random_net = convnet(1, 12, 4, channels=[8, 16])
    torch.manual_seed(0)
    good = convnet(1, 12, 4, channels=[8, 16])
    opt = torch.optim.Adam(good.parameters(), lr=0.01)
    x = dm.transform(dm.x_train, train=False)
    for _ in range(25):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(good(x), dm.y_train).backward()
        opt.step()
    s_good, s_rand = transferability(good.eval(), dm), transferability(random_net.eval(), dm)
    assert s_good["n"] == 240
    assert s_good["logme"] > s_rand["logme"] and s_good["leep"] > s_rand["leep"]


@pytest.mark.parametrize("n, d", [(21, 512), (8, 64), (200, 16)])
def test_logme_is_finite_with_fewer_samples_than_feature_dims(n, d):
    """n < d (a pretrained 512-d backbone on a few labelled images) used to drive β negative
    through rounding (math domain error); the score must be finite whatever the shape."""
    from transfer_lab.analysis.transferability import logme

    rng = np.random.default_rng(0)
    f = rng.standard_normal((n, d)) * 3.0 + 1.0
    y = np.arange(n) % 3
    assert np.isfinite(logme(f, y))
