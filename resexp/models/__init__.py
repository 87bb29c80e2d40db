from resexp.models.resnet import SHORTCUTS, NetSpec, ResNet, build_model, canonical_shortcut, count_parameters

__all__ = ["SHORTCUTS", "NetSpec", "ResNet", "build_model", "canonical_shortcut", "count_parameters"]
