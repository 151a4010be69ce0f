"""The package's layout stays readable: no import circle, no module over about 500 lines
(tools/package_shape.py measures both)."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("package_shape", os.path.join(REPO, "tools", "package_shape.py"))
package_shape = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package_shape)


def test_no_import_circle_in_the_package():
    edges = package_shape.graph(os.path.join(REPO, "openrlhf_sapo"))
    assert "openrlhf_sapo.patches" in edges and edges["openrlhf_sapo.upstream"] <= {
        "openrlhf_sapo", "openrlhf_sapo.utils.cpu_compat", "openrlhf_sapo.utils"}
    assert package_shape.circles(edges) == []
    # nothing imports the patches but the CLIs (workers import it by name)
    users = sorted(m for m, deps in edges.items() if "openrlhf_sapo.patches" in deps)
    assert all(m.startswith("openrlhf_sapo.cli.") for m in users), users


def test_the_tool_finds_a_circle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import x\n")
    (package / "c.py").write_text("import pkg.a\n")
    assert package_shape.circles(package_shape.graph(str(package))) == [["pkg.a", "pkg.b"]]


def test_no_module_over_about_500_lines():
    root = os.path.join(REPO, "openrlhf_sapo")
    sizes = {os.path.relpath(os.path.join(d, f), REPO): sum(1 for _ in open(os.path.join(d, f)))
             for d, _, files in os.walk(root) for f in files if f.endswith(".py")}
    assert {p: n for p, n in sizes.items() if n > 520} == {}
