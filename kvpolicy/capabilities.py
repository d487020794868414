"""What a policy declares about itself, so that callers act on capabilities, never on names.

Every field is a class attribute of the policy (``Policy`` holds the defaults), read here into one
record:

- needs_queries / needs_raw_queries / stateful: what ``compress`` must be given (callers compute
  only that).
- requires_budget: a budget must be given (else the policy raises); keeps_everything: the policy
  never evicts (the full cache, the reference every comparison is made against).
- needs_calibration: the policy's plan derives from a model's calibration statistics. It then
  implements ``calibration_collector`` (the ``stats=`` object a generation feeds), and its
  ``calibration_option`` receives the result (or its JSON path). A harness that has none
  calibrates the model first, unless one of ``plan_sources`` is given (other options that fully
  define the plan, e.g. an explicit role table, or a flag that asks for the uncalibrated plan; a
  source set to None or False is not given).
- plan_file_option: the option that takes a plan/budget file (``--budget-file`` on the command
  line); such a file also defines the plan without calibration.
"""

from __future__ import annotations

from typing import Optional

import attrs


@attrs.frozen
class Capabilities:
    name: str
    needs_queries: Optional[bool] = False  # None (from a class): depends on the options
    needs_raw_queries: Optional[bool] = False
    stateful: bool = False
    requires_budget: bool = True
    keeps_everything: bool = False
    needs_calibration: bool = False
    calibration_option: Optional[str] = None
    plan_file_option: Optional[str] = None
    plan_sources: tuple = ()

    def plan_given(self, options: dict) -> bool:
        """Whether ``options`` already define the plan (a calibration, a plan file or a plan source)."""
        given = {k for k, v in (options or {}).items() if v is not None and v is not False}
        return bool(given & {self.calibration_option, self.plan_file_option, *self.plan_sources} - {None})

    def calibration_needed(self, options: dict) -> bool:
        """True when this policy must be calibrated before it can be built with ``options``."""
        return self.needs_calibration and not self.plan_given(options)


def capabilities(policy) -> Capabilities:
    """The capabilities of a policy instance, class or registered name."""
    from .policy import Policy
    from .registry import policy_class

    cls = policy_class(policy) if isinstance(policy, str) else (policy if isinstance(policy, type) else type(policy))
    if not issubclass(cls, Policy):
        raise TypeError(f"capabilities() takes a policy, its class or its registered name, got {policy!r}")
    fields = [f.name for f in attrs.fields(Capabilities) if f.name != "name"]
    # an instance answers for its options; a class leaves a per-instance property (queries needed in
    # one mode but not another) as None: "depends on the options"
    source = cls if isinstance(policy, (str, type)) else policy
    values = {f: None if isinstance(getattr(source, f), property) else getattr(source, f) for f in fields}
    record = Capabilities(name=cls.name, **values)
    if record.needs_calibration and record.calibration_option is None:
        raise TypeError(f"policy {cls.name!r} declares needs_calibration but no calibration_option (the option "
                        "that receives the calibration)")
    return record
