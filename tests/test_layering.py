"""viddet's modules form layers, and imports go down only: no module imports a module above it, and
there are no import cycles (lazy imports inside functions included). The order is the one
``docs/CONTRIBUTING.md`` describes; a new module must be given its place here."""
import ast
from pathlib import Path

import viddet

SRC = Path(viddet.__file__).parent

# bottom to top; a module may import modules of its own layer (without cycles) or of layers below
LAYERS = [
    ('errors', 'classes', 'version'),
    ('fileio', 'timing', 'runtime', 'structures', 'peak_memory', 'interrupts', 'locks'),
    ('data', 'evaluation', 'linking', 'visualize'),
    ('models',),
    ('methods',),
    ('speedups',),
    ('config',),
    ('export',),
    ('checkpoints',),
    ('engine', 'engine.video'),
    ('api', 'engine.evaluate', 'engine.link_results'),
    ('engine.train', 'engine.train_options', 'engine.train_set', 'engine.optim', 'engine.checkpointer',
     'engine.train_log', 'engine.train_eval', 'engine.initial_weights', 'engine.work_dir', 'engine.ema', 'benchmark',
     'demo'),
    ('cli', '__main__', '__init__'),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix('')
    parts = rel.parts[:-1] if rel.name == '__init__' and len(rel.parts) > 1 else rel.parts
    return 'viddet.' + '.'.join(parts)


def layer_of(module: str) -> int:
    name = module[len('viddet.'):] if module != 'viddet' else '__init__'
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if name == prefix or name.startswith(prefix + '.'):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f'{module} has no layer in tests/test_layering.py: give it one'
    return best[0]


def imports_of(path: Path):
    """Every ``viddet.*`` module a file imports, at top level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from viddet.speedups import troi`` imports the submodule viddet.speedups.troi
            folder = SRC.joinpath(*node.module.split('.')[1:])
            subs = {a.name for a in node.names
                    if (folder / f'{a.name}.py').exists() or (folder / a.name).is_dir()}
            out.update(f'{node.module}.{n}' for n in subs)
            if len(subs) < len(node.names):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith('viddet.')} - {module_name(path)}


def find_cycle(graph):
    done, path = set(), []

    def visit(m):
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return None
        path.append(m)
        for d in sorted(graph.get(m, ())):
            cycle = visit(d)
            if cycle:
                return cycle
        path.pop()
        done.add(m)
        return None

    for m in sorted(graph):
        cycle = visit(m)
        if cycle:
            return cycle
    return None


def package_graph():
    """module -> the viddet modules importing it runs: what it names, and the ``__init__`` of every
    package above those (``import viddet.a.b`` runs ``viddet/a/__init__.py`` first) except the
    packages the importing module is itself inside (they are already being imported)."""
    graph = {}
    for f in SRC.rglob('*.py'):
        module = module_name(f)
        deps = set(imports_of(f))
        for dep in list(deps):
            parts = dep.split('.')
            for i in range(1, len(parts)):
                package = '.'.join(parts[:i])
                if not (module == package or module.startswith(package + '.')):
                    deps.add(package)
        graph[module] = deps - {module}
    return graph


def test_find_cycle_sees_a_lazy_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
    assert find_cycle({'a': {'b'}, 'b': {'a'}}) == ['a', 'b', 'a']


def test_no_import_cycles_in_the_package():
    graph = package_graph()
    assert 'viddet.evaluation.vid' in graph and 'viddet.methods.fgfa' in graph
    assert find_cycle(graph) is None


def test_no_module_imports_a_module_above_it():
    upward = []
    for module, deps in sorted(package_graph().items()):
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(module):
                upward.append(f'{module} -> {dep}')
    assert not upward, 'imports going up a layer:\n  ' + '\n  '.join(upward)


def test_the_layer_check_sees_an_upward_import():
    assert layer_of('viddet.models.detector') < layer_of('viddet.methods.dff') < layer_of('viddet.api')
    assert layer_of('viddet.engine.video') < layer_of('viddet.engine.train')


def test_package_inits_are_counted_in_the_import_graph():
    graph = package_graph()
    # importing viddet.config.training from the engine runs viddet/config/__init__.py too
    assert 'viddet.config' in graph['viddet.engine.initial_weights']
    # but a module never depends on the package it is inside
    assert 'viddet.methods' not in graph['viddet.methods.dff']


def test_import_viddet_loads_no_model_code():
    """``import viddet`` is cheap (no torch, no models); ``viddet.VideoDetector`` loads them on use."""
    import subprocess
    import sys
    code = ('import sys, viddet; assert "torch" not in sys.modules and "viddet.api" not in sys.modules, '
            'sorted(m for m in sys.modules if m.startswith(("torch", "viddet"))); '
            'assert viddet.VideoDetector.__name__ == "VideoDetector"')
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
