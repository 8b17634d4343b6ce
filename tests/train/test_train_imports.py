"""The shared loop receives its stage from the caller: nothing under ctgen/train/ imports ctgen.stages."""
import ast
import os

from helpers import REPO


def test_train_package_never_imports_stages():
    train_dir = os.path.join(REPO, "ctgen", "train")
    offenders = []
    for name in sorted(os.listdir(train_dir)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(train_dir, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {m}" for m in modules if m == "ctgen.stages" or m.startswith("ctgen.stages.")]
    assert not offenders, offenders
