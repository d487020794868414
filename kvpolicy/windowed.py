"""Moved: the window selectors are policy code and live in ``policies.common`` now.

``from kvpolicy.windowed import RecentWindowPolicy`` becomes
``from policies.common import RecentWindowPolicy`` (likewise ``PatchWindowPolicy``,
``check_window_fits``, ``check_odd_kernel``).
"""

raise ImportError("kvpolicy.windowed moved to policies.common (the core holds no policy-specific code): "
                  "use `from policies.common import RecentWindowPolicy, PatchWindowPolicy`")
