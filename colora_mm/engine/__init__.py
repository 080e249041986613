"""Hooks and optimizer constructors, registered in mmengine's root registries (found
from mmseg and mmdet configs alike)."""
from .adapter_settings import (adapter_settings, config_adapter_settings,
                               recorded_adapter_settings, settings_differences)
from .checkpoint_hook import AtomicCheckpointHook, find_resumable_checkpoint
from .complexity import (format_stage_table, measure_flops, parameter_parts,
                         stage_summary, weight_update_flops)
from .hooks import (CoLoRAReportHook, MergeReinitHook, fold_independent_parts,
                    reset_optimizer_state)
from .layer_decay_resnet import LayerDecayResNetOptimizerConstructor, resnet_layer_id

__all__ = [
    'AtomicCheckpointHook', 'find_resumable_checkpoint', 'adapter_settings',
    'config_adapter_settings', 'recorded_adapter_settings', 'settings_differences',
    'CoLoRAReportHook', 'MergeReinitHook', 'LayerDecayResNetOptimizerConstructor',
    'fold_independent_parts', 'reset_optimizer_state', 'measure_flops',
    'parameter_parts', 'weight_update_flops', 'resnet_layer_id', 'stage_summary',
    'format_stage_table',
]
