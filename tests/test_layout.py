"""The rooms of ``study/`` hold to the order ``study/__init__.py`` gives: each imports only the rooms
below it (imports inside functions too), no two modules import each other round a circle, every
room says what it owns and what it may import, and what it says is what its code imports.
``vae/`` never imports Ray or ``study``."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

# Lowest first: a room may import the rooms of a lower rank, never its own rank's others.
RANK = {"errors": 0, "_lazy": 0, "store": 1, "spec": 2, "results": 3, "search": 4, "cluster": 4, "runner": 5,
        "cli": 6, "__init__": 6, "__main__": 7}
ROOMS = ("store", "spec", "results", "search", "cluster", "runner")


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


KNOWN: set[str] = set()


def _imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (a function's lazy import too)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:  # `from study.results import tables` imports a module; `import load` its package
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in KNOWN else base)
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


STUDY = _modules("study")
KNOWN.update(STUDY)


def _study_imports(module: str) -> set[str]:
    return {m for m in _imports(STUDY[module], module) if m in STUDY and m != module}


@pytest.mark.parametrize("module", sorted(STUDY))
def test_a_module_imports_only_the_rooms_below_its_own(module):
    room = _room(module)
    wrong = sorted(m for m in _study_imports(module)
                   if _room(m) != room and RANK[_room(m)] >= RANK[room])
    assert not wrong, f"{module} (room {room!r}) imports {wrong}, which are not below it"


def test_no_two_modules_import_each_other_round_a_circle():
    graph = {m: {i for i in _study_imports(m) if i != "study"} for m in STUDY}
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for n in sorted(graph[m]):
            if seen.get(n) == 1:
                pytest.fail("a circle of imports: " + " -> ".join(path[path.index(n):] + [m, n]))
            if n not in seen:
                visit(n, path + [m])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [])


@pytest.mark.parametrize("room", ROOMS)
def test_a_room_says_what_it_owns_and_imports_only_what_it_says(room):
    doc = ast.get_docstring(ast.parse((REPO / "study" / room / "__init__.py").read_text())) or ""
    assert "Owns:" in doc and "May import:" in doc, f"study/{room}/__init__.py does not say what it owns and imports"
    said = set(re.findall(r"``study\.([a-z_]+)``", doc.split("May import:", 1)[1]))
    assert all(RANK[r] < RANK[room] for r in said if r in RANK), f"study/{room} may not import all of {said}"
    used = {_room(m) for mod in STUDY if _room(mod) == room for m in _study_imports(mod)} - {room, "_lazy", "__init__"}
    assert used <= said, f"study/{room} imports {sorted(used - said)} without saying so in its docstring"


@pytest.mark.parametrize("package", ["study", *(f"study.{room}" for room in ROOMS)])
def test_no_name_a_package_offers_is_also_one_of_its_modules(package):
    """Once a submodule is imported, Python sets it as its package's attribute of that name: a
    name offered lazily that is also a submodule's (``study.run``, the function, and a ``run/``
    room) would turn into the module under the user's feet."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    assert not set(pkg.__all__) & modules, f"{package} offers {sorted(set(pkg.__all__) & modules)}, also its modules"


def test_a_rooms_offer_names_only_what_its_modules_define():
    import importlib

    for room in ROOMS:
        pkg = importlib.import_module(f"study.{room}")
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, f"study.{room}.{name}"


def test_vae_imports_neither_ray_nor_study():
    for module, path in _modules("vae").items():
        bad = {m for m in _imports(path, module) if m.split(".")[0] in ("ray", "study", "analysis")}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_the_old_module_paths_still_resolve_for_studies_pickled_before_the_rooms():
    """Tune pickled a study's callbacks, searcher and scheduler by module path: a study started
    before the rooms resumes only if those paths still load the same classes."""
    import pickle

    import study  # noqa: F401  (installs the old paths)
    from study.results.recorder import ResultsRecorder
    from study.runner.progress import Progress
    from study.search.schedulers import StudyASHA
    from study.search.searcher import StudySearch
    from study.spec.spec import StudySpec, top_k
    from study.store.location import Folder
    from study.store.objectstore import object_store

    old = {"study.recorder": ("ResultsRecorder", ResultsRecorder), "study.progress": ("Progress", Progress),
           "study.search": ("StudySearch", StudySearch), "study.storage": ("Folder", Folder),
           "study.spec": ("StudySpec", StudySpec), "study.retention": ("top_k", top_k)}
    for module, (name, obj) in old.items():
        assert getattr(__import__(module, fromlist=[name]), name) is obj, f"{module}.{name}"
    assert __import__("study.storage", fromlist=["object_store"]).object_store is object_store
    assert __import__("study.search", fromlist=["StudyASHA"]).StudyASHA is StudyASHA
    # a pickle made under the old path loads as the new class
    loc = Folder("/tmp/old-study")
    data = pickle.dumps(loc, protocol=2).replace(b"study.store.location", b"study.storage")
    assert b"study.storage" in data
    back = pickle.loads(data)
    assert type(back) is Folder and back == loc
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        __import__("study.tuner", fromlist=["nothing"]).nothing
