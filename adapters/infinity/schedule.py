"""Infinity's scale schedules without weights: the aspect-ratio templates, pn names and resolutions.

Facts: ``shared/reference/infinity.md`` §2.2 and §7. Light (no model code), so ``kvpolicy plan``
can use it; the model builds its schedules from the same tables.
"""

from __future__ import annotations

from kvpolicy import ScaleSchedule

# Infinity aspect-ratio templates (h/w >= 1), 13 scales each, for the '1M' (1024^2-class) size.
INFINITY_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}
# Inverse templates are transposes, keyed int(1000 / r) / 1000 as in the official code.
for _ratio, _shapes in list(INFINITY_TEMPLATES.items()):
    if _ratio != 1.0:
        INFINITY_TEMPLATES[int(1000 / _ratio) / 1000] = tuple((w, h) for h, w in _shapes)
INFINITY_TEMPLATES = dict(sorted(INFINITY_TEMPLATES.items()))

# pn names are prefixes of a template: number of scales used.
INFINITY_PN_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
# 1:1 pixel size -> pn name.
INFINITY_RESOLUTION_PN = {256: "0.06M", 512: "0.25M", 768: "0.60M", 1024: "1M"}


# How far h/w may lie from a template key and still name it: the inverse keys are truncated to three
# decimals (1/1.5 -> 0.666), so 2/3 = 0.6667 must find 0.666; the closest two keys are 0.05 apart.
TEMPLATE_TOLERANCE = 0.002


def infinity_template(aspect_ratio: float = 1.0) -> float:
    """The template key of h/w. Deviation: the official code silently takes the closest template
    (1.37 -> 1.333, 100 -> 3); a value that names no template is refused here with the list of
    templates and the closest one, so the image has the shape that was asked for."""
    if isinstance(aspect_ratio, bool) or not isinstance(aspect_ratio, (int, float)) or not aspect_ratio > 0:
        raise ValueError(f"aspect ratio h/w must be a number > 0, got {aspect_ratio!r}")
    closest = min(INFINITY_TEMPLATES, key=lambda r: abs(r - aspect_ratio))  # first minimum on ties, as official
    if abs(closest - aspect_ratio) > TEMPLATE_TOLERANCE:
        allowed = ", ".join(f"{r:g}" for r in INFINITY_TEMPLATES)
        raise ValueError(f"aspect ratio h/w {aspect_ratio:g} is not one of Infinity's templates ({allowed}); "
                         f"the closest is {closest:g}")
    return closest


def infinity_schedule(pn: str | int = "1M", aspect_ratio: float = 1.0) -> ScaleSchedule:
    """Transformer scale schedule for a pn name ('0.06M'…'1M') or 1:1 resolution (256…1024)."""
    if isinstance(pn, int) and not isinstance(pn, bool):
        if pn not in INFINITY_RESOLUTION_PN:
            raise ValueError(f"Infinity resolution {pn} is not one of {sorted(INFINITY_RESOLUTION_PN)}")
        pn = INFINITY_RESOLUTION_PN[pn]
    if pn not in INFINITY_PN_SCALES:
        raise ValueError(f"Infinity pn {pn!r} is not one of {list(INFINITY_PN_SCALES)} (or 256/512/768/1024)")
    shapes = INFINITY_TEMPLATES[infinity_template(aspect_ratio)]
    return ScaleSchedule(shapes[: INFINITY_PN_SCALES[pn]])
