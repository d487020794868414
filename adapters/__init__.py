"""Model adapters: faithful reimplementations of Infinity and VAR that call kvpolicy in every
self-attention layer. ``load_model(name)`` builds a preset; ``geometry`` holds weight-free tables."""

from .base import GenerationOutput, list_models, load_model, register_model, resolve_policy

__all__ = ["GenerationOutput", "list_models", "load_model", "register_model", "resolve_policy"]
