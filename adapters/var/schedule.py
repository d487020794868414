"""VAR's scale schedules without weights: the patch lists of the 256^2 and 512^2 models
(``shared/reference/var.md`` §1)."""

from __future__ import annotations

VAR_PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}

