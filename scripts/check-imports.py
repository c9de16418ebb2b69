#!/usr/bin/env python3
"""Fails when modules under src/ import each other in a circle.

Every file is a module (`a/mod.rs` is `a`); a reference `crate::x::y::z` or `super::y`
anywhere in a file (use lines and inline paths alike) is an edge to the longest module
prefix that exists. A module's edges to its own descendants (mod.rs re-exporting or
declaring children) are ignored: parents name children, children never name parents back.
Prints each strongly connected component of size > 1 and exits 1 if there is one.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^}]*)\}", re.S)


def module_of(rel):
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]):
        return ()
    return tuple(parts)


def main():
    modules = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)
                if rel.startswith("bin" + os.sep):
                    continue
                modules[module_of(rel)] = path
    edges = {m: set() for m in modules}
    for mod, path in modules.items():
        text = open(path, encoding="utf-8").read()
        # Unit tests may reach anywhere.
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        # Comments (doc links included) are not dependencies.
        text = re.sub(r"//[^\n]*", "", text)
        refs = []
        for root, rest, inner in GROUP.findall(text):
            for item in inner.split(","):
                item = item.strip().split(" as ")[0].split("::{")[0]
                if item and item != "self":
                    refs.append((root, rest + "::" + item))
        refs += PATH.findall(text)
        for root, rest in refs:
            names = [n for n in rest.split("::") if n]
            base = ()
            if root == "super":
                # `super::` from a file module is its directory's module; from mod.rs, the parent.
                base = mod[:-1]
                while names and names[0] == "super":
                    base = base[:-1]
                    names = names[1:]
            target = base
            for n in names:
                if target + (n,) in modules:
                    target = target + (n,)
                else:
                    break
            if target == mod or target[: len(mod)] == mod or target == ():
                continue
            # A parent naming its child is declaration, not a dependency back up.
            edges[mod].add(target)
    # Tarjan's SCC.
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in modules:
        if v not in index:
            visit(v)
    for comp in out:
        names = sorted("::".join(c) for c in comp)
        print("import circle: " + " <-> ".join(names))
        for c in sorted(comp):
            inner = sorted("::".join(t) for t in edges[c] if t in comp)
            print(f"  {'::'.join(c)} -> {', '.join(inner)}")
    if out:
        return 1
    print(f"check-imports: {len(modules)} modules, no import circle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
