"""Infinity (arXiv 2412.04431): a faithful, device-agnostic reimplementation of the inference path
that loads the official checkpoints and runs any kvpolicy cache policy.

Presets (``adapters.load_model(name, ...)``): infinity-2b, infinity-8b, infinity-layer12 … layer48,
and infinity-tiny (random weights, tiny T5 and byte tokenizer, tiny BSQ-VAE decoder; CPU, seconds).
"""

from functools import partial

from adapters.base import register_model
from adapters.geometry import register_geometry

from .config import PRESETS, TINY_CONFIG, InfinityConfig, InfinityPreset
from .model import InfinityTransformer
from .pipeline import InfinityModel, load_infinity
from .text import ByteTokenizer, TextEncoder, load_text_encoder, random_text_encoder
from .weights import load_transformer_weights, read_state_dict

for _name in PRESETS:
    register_model(_name, partial(load_infinity, _name))
register_geometry("infinity-tiny", "infinity", TINY_CONFIG.depth, TINY_CONFIG.num_heads, TINY_CONFIG.head_dim,
                  PRESETS["infinity-tiny"].default_resolution)

__all__ = ["InfinityConfig", "InfinityPreset", "InfinityTransformer", "InfinityModel", "load_infinity",
           "ByteTokenizer", "TextEncoder", "load_text_encoder", "random_text_encoder",
           "load_transformer_weights", "read_state_dict", "PRESETS"]
