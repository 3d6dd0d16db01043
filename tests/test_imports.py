"""The package imports one way: no import cycle anywhere in mla_jax/, read from the source (every
import statement, function-level ones included), so a cycle fails here before it bites at import
time."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mla_jax"


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """{module: the package modules it imports}. `from a.b import c` names module a.b.c when it
  exists, else a.b (a name defined there); a package's own __init__ is not an edge of its
  submodules' imports (Python runs it first, but it is not what they import)."""
  modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        edges.update(a.name for a in node.names if a.name in modules)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the package, up level - 1
          parent = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parent + ([base] if base else []))
        for a in node.names:
          target = f"{base}.{a.name}"
          edges.add(target if target in modules else base)
    graph[name] = {e for e in edges if e in modules and e != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_package_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_leaves_import_nothing_of_the_package_above_them():
  """The leaves of core/ (config, the cache types, the attention math) import no other module of
  the package than these leaves and probes."""
  graph = import_graph()
  leaves = {"mla_jax.core.config", "mla_jax.core.cache", "mla_jax.core.ops", "mla_jax.core.probes"}
  for leaf in leaves:
    assert graph[leaf] <= leaves, (leaf, graph[leaf] - leaves)


def test_tests_and_the_package_never_import_scripts():
  """Logic lives in the package; scripts/ parse flags and call it, so nothing imports them."""
  offenders = []
  for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tests").glob("*.py")]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "scripts"]
  assert offenders == []
