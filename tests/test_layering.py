"""Who may import whom (README, Architecture): checked on the source, imports inside functions included."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ctgen")

# part of ctgen -> the ctgen packages/modules it may import (besides itself)
RULES = {
    "volume": {"errors"},
    "io": {"volume", "errors"},
    "data": {"volume", "errors", "io", "text", "parallel"},
    # generation never pulls in the trainer, the stages or the data layer
    "generate": {"volume", "errors", "io", "text", "parallel", "weights", "configuration", "models", "sampling",
                 "convert"},
}


def _ctgen_imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "ctgen"]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "ctgen" and len(parts) > 1:
                yield node.lineno, parts[1]


def _files(part):
    single = os.path.join(PKG, part + ".py")
    if os.path.isfile(single):
        return [single]
    return sorted(os.path.join(PKG, part, f) for f in os.listdir(os.path.join(PKG, part)) if f.endswith(".py"))


@pytest.mark.parametrize("part", sorted(RULES))
def test_imports_follow_the_layering(part):
    allowed = RULES[part] | {part}
    bad = [f"{os.path.relpath(f, PKG)}:{line} imports ctgen.{mod}"
           for f in _files(part) for line, mod in _ctgen_imports(f) if mod not in allowed]
    assert not bad, bad
