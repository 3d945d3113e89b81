"""Model registry: CIFAR ResNets, torchvision ImageNet models and a tiny test network."""
from .registry import ARCHS, ArchInfo, build_model, get_arch, load_teacher, read_state_dict, resolve_weights

__all__ = ["ARCHS", "ArchInfo", "build_model", "get_arch", "load_teacher", "read_state_dict", "resolve_weights"]
