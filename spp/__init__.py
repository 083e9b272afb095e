"""spp: Solution Path Pruning (Ding et al., ICLR 2025) for vision transformers, LLMs and CLIP.

One LBI search over pair-wise structured masks gives a whole family of pruned models;
any member is compressed exactly into a smaller dense model. Model families (timm ViT/DeiT and
Swin, Hugging Face Llama/Mistral/Qwen2/Qwen3, OPT and CLIP) are plug-ins in :mod:`spp.models`; importing
``spp`` imports neither timm nor transformers. CLIP's loss, retrieval and zero-shot evaluation are in
:mod:`spp.contrastive`, its image-caption data in :mod:`spp.data`.
"""
from . import contrastive, criteria, tasks
from .calibrate import calibrate_nu, search_optimizer
from .create import create_model
from .weights import load_checkpoint
from .compress import compress, load_pruned, pruned_widths, save_pruned
from .family import Member, Summary, WeightFamily
from .flops import count_flops, count_params
from .masks import add_masks, freeze_weights, is_masked, mask_parameters, remove_masks, set_masks
from .models import mask_pairs
from .models.common import nominal_attention
from .optim import LBI
from .path import SolutionPath, support_sizes
from .structure import PAIRS, Widths
from .tasks import next_token_loss

__version__ = "0.1.0"

__all__ = [
    "LBI", "calibrate_nu", "next_token_loss", "search_optimizer", "add_masks", "remove_masks", "is_masked",
    "mask_parameters", "freeze_weights", "set_masks", "MaskedAttention", "MaskedMlp", "SolutionPath",
    "support_sizes", "WeightFamily", "Member", "Summary", "compress", "pruned_widths", "nominal_attention",
    "PrunedAttention", "save_pruned", "load_pruned", "create_model", "load_checkpoint", "count_flops",
    "count_params", "PAIRS", "Widths", "mask_pairs", "keep_cpu_memory", "contrastive", "criteria", "tasks",
]

_VIT_NAMES = ("MaskedAttention", "MaskedMlp", "PrunedAttention")


def __getattr__(name):   # timm's modules (and the runtime) load on first use of these names, not on `import spp`
    if name in _VIT_NAMES:
        from .models import vit
        value = getattr(vit, name)
    elif name == "keep_cpu_memory":
        from .runtime import keep_cpu_memory as value
    else:
        raise AttributeError(f"module 'spp' has no attribute {name!r}")
    globals()[name] = value   # later lookups (and pdoc, which reads the module's namespace) find it directly
    return value

