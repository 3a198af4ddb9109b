"""Imports inside viddet.evaluation and viddet.data go one way: no cycles, lazy imports included."""
import ast
from pathlib import Path

import viddet

SRC = Path(viddet.__file__).parent


def imports_of(path: Path):
    """Every ``viddet.*`` module a file imports, at top level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith('viddet.')}


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


def test_find_cycle_sees_a_lazy_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
    assert find_cycle({'a': {'b'}, 'b': {'a'}}) == ['a', 'b', 'a']


def test_evaluation_and_data_have_no_import_cycles():
    graph = {}
    for pkg in ('evaluation', 'data'):
        for f in (SRC / pkg).glob('*.py'):
            graph[f'viddet.{pkg}.{f.stem}'] = imports_of(f)
    assert 'viddet.evaluation.vid' in graph and 'viddet.data.check' in graph
    assert find_cycle(graph) is None
    assert 'viddet.evaluation.vid' not in graph['viddet.evaluation.coco']
    assert not any(m.startswith('viddet.evaluation.report') for m in graph['viddet.evaluation.vid'])
