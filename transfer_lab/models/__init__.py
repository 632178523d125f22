from transfer_lab.models.backbones import convnet, lenet, mlp, resnet_cifar, torchvision_model
from transfer_lab.models.classifier import Classifier
from transfer_lab.models.timm_models import timm_model, timm_state_dict
from transfer_lab.models.weights import model_data_config

__all__ = ["Classifier", "convnet", "lenet", "mlp", "model_data_config", "resnet_cifar", "timm_model",
           "timm_state_dict", "torchvision_model"]
