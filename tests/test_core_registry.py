"""Registry: decorator, lookup by name (entry points), options, configs and helpful errors."""

import subprocess
import sys
import warnings

import attrs
import pytest

import kvpolicy
from kvpolicy import Policy, Selection, register_policy
from kvpolicy import registry


@pytest.fixture
def temporary_names():
    """Names registered by a test are removed afterwards (the registry is process-wide)."""
    names = []
    yield names
    for name in names:
        registry._REGISTRY.pop(name, None)


def known():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kvpolicy.list_policies()


def test_builtin_policies_are_listed_with_descriptions():
    policies = known()
    for name in ("full", "sliding_window", "streamingllm", "h2o", "snapkv", "pyramidkv"):
        assert name in policies and policies[name], name
    assert list(policies) == sorted(policies)
    assert policies["h2o"] == kvpolicy.policy_class("h2o").__doc__.strip().splitlines()[0]


def test_unknown_name_lists_known_names_and_closest_match():
    with pytest.raises(ValueError, match=r"unknown policy 'snapvk'; did you mean 'snapkv'\? Known policies: .*h2o.*sliding_window"):
        kvpolicy.get_policy("snapvk")
    with pytest.raises(ValueError, match=r"unknown policy 'pyramid'; did you mean 'pyramidkv'\?"):
        kvpolicy.get_policy("pyramid", budget="10%")
    with pytest.raises(ValueError, match=r"unknown policy 'zzzz'\. Known policies: (\w+, )*full, "):
        kvpolicy.policy_class("zzzz")


def test_unknown_option_lists_the_options():
    with pytest.raises(TypeError, match=r"policy 'snapkv' has no option\(s\) \['windw'\]; its options are "
                                        r"\['budget', 'kernel_size', 'pooling', 'window_size'\]"):
        kvpolicy.get_policy("snapkv", budget=650, windw=3)


def test_get_policy_on_an_instance():
    policy = kvpolicy.get_policy("streamingllm", budget="10%", num_sinks=2)
    assert kvpolicy.get_policy(policy) is policy
    rebudgeted = kvpolicy.get_policy(policy, budget=100)
    assert rebudgeted.budget == kvpolicy.Tokens(100) and rebudgeted.num_sinks == 2
    with pytest.raises(TypeError, match="options other than budget cannot be applied"):
        kvpolicy.get_policy(policy, num_sinks=3)


def test_register_a_policy(temporary_names):
    @register_policy("test_keep_first")
    @attrs.define(kw_only=True)
    class KeepFirst(Policy):
        """Keep the oldest tokens (test only)."""

        def select(self, keys, values, ctx):
            import torch
            return Selection(torch.arange(ctx.capacity).expand(*keys.shape[:2], -1).clone(), ctx.state)

    temporary_names.append("test_keep_first")
    assert known()["test_keep_first"] == "Keep the oldest tokens (test only)."
    policy = kvpolicy.get_policy("test_keep_first", budget=3)
    assert isinstance(policy, KeepFirst) and policy.name == "test_keep_first"
    assert kvpolicy.Policy.from_config(policy.to_config()) == policy
    # Re-registering the same class (e.g. a module reloaded) is fine; another class is not.
    register_policy("test_keep_first")(KeepFirst)
    with pytest.raises(ValueError, match=r"policy name 'test_keep_first' is already registered by .*KeepFirst"):
        @register_policy("test_keep_first")
        @attrs.define(kw_only=True)
        class Other(Policy):
            pass


@pytest.mark.parametrize("name", ["Bad", "1abc", "has-dash", "", "a b", None])
def test_bad_names(name):
    with pytest.raises(ValueError, match="must be lowercase letters, digits and '_'"):
        register_policy(name)


def test_only_policies_can_register():
    with pytest.raises(TypeError, match=r"@register_policy\('not_a_policy'\) decorates Policy subclasses"):
        register_policy("not_a_policy")(object)


def test_config_round_trip_with_options():
    for policy in (kvpolicy.get_policy("snapkv", budget="4%", window_size=16, kernel_size=5, pooling="avg"),
                   kvpolicy.get_policy("pyramidkv", budget=650, beta=10),
                   kvpolicy.get_policy("h2o", budget=0.2, heavy_ratio=0.25),
                   kvpolicy.get_policy("streamingllm", budget=300, num_sinks=1),
                   kvpolicy.get_policy("full")):
        config = policy.to_config()
        assert Policy.from_config(config) == policy
        assert type(policy).from_config(config) == policy
    assert kvpolicy.get_policy("snapkv", budget="4%").to_config()["budget"] == 0.04


def test_bad_configs():
    with pytest.raises(ValueError, match="a policy config is a dict with a 'name' key"):
        Policy.from_config({"budget": 650})
    with pytest.raises(ValueError, match="a policy config is a dict"):
        Policy.from_config("snapkv")
    with pytest.raises(TypeError, match=r"config names 'h2o' \(H2O\), not a SnapKV"):
        kvpolicy.policy_class("snapkv").from_config({"name": "h2o", "budget": 650})


def test_builtins_are_found_through_entry_points():
    # A fresh interpreter that never imports the policies package still finds them by name.
    code = ("import sys, warnings; warnings.simplefilter('ignore'); import kvpolicy; "
            "assert 'policies.snapkv' not in sys.modules; p = kvpolicy.get_policy('snapkv', budget=650); "
            "print(type(p).__module__, 'pyramidkv' in kvpolicy.list_policies())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["policies.snapkv", "True"]
    assert kvpolicy.ENTRY_POINT_GROUP == "kvpolicy.policies"


def _imported_modules(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def test_layering_rule():
    """kvpolicy imports nothing above it; a policy imports only kvpolicy and policies.common (never
    a sibling policy); policies.common imports only kvpolicy and itself."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for path in sorted((root / "kvpolicy").rglob("*.py")):
        for module in _imported_modules(path):
            assert module.split(".")[0] not in ("policies", "adapters", "benchmarks"), f"{path.name} imports {module}"
    for path in sorted((root / "policies").rglob("*.py")):
        parts = path.relative_to(root / "policies").parts
        own = parts[0] if len(parts) > 1 else None  # the package this file belongs to (scalekv, common)
        for module in _imported_modules(path):
            top = module.split(".")[0]
            where = f"policies/{'/'.join(parts)} imports {module}"
            if module.startswith("."):
                assert own is not None and not module.startswith(".."), where  # relative only inside its package
                continue
            assert top not in ("adapters", "benchmarks"), where
            if top == "policies":
                allowed = {"policies.common"} if own != "common" else set()
                assert any(module == a or module.startswith(a + ".") for a in allowed), where


def test_core_holds_no_policy_code():
    """No concrete policy's rule is defined in the core: kvpolicy/ defines no function or class named
    after a method's parts (drafters, observation windows, budget files, window selectors)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for path in sorted((root / "kvpolicy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                name = node.name.lower()
                for word in ("drafter", "refiner", "observation_window", "budgetfile", "budget_file", "windowpolicy",
                             "selectivity", "scalekv", "snapkv", "pyramid", "h2o"):
                    assert word not in name, f"kvpolicy/{path.name} defines {node.name}: policy code belongs in policies/"


def test_every_policy_module_has_an_entry_point():
    """A file or package in policies/ that registers a policy must be listed in pyproject's
    kvpolicy.policies entry points (else a fresh process cannot find it by name), and every entry
    point must name a module that exists."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    listed = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]["kvpolicy.policies"]
    modules = set()
    for path in (root / "policies").iterdir():
        if path.name.startswith(("_", ".")) or path.name == "common":
            continue
        if path.suffix == ".py":
            modules.add(f"policies.{path.stem}")
        elif path.is_dir() and (path / "__init__.py").exists():
            modules.add(f"policies.{path.name}")
    missing = sorted(modules - set(listed.values()))
    assert not missing, f"policies without an entry point in pyproject.toml: {missing}"
    for name, module in listed.items():
        assert module in modules, f"entry point {name} = {module!r} names no module in policies/"
        assert name in kvpolicy.list_policies(), f"entry point {name!r} registers no policy of that name"


def test_register_policy_refuses_a_class_attrs_has_not_built_yet():
    """The decorators in the wrong order would register the bare class (attrs replaces it)."""
    with pytest.raises(TypeError, match=r"not an attrs class yet: put @register_policy\('test_wrong_order'\) "
                                        r"above @attrs.define\(kw_only=True\)"):
        @attrs.define(kw_only=True)
        @register_policy("test_wrong_order")
        class WrongOrder(Policy):
            def select(self, keys, values, ctx):
                return Selection(None, ctx.state)
    assert "test_wrong_order" not in registry._REGISTRY
    with pytest.raises(TypeError, match="not an attrs class yet"):
        @register_policy("test_no_attrs")
        class NoAttrs(Policy):  # inherits attrs fields but was not built by attrs itself
            pass


def test_full_refuses_a_budget_instead_of_ignoring_it():
    """`full` keeps every token: a budget given to it would be silently meaningless, so it is refused."""
    with pytest.raises(ValueError, match=r"policy 'full' keeps every token and takes no budget, got budget=10%"):
        kvpolicy.get_policy("full", budget="10%")
    full = kvpolicy.get_policy("full")
    with pytest.raises(ValueError, match="takes no budget"):
        full.plan(kvpolicy.ScaleSchedule([1, 2, 4]), 2, budget=3)
    assert full.plan(kvpolicy.ScaleSchedule([1, 2, 4]), 2).capacities == ((None, None),) * 3
