from resexp.models.resnet import SHORTCUTS, ResNet, build_model, canonical_shortcut, count_parameters

__all__ = ["SHORTCUTS", "ResNet", "build_model", "canonical_shortcut", "count_parameters"]
