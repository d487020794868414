"""Compute dtypes the adapters accept: torch dtypes or their names, one table for every model."""

from __future__ import annotations

import torch

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    """``torch.bfloat16`` or ``"bf16"``/``"bfloat16"`` (likewise float32, float16) -> the torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"dtype {dtype!r} is not one of float32, bfloat16, float16 (torch dtypes or those names)")
