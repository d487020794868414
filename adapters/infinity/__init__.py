"""Infinity (arXiv 2412.04431): a faithful, device-agnostic reimplementation of the inference path
that loads the official checkpoints and runs any kvpolicy cache policy.

Presets (``adapters.load_model(name, ...)``): infinity-2b, infinity-8b, infinity-layer12 … layer48,
and infinity-tiny (random weights, tiny T5 and byte tokenizer, tiny BSQ-VAE decoder; CPU, seconds).
"""

from .config import PRESETS, TINY_CONFIG, InfinityConfig, InfinityPreset
from .model import InfinityTransformer
from .pipeline import InfinityModel, load_infinity
from .text import ByteTokenizer, TextEncoder, load_text_encoder, random_text_encoder
from .weights import load_transformer_weights, read_state_dict

from .family import FAMILY  # registers the family and its presets

__all__ = ["InfinityConfig", "InfinityPreset", "InfinityTransformer", "InfinityModel", "load_infinity",
           "ByteTokenizer", "TextEncoder", "load_text_encoder", "random_text_encoder",
           "load_transformer_weights", "read_state_dict", "PRESETS", "FAMILY"]
