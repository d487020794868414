"""VAR (Tian et al., arXiv 2404.02905): class-conditional next-scale prediction, with any KV policy.

``load_model("var-tiny")`` (random weights, CPU in about a second) or ``load_model("var-d30",
weights=None|path|"random", vae_weights=None|path|"random", device="cuda", dtype=torch.bfloat16)``;
``None`` downloads the official files from the Hugging Face hub (``FoundationVision/var``).
"""

from __future__ import annotations

from .config import PRESETS, VAE_FILE, VARConfig, VARPreset, VQVAEConfig
from .generate import TeacherForcedOutput, VARModel, check_labels, parse_dtype
from .loader import build_model, load_var
from .model import VARTransformer
from .vqvae import VQVAE
from .weights import WeightsUnavailableError, fill_var, fill_vqvae, materialize, resolve_source

from .family import FAMILY  # registers the family (its loader is load_var)

__all__ = ["PRESETS", "VARConfig", "VQVAEConfig", "VARModel", "VARTransformer", "VQVAE", "TeacherForcedOutput",
           "WeightsUnavailableError", "build_model", "load_var", "check_labels", "FAMILY"]
