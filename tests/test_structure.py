"""The package's layout as documented: docs/ARCHITECTURE.md names every module, d2ct's docstring
names only sub-packages that exist, and the lower stages do not import the higher ones."""
from __future__ import annotations

import ast
import importlib.util
import re

from .conftest import ROOT

PACKAGE = ROOT / "d2ct"


def documented_modules() -> set[str]:
    """Module paths (d2ct/...py) in the tree of docs/ARCHITECTURE.md, from its indentation."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text[text.index("```\nd2ct/\n") + 4:]
    block = block[:block.index("```")]
    found, stack = set(), []
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or len(m.group(1)) % 2:
            continue  # a continuation line of a description
        depth, name = len(m.group(1)) // 2, m.group(2)
        if depth == 0 and name != "d2ct/":
            break  # configs/, tools/, ...: the package's tree is over
        stack = stack[:depth] + [name.rstrip("/")]
        if name.endswith(".py"):
            found.add("/".join(stack))
        elif name.endswith("/"):  # a folder line may list its modules: "cli/  the ...: a.py, b.py"
            found.update("/".join(stack + [f]) for f in re.findall(r"\b(\w+\.py)\b", line))
    return found


def test_architecture_names_every_module():
    modules = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    documented = documented_modules()
    assert not modules - documented, f"not in docs/ARCHITECTURE.md: {sorted(modules - documented)}"
    assert not documented - modules, f"in docs/ARCHITECTURE.md but not in d2ct/: {sorted(documented - modules)}"


def test_package_docstring_names_real_modules():
    import d2ct

    names = set(re.findall(r"``(d2ct(?:\.\w+)+)", d2ct.__doc__))
    assert "d2ct.data" in names and "d2ct.utils" in names
    for name in names:
        assert importlib.util.find_spec(name) is not None, f"d2ct's docstring names {name}, which does not exist"


def _d2ct_imports(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("d2ct.")}


def test_lower_stages_do_not_import_higher_ones():
    """utils, data and postprocess never import the reports, the pipeline or the commands (score_image
    lives in d2ct.evaluation.metrics for that: postprocess.threshold needs it)."""
    higher = ("d2ct.evaluation.report", "d2ct.evaluation.cli", "d2ct.pipeline", "d2ct.engine.train_net",
              "d2ct.engine.predict", "d2ct.pseudolabel.cli", "d2ct.baseline.cli")
    for package in ("utils", "data", "postprocess"):
        for path in (PACKAGE / package).rglob("*.py"):
            if "cli" in path.parts or path.name == "cli.py":
                continue  # a command may use anything
            bad = sorted(m for m in _d2ct_imports(path) if m.startswith(higher))
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
