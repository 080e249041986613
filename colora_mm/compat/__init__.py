"""Fixes for what mmengine/mmcv 2.x do wrong on current torch."""
