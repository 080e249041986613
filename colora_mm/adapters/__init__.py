"""CoLoRA and baseline adapters in pure PyTorch (no OpenMMLab import)."""
from .base import (ADAPTER_PREFIX, AdaptedLayer, Adapter, NotFoldableError,
                   is_adapter_name)
from .colora_pair import CoLoRAPair, CoLoRAPairLayer, pair_ranks
from .conv_adapter import ConvAdapter
from .filter import RangeKernelFilter, gaussian_kernel1d, reflect_indices
from .hira import HiRA
from .inject import (DEFAULT_GAMMA, METHOD_KEYS, METHODS, AdapterSpec,
                     adapter_state_dict, inject_adapters, is_peft_trainable,
                     iter_adapted_layers, mark_trainable, merge_adapters,
                     norm_parameter_names, reset_adapters_from_weights, resolve_names,
                     spec_keys_used, spec_type_error, spec_types, trainable_report,
                     unmerge_adapters)
from .lora import LoRA, LowRankFactors, PiSSA
from .pair_batch import pair_factors_stacked
from .spatial import SpatialLowRankBranch, spatial_style

__all__ = [
    'ADAPTER_PREFIX', 'AdaptedLayer', 'Adapter', 'NotFoldableError', 'is_adapter_name',
    'CoLoRAPair', 'CoLoRAPairLayer', 'pair_ranks', 'ConvAdapter', 'RangeKernelFilter',
    'gaussian_kernel1d', 'reflect_indices', 'HiRA', 'DEFAULT_GAMMA', 'METHOD_KEYS',
    'METHODS', 'AdapterSpec', 'adapter_state_dict', 'inject_adapters',
    'is_peft_trainable', 'iter_adapted_layers', 'mark_trainable', 'merge_adapters',
    'norm_parameter_names', 'reset_adapters_from_weights', 'resolve_names',
    'spec_keys_used', 'spec_type_error', 'spec_types', 'trainable_report',
    'unmerge_adapters', 'LoRA', 'LowRankFactors', 'PiSSA', 'pair_factors_stacked',
    'SpatialLowRankBranch', 'spatial_style',
]
