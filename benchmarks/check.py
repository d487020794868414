"""``kvpolicy check NAME``: run the policy test kit (``kvpolicy.testing``) and print its table.

Exit status 0 when every invariant holds, 1 when one breaks (the table shows hypothesis' minimal
failing case under it), 2 for bad arguments (an unknown policy, hypothesis not installed).
"""

from __future__ import annotations

import sys


def add_check_parser(sub, add_option_arg) -> None:
    p = sub.add_parser("check", help="check a policy's invariants (kvpolicy.testing) on drawn cases; table of pass/fail")
    p.add_argument("policy", metavar="NAME", help="a registered policy (use --plugin FILE for one in your file)")
    p.add_argument("--examples", type=int, default=25, help="hypothesis examples per property (default 25)")
    p.add_argument("--invariants", default=None, help="comma-separated subset (default: all)")
    add_option_arg(p)


def check_command(args) -> int:
    import kvpolicy
    from kvpolicy.testing.invariants import check_invariant_names
    from kvpolicy.testing.runner import require_hypothesis, run_checks

    from .policy_spec import parse_policy_options

    if args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    kvpolicy.policy_class(args.policy)  # unknown name: the registry's message with the closest match
    invariants = check_invariant_names(args.invariants) if args.invariants else None
    options = parse_policy_options(args.option, [args.policy]).get(args.policy, {})
    try:
        require_hypothesis()
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    report = run_checks(args.policy, examples=args.examples, options=options, invariants=invariants)
    print(report.table())
    sys.stdout.flush()
    return 0 if report.passed else 1
