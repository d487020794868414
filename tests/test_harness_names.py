"""The harness names no policy and no model family: it acts on what they declare (capabilities,
conditioning, presets, geometry), so a new policy or family is one registration, never an edit of
``benchmarks/``. Docstrings, comments, ``help=``/``description=`` texts and data files may name
them (they document and cite); code, identifiers, imports and other strings may not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import kvpolicy
from adapters.families import list_families

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
DOC_KEYWORDS = {"help", "description", "epilog", "model_help"}
# "full" is the harness's word for the uncompressed reference it runs with policy=None (and an English
# word in messages); the registered "full" policy is never looked up by the harness (capabilities:
# keeps_everything).
ORDINARY_WORDS = {"full"}


def forbidden_names() -> set[str]:
    names = {n for n in kvpolicy.list_policies() if n not in ORDINARY_WORDS}
    for family in list_families().values():
        names.add(family.name)
        names.update(family.presets)
    return names


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _doc_strings(tree) -> set[int]:
    """String constants inside help=/description= keyword values (argparse texts)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in DOC_KEYWORDS:
            ids.update(id(n) for n in ast.walk(node.value) if isinstance(n, ast.Constant))
    return ids


def code_words(source: str) -> list[tuple[int, str, bool]]:
    """(line, text, is_identifier) of every identifier, import path and non-documentation string."""
    tree = ast.parse(source)
    skip = _docstrings(tree) | _doc_strings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            out.append((node.lineno, node.value, False))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id, True))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr, True))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            out.append((node.lineno, node.name, True))
        elif isinstance(node, ast.arg):
            out.append((node.lineno, node.arg, True))
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or "", False))
            out.extend((node.lineno, a.name, False) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, False) for a in node.names)
    return out


def find_names(source: str, names) -> list[str]:
    pattern = re.compile(r"(?<![a-z0-9])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True))
                         + r")(?![a-z0-9])", re.I)
    short = {n.lower() for n in names if len(n) < 4}  # 'var' is also a variance in var_x: identifiers must equal it
    return [f"line {line}: {text!r}" for line, text, identifier in code_words(source)
            if any(m.group(1).lower() not in short or not identifier or text.lower() == m.group(1).lower()
                   for m in pattern.finditer(text))]


def test_the_check_sees_names_in_code_but_not_in_docs():
    names = {"snapkv", "infinity"}
    source = '''"""snapkv is documented here."""
import argparse
def f(policy):
    """infinity in a docstring is fine."""
    parser = argparse.ArgumentParser(description="for snapkv")
    parser.add_argument("--x", help="e.g. infinity-2b")  # a comment naming snapkv
    if policy == "snapkv":
        return infinity_schedule(1024)
'''
    found = find_names(source, names)
    assert found == ["line 7: 'snapkv'", "line 8: 'infinity_schedule'"] or sorted(found) == sorted(
        ["line 7: 'snapkv'", "line 8: 'infinity_schedule'"])


def test_no_policy_or_family_name_in_benchmarks_code():
    names = forbidden_names()
    assert {"scalekv", "snapkv", "infinity", "var", "var-tiny"} <= names
    found = {}
    for path in sorted(BENCHMARKS.rglob("*.py")):
        hits = find_names(path.read_text(), names)
        if hits:
            found[str(path.relative_to(BENCHMARKS.parent))] = hits
    assert not found, found
