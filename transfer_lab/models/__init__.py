from transfer_lab.models.backbones import convnet, lenet, mlp, resnet_cifar, torchvision_model
from transfer_lab.models.classifier import Classifier

__all__ = ["Classifier", "convnet", "lenet", "mlp", "resnet_cifar", "torchvision_model"]
