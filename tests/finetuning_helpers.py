"""Local helpers of the fine-tuning strategy tests (tests/test_strategies_finetuning.py and
test_strategies_peft.py): a source/target model pair per architecture, and a few SGD steps."""

import torch

from transfer_lab.models import convnet, mlp, resnet_cifar
from transfer_lab.module import TransferModule

ARCHS = {  # (factory, input shape): CNN with BatchNorm, MLP with BatchNorm, ResNet with shortcuts
    "convnet": (lambda k: convnet(1, 12, k, channels=[4, 8]), (1, 12, 12)),
    "mlp": (lambda k: mlp(1, 8, k, hidden=[16, 12], batch_norm=True), (1, 8, 8)),
    "resnet": (lambda k: resnet_cifar(3, 8, k, depth=8, width=4), (3, 8, 8)),
}


def pair(arch="convnet", num_classes=3):
    make, shape = ARCHS[arch]
    torch.manual_seed(0)
    src = make(4)
    for m in src.modules():  # BN buffers unlike a fresh init, so a copy is visible
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.add_(0.3)
            m.running_var.mul_(1.5)
    torch.manual_seed(1)
    return src, make(num_classes), shape


def batch(shape, k=3, n=8):
    return torch.randn(n, *shape), torch.randint(0, k, (n,))


def make_module(model, strategy, lr=0.1):
    return TransferModule(model, strategy, lambda g: torch.optim.SGD(g, lr=lr), lr=lr, num_classes=3)


def train_steps(model, strategy, shape, steps=2, batches=None):
    """A few SGD steps through the module's own optimizer.

    Returns the names that got a gradient tensor and those whose gradient was ever non-zero.
    """
    module = make_module(model, strategy)
    module.train()
    opt = module.configure_optimizers()
    got, nonzero = set(), set()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        b = batches() if batches else batch(shape, n=16)
        module.training_step(b, 0).backward()
        opt.step()
        got |= {n for n, p in model.named_parameters() if p.grad is not None}
        nonzero |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    return got, nonzero
