"""spp: Solution Path Pruning for vision transformers (Ding et al., ICLR 2025).

One LBI search over pair-wise structured masks gives a whole family of pruned models;
any member is compressed exactly into a smaller dense model.
"""
from .calibrate import calibrate_nu, search_optimizer
from .checkpoint import create_model, load_checkpoint
from .compress import PrunedAttention, compress, load_pruned, nominal_attention, pruned_widths, save_pruned
from .family import Member, Summary, WeightFamily
from .flops import count_flops, count_params
from .masks import (MaskedAttention, MaskedMlp, add_masks, freeze_weights, mask_parameters,
                    remove_masks, set_masks)
from .optim import LBI
from .path import SolutionPath, support_sizes
from .runtime import keep_cpu_memory
from .structure import PAIRS, Widths, mask_pairs

__version__ = "0.1.0"

__all__ = [
    "LBI", "calibrate_nu", "search_optimizer", "add_masks", "remove_masks", "mask_parameters", "freeze_weights", "set_masks",
    "MaskedAttention", "MaskedMlp", "SolutionPath", "support_sizes", "WeightFamily", "Member",
    "Summary", "compress", "pruned_widths", "nominal_attention", "PrunedAttention", "save_pruned", "load_pruned",
    "create_model", "load_checkpoint", "count_flops", "count_params", "PAIRS", "Widths", "mask_pairs",
    "keep_cpu_memory",
]
