# UperNet, Swin-T with CoLoRA on the MLP pairs (gamma 16, share_ratio 0.5): the base's
# adapter. ADE20K, 160k iterations, 8 GPUs x 2 images, 512x512 crops, upstream's Swin
# optimiser and schedule.
_base_ = '../_base_/upernet_swin-t_ade20k.py'
