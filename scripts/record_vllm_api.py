"""Record the part of vLLM's offline API that pos2distill uses, from a wheel, without importing it.

vLLM imports only beside the exact CUDA torch it was built for, so the description is read from
the wheel's source with ``ast``: for each public name (resolved through ``vllm/__init__.py``'s
lazy ``MODULE_ATTRS`` and the re-exports it points to) the class's fields (dataclass, msgspec
``Struct`` or ``TypedDict`` annotations, inherited ones included; a default's source text), the attributes its
``__init__`` assigns, and the signatures of its ``__init__`` and the methods asked for
(parameter names, kinds, default present or not, default source text). Also the wheel's
version and its ``torch``/``transformers`` requirements.

    pip download vllm==0.26.0 --no-deps -d /tmp/vllmwheel
    python scripts/record_vllm_api.py /tmp/vllmwheel/vllm-0.26.0-*.whl tests/data/vllm_api_0.26.0.json
"""

import argparse
import ast
import json
import os
import sys
import zipfile

# public name -> methods whose signatures are recorded (``__init__`` always)
RECORDED = {
    "LLM": ["generate"],
    "EngineArgs": [],  # LLM(**kwargs) passes unknown keyword arguments on to EngineArgs
    "SamplingParams": [],
    "RequestOutput": [],
    "CompletionOutput": [],
    "TokensPrompt": [],
}
KINDS = ("positional_only", "positional_or_keyword", "var_positional", "keyword_only", "var_keyword")


class Wheel:
    """The ``vllm/`` sources of a wheel (or of an unpacked folder), parsed on demand."""

    def __init__(self, path: str):
        self.path = path
        self._trees = {}
        if os.path.isdir(path):
            self._read = lambda name: open(os.path.join(path, name), encoding="utf-8").read()
            self._names = {os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
                           for d, _, files in os.walk(path) for f in files}
        else:
            archive = zipfile.ZipFile(path)
            self._read = lambda name: archive.read(name).decode("utf-8")
            self._names = set(archive.namelist())

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for name in (base + ".py", base + "/__init__.py"):
            if name in self._names:
                return name
        return None

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            name = self.module_file(module)
            if name is None:
                raise SystemExit(f"error: {self.path}: no module {module}")
            self._trees[module] = ast.parse(self._read(name))
        return self._trees[module]

    def metadata(self) -> dict:
        (name,) = [n for n in self._names if n.endswith(".dist-info/METADATA")] or [None]
        lines = self._read(name).splitlines() if name else []
        fields = {"version": None, "requires": {}}
        for line in lines:
            if line.startswith("Version: "):
                fields["version"] = line.split(": ", 1)[1].strip()
            elif line.startswith("Requires-Dist: "):
                spec = line.split(": ", 1)[1].split(";")[0].strip()
                for package in ("torch", "transformers"):
                    rest = spec[len(package):]
                    if spec.startswith(package) and (not rest or rest[0] in "=<>!~ ("):
                        fields["requires"][package] = rest.strip()
        return fields


def _absolute(module: str, level: int, target: str | None, is_package: bool) -> str:
    if level == 0:
        return target
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def find_class(wheel: Wheel, module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef]:
    """The module and ``ClassDef`` that ``name`` in ``module`` refers to, following imports."""
    if depth > 8:
        raise SystemExit(f"error: import chain too deep for {module}.{name}")
    tree = wheel.tree(module)
    is_package = wheel.module_file(module).endswith("__init__.py")
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(module, node.level, node.module, is_package)
                    return find_class(wheel, source, alias.name, depth + 1)
    raise SystemExit(f"error: {name} not found in {module}")


def public_modules(wheel: Wheel) -> dict:
    """``vllm/__init__.py``'s ``MODULE_ATTRS``: public name -> (module, attribute)."""
    for node in wheel.tree("vllm").body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODULE_ATTRS" for t in node.targets):
            table = ast.literal_eval(node.value)
            return {k: (_absolute("vllm", 1, v.split(":")[0].lstrip("."), True), v.split(":")[1])
                    for k, v in table.items()}
    raise SystemExit("error: vllm/__init__.py has no MODULE_ATTRS")


def signature(func: ast.FunctionDef) -> list[dict]:
    args = func.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = []
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        params.append(_param(arg.arg, KINDS[0] if i < len(args.posonlyargs) else KINDS[1], default))
    if args.vararg:
        params.append(_param(args.vararg.arg, KINDS[2], None))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params.append(_param(arg.arg, KINDS[3], default))
    if args.kwarg:
        params.append(_param(args.kwarg.arg, KINDS[4], None))
    return params


def _param(name: str, kind: str, default) -> dict:
    entry = {"name": name, "kind": kind, "has_default": default is not None}
    if default is not None:
        entry["default"] = ast.unparse(default)
    return entry


def _is_classvar(annotation: ast.expr) -> bool:
    text = ast.unparse(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def describe(wheel: Wheel, module: str, node: ast.ClassDef, methods: list[str], depth: int = 0) -> dict:
    fields, attributes, found = [], [], {}
    for base in node.bases:  # inherited fields first, as dataclasses and TypedDicts order them
        base_name = ast.unparse(base).split("[")[0]
        if "." in base_name or base_name in ("object", "Generic", "TypedDict", "Protocol"):
            continue
        try:
            base_module, base_node = find_class(wheel, module, base_name)
        except SystemExit:
            continue
        inherited = describe(wheel, base_module, base_node, methods, depth + 1)
        fields += inherited["fields"]
        attributes += inherited["attributes"]
        for method, params in inherited["methods"].items():
            found.setdefault(method, params)
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and not _is_classvar(item.annotation):
            fields = [f for f in fields if f["name"] != item.target.id]
            fields.append(_param(item.target.id, "field", item.value))
        elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in ["__init__", *methods]:
            found[item.name] = signature(item)
            if item.name == "__init__":
                attributes += [t.attr for stmt in ast.walk(item) if isinstance(stmt, (ast.Assign, ast.AnnAssign))
                               for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                               if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self"]
    return {"module": module, "bases": [ast.unparse(b) for b in node.bases], "fields": fields,
            "attributes": sorted(set(attributes)), "methods": found}


def record(path: str) -> dict:
    wheel = Wheel(path)
    exported = public_modules(wheel)
    classes = {}
    for name, methods in RECORDED.items():
        module, node = find_class(wheel, *exported[name])
        classes[name] = describe(wheel, module, node, methods)
    return {"source": os.path.basename(path), **wheel.metadata(), "exported": sorted(exported), "classes": classes}


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", help="a vllm .whl file (or a folder it was unpacked to)")
    parser.add_argument("output", help="JSON file to write (e.g. tests/data/vllm_api_0.26.0.json)")
    args = parser.parse_args(argv)
    description = record(args.wheel)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    temporary = args.output + ".tmp"
    with open(temporary, "w", encoding="utf-8") as fh:
        json.dump(description, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(temporary, args.output)
    counts = ", ".join(f"{k} {len(v['fields']) or len(v['methods'].get('__init__', []))}"
                       for k, v in description["classes"].items())
    print(f"vllm {description['version']} (torch {description['requires'].get('torch')}): {counts} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
