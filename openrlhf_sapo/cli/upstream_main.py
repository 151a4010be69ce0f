"""Upstream's `__main__` block of openrlhf/cli/train_ppo_ray.py, compiled into functions.

OpenRLHF builds its parser, validates the arguments and calls `train(args)` inside `if __name__ ==
"__main__":`, with no function to reuse. Instead of copying those statements, `upstream_main()` reads
the installed module's source, checks the structure this file relies on and compiles three pieces of
it, unchanged, as functions:

- `build_parser()`: the statements from `parser = argparse.ArgumentParser()` up to (not
  including) `args = parser.parse_args()`, returning upstream's own parser object;
- `validate(args)`: the statements between `args = hierarchize(args)` and the trailing
  `if args.use_ms:` block (upstream's checks and defaults; it mutates args and uses `assert`);
- `use_modelscope(args)`: that trailing block (patches the hub when --use_ms), run only
  before a real training run, never by --dry-run.

They run with the module's own globals: the top-level imports of the module they reference
(`argparse`, `datetime`), or, if they ever reference anything else, the imported module's
namespace. `assert` statements are compiled with optimize=0, so upstream's checks also hold
under `python -O`. If the source no longer has the expected shape, `UpstreamMismatch` says
what was expected and what was found.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import functools
import importlib
import importlib.util
import os
import symtable
import sys
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Callable, Dict, Iterable, Optional, Sequence

from openrlhf_sapo import OPENRLHF_VERSION, upstream

UPSTREAM_MODULE = "openrlhf.cli.train_ppo_ray"
UPSTREAM_CONFIG_MODULE = "openrlhf.utils.config"

# The anchors of upstream's `__main__` block, as `ast.unparse` prints them.
FIRST_STATEMENT = "parser = argparse.ArgumentParser()"
PARSE_STATEMENT = "args = parser.parse_args()"
HIERARCHIZE_IMPORT = "from openrlhf.utils.config import hierarchize"
HIERARCHIZE_STATEMENT = "args = hierarchize(args)"
USE_MS_TEST = "args.use_ms"
TRAIN_STATEMENT = "train(args)"


@dataclass(frozen=True)
class UpstreamMain:
    """Upstream's `__main__` block, compiled from its source into callables."""

    build_parser: Callable[[], argparse.ArgumentParser]
    validate: Callable[[SimpleNamespace], None]
    use_modelscope: Callable[[SimpleNamespace], None]
    filename: str


def _mismatch(filename: str, what: str) -> upstream.UpstreamMismatch:
    return upstream.UpstreamMismatch(
        f"{filename}: {what}. openrlhf_sapo.cli.train_ppo_ray reuses the `if __name__ == \"__main__\":` block of "
        f"openrlhf=={OPENRLHF_VERSION}'s cli/train_ppo_ray.py and expects: `{FIRST_STATEMENT}` first, "
        f"`{PARSE_STATEMENT}`, then `{HIERARCHIZE_IMPORT}` and `{HIERARCHIZE_STATEMENT}`, the validation, an "
        f"`if {USE_MS_TEST}:` block and `{TRAIN_STATEMENT}` last. Install openrlhf=={OPENRLHF_VERSION}, or "
        "update openrlhf_sapo/cli/upstream_main.py for the new upstream layout."
    )


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ('__name__ == "__main__"', "__name__ == '__main__'")


def _index(body: Sequence[ast.stmt], text: str, filename: str) -> int:
    found = [i for i, stmt in enumerate(body) if ast.unparse(stmt) == text]
    if len(found) != 1:
        raise _mismatch(filename, f"the __main__ block has {len(found)} statements `{text}`, expected exactly one")
    return found[0]


def _function(name: str, params: Sequence[str], body: Sequence[ast.stmt], returns: Optional[str]) -> ast.FunctionDef:
    """A function wrapping upstream statements; they keep their line numbers (tracebacks point into upstream)."""
    body = list(body)
    if returns is not None:
        body.append(ast.Return(value=ast.Name(id=returns, ctx=ast.Load())))
    if not body:
        body = [ast.Pass()]
    line = body[0].lineno
    fields = dict(
        name=name,
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=p) for p in params], kwonlyargs=[], kw_defaults=[],
                           defaults=[]),
        body=body,
        decorator_list=[],
        returns=None,
        lineno=line,
        col_offset=0,
    )
    if "type_params" in ast.FunctionDef._fields:  # Python >= 3.12
        fields["type_params"] = []
    fn = ast.FunctionDef(**fields)
    for node in ast.walk(fn):  # the synthetic nodes (the return) take the function's line
        if "lineno" in node._attributes and not hasattr(node, "lineno"):
            node.lineno = node.end_lineno = line
            node.col_offset = node.end_col_offset = 0
    return fn


def _free_names(module: ast.Module, filename: str) -> Dict[str, set]:
    """Per function: the global names it reads that are not builtins (what its globals must provide)."""
    table = symtable.symtable(ast.unparse(module), filename, "exec")
    free = {}
    for child in table.get_children():
        names = {s.get_name() for s in child.get_symbols() if s.is_global() and s.is_referenced()}
        free[child.get_name()] = {n for n in names if not hasattr(builtins, n)}
    return free


def _bound_by_import(stmt: ast.stmt) -> set:
    if isinstance(stmt, ast.Import):
        return {alias.asname or alias.name.split(".")[0] for alias in stmt.names}
    if isinstance(stmt, ast.ImportFrom):
        return {alias.asname or alias.name for alias in stmt.names}
    return set()


def _import_upstream_module(name: str = UPSTREAM_MODULE) -> ModuleType:
    upstream.check_openrlhf_version()
    from openrlhf_sapo.utils import cpu_compat

    cpu_compat.apply()
    return importlib.import_module(name)


def _upstream_globals(tree: ast.Module, needed: Iterable[str], filename: str, module_name: str,
                      import_module: Callable[[], ModuleType]) -> dict:
    """The module globals the extracted code reads.

    When each needed name is bound by one of the module's own top-level imports (argparse, datetime
    in 0.11.2), only those import statements run: importing the whole module would import Ray,
    vLLM and DeepSpeed (about 10 s) for a parser. Otherwise the module is imported and its
    namespace used.
    """
    needed = set(needed)
    imports = [stmt for stmt in tree.body if _bound_by_import(stmt) & needed]
    if needed <= set().union(*(_bound_by_import(stmt) for stmt in imports)):
        namespace = {"__name__": module_name, "__file__": filename, "__builtins__": builtins}
        code = compile(ast.Module(body=imports, type_ignores=[]), filename, "exec", dont_inherit=True)
        exec(code, namespace)
        return namespace
    namespace = vars(import_module())
    missing = sorted(needed - set(namespace))
    if missing:
        raise _mismatch(filename, f"the __main__ block uses {missing}, which the module does not define")
    return namespace


def extract_upstream_main(source: str, filename: str = "<openrlhf/cli/train_ppo_ray.py>",
                          module_name: str = UPSTREAM_MODULE,
                          import_module: Optional[Callable[[], ModuleType]] = None) -> UpstreamMain:
    """Compile the parser building, the validation and the --use_ms block of upstream's `__main__`.

    Raises UpstreamMismatch if the source does not have the structure described in the module docstring.
    """
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as err:
        raise _mismatch(filename, f"the source does not parse ({err})") from None
    guards = [node for node in tree.body if _is_main_guard(node)]
    if len(guards) != 1:
        raise _mismatch(filename, f"found {len(guards)} top-level `if __name__ == \"__main__\":` blocks, expected one")
    body = guards[0].body
    first = ast.unparse(body[0]).splitlines()[0]
    if first != FIRST_STATEMENT:
        raise _mismatch(filename, f"the __main__ block starts with `{first}`")
    last = ast.unparse(body[-1]).splitlines()[0]
    if last != TRAIN_STATEMENT:
        raise _mismatch(filename, f"the __main__ block ends with `{last}`, not `{TRAIN_STATEMENT}`")
    parse_at = _index(body, PARSE_STATEMENT, filename)
    hierarchize_at = _index(body, HIERARCHIZE_STATEMENT, filename)
    if hierarchize_at + 1 >= len(body) - 2:
        raise _mismatch(filename, f"no validation statements between `{HIERARCHIZE_STATEMENT}` and the end")
    if hierarchize_at != parse_at + 2 or ast.unparse(body[parse_at + 1]) != HIERARCHIZE_IMPORT:
        found = [ast.unparse(stmt).splitlines()[0] for stmt in body[parse_at + 1:hierarchize_at + 1]]
        raise _mismatch(filename, f"after `{PARSE_STATEMENT}` found {found}")
    use_ms = body[-2]
    if not (isinstance(use_ms, ast.If) and ast.unparse(use_ms.test) == USE_MS_TEST and not use_ms.orelse):
        raise _mismatch(filename, f"the statement before `{TRAIN_STATEMENT}` is "
                        f"`{ast.unparse(use_ms).splitlines()[0]}`, not `if {USE_MS_TEST}:`")
    parser_body, validation_body = body[:parse_at], body[hierarchize_at + 1:-2]

    functions = ast.Module(body=[
        _function("build_parser", [], parser_body, returns="parser"),
        _function("validate", ["args"], validation_body, returns=None),
        _function("use_modelscope", ["args"], [use_ms], returns=None),
    ], type_ignores=[])
    free = _free_names(functions, filename)
    for name, forbidden in (("validate", "parser"), ("use_modelscope", "parser"), ("build_parser", "args")):
        if forbidden in free[name]:
            raise _mismatch(filename, f"the {name.replace('_', ' ')} statements use `{forbidden}`")
    namespace = _upstream_globals(tree, set().union(*free.values()), filename, module_name,
                                  import_module or (lambda: _import_upstream_module(module_name)))
    # optimize=0: upstream's checks are `assert` statements; keep them even under `python -O`.
    code = compile(functions, filename, "exec", dont_inherit=True, optimize=0)
    compiled: dict = {}
    exec(code, namespace, compiled)  # the functions land in `compiled`; their globals are `namespace`
    return UpstreamMain(compiled["build_parser"], compiled["validate"], compiled["use_modelscope"], filename)


def _upstream_source_path(module: str) -> str:
    """The installed file of an openrlhf module, found without importing it (or its packages' heavy __init__)."""
    upstream.check_openrlhf_version()
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise upstream.UpstreamMismatch("openrlhf is not importable; install openrlhf==" + OPENRLHF_VERSION)
    parts = module.split(".")[1:]
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts) + ".py"
    if not os.path.isfile(path):
        raise upstream.UpstreamMismatch(f"{module} is not at {path}; openrlhf_sapo expects openrlhf=={OPENRLHF_VERSION}")
    return path


@functools.lru_cache(maxsize=None)
def upstream_main() -> UpstreamMain:
    """The installed openrlhf's `__main__` block of cli/train_ppo_ray.py (read once per process)."""
    path = _upstream_source_path(UPSTREAM_MODULE)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    return extract_upstream_main(source, path)


@functools.lru_cache(maxsize=None)
def upstream_hierarchize() -> Callable:
    """OpenRLHF's `hierarchize` (openrlhf/utils/config.py).

    `openrlhf.utils`'s __init__ imports torch, transformers and DeepSpeed (several seconds); the
    config module itself imports nothing, so unless it is already imported, it is loaded alone.
    """
    if UPSTREAM_CONFIG_MODULE in sys.modules:
        return sys.modules[UPSTREAM_CONFIG_MODULE].hierarchize
    path = _upstream_source_path(UPSTREAM_CONFIG_MODULE)
    spec = importlib.util.spec_from_file_location("openrlhf_sapo.cli._upstream_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "hierarchize", None)):
        raise upstream.UpstreamMismatch(f"{path} has no hierarchize(); openrlhf_sapo expects openrlhf=={OPENRLHF_VERSION}")
    return module.hierarchize
