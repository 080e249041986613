"""CoLoRA backbones for mmpretrain, mmseg and mmdet."""
