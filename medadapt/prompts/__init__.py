"""CILMP: LLM-conditioned low-rank prompt interventions for CLIP-like VLMs and for SAM's prompts.

::

    from medadapt.prompts import CILMPConfig, encode_descriptions
    reps = encode_descriptions(None, {"grey_matter": "...", "white_matter": "..."})  # bundled MiniLM
    cfg = CILMPConfig.from_representations(reps, "run/class_reps.safetensors")
    ma.inject(sam, cfg)                       # SAM: one mask per class, no clicks
    masks = class_mask_logits(sam, images)    # (B, n_cls, 4h, 4w) logits

Importing this package needs torch only; ``transformers`` (extra ``llm``) and ``open_clip`` (extra
``clip``) are imported when used.
"""

from ..core.config import register_method
from .apply import apply_cilmp, find_clip_models, find_mask_decoders, representation_tensor
from .class_tokens import ClassTokenIntervention
from .clip_learner import ZERO_SHOT_TEMPLATE, CLIPPromptLearner, DeepVisualPrompts, prompt_token_ids
from .config import VARIANTS, CILMPConfig
from .interventions import ConditionalIntervention, DiReFT, LoReFT, LowRankProjection, LowRankRotation
from .representations import (
    default_cache_dir,
    default_language_model_path,
    encode_descriptions,
    load_representations,
    save_representations,
)
from .sam_head import CILMPPromptHead, ClassPromptedMaskDecoder, class_mask_logits

register_method(CILMPConfig, apply_cilmp)

__all__ = [
    "CILMPConfig",
    "CILMPPromptHead",
    "CLIPPromptLearner",
    "ClassPromptedMaskDecoder",
    "ClassTokenIntervention",
    "ConditionalIntervention",
    "DeepVisualPrompts",
    "DiReFT",
    "LoReFT",
    "LowRankProjection",
    "LowRankRotation",
    "VARIANTS",
    "ZERO_SHOT_TEMPLATE",
    "apply_cilmp",
    "class_mask_logits",
    "default_cache_dir",
    "default_language_model_path",
    "encode_descriptions",
    "find_clip_models",
    "find_mask_decoders",
    "load_representations",
    "prompt_token_ids",
    "representation_tensor",
    "save_representations",
]
