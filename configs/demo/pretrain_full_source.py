# Demo step 1: train the whole model (backbone from scratch, adapter method 'full') on
# the source domain.
_base_ = './_base_/upernet_convnext-demo_shapes-64x64.py'
