#!/usr/bin/env python3
"""Checks that a refactor left the device code alone: every kernel (.entry) and device function
(.func) of the PTX before has the identical body in the PTX after, and the other way round,
compared per function (a split into several .cu files reorders them), and so are the module-level
variables (.global/.shared/.const).

Normalised away, as they change with a file's name or position and not with its code:
  - symbol names are demangled (c++filt), then the anonymous-namespace and internal-linkage
    scopes are dropped ("(anonymous namespace)::", "_INTERNAL_<hash>_<n>_<file>_cu_<hash>::"),
    then every --rename OLD=NEW is applied (a scope the split had to name, e.g.
    --rename fp8moe::comm::normal::=fp8moe::comm::); kernel parameters keep their _param_<i>;
  - debug line info: .loc/.file lines and .section blocks (-lineinfo), and // comments;
  - label and local-depot numbers, which count functions across the module: $L__BB3_7 and the
    like are renumbered per function by first use, __local_depot<i> becomes __local_depot.
Everything else (instructions, registers, parameter lists, .maxntid and the like) must match.

Make the PTX with the build's own nvcc command (ninja -t commands <target> in the build folder),
its "-c SRC -o OBJ" replaced by "-ptx SRC -o OUT.ptx" (and -MD/-MT/-MF dropped), e.g.:
  cmd=$(ninja -t commands fp8moe_comm | grep -- '-c .*/sm90_device_ep.cu ' |
        sed -E 's/ -MD -MT [^ ]+ -MF [^ ]+//; s/ -c ([^ ]+) -o [^ ]+$/ -ptx \\1 -o before.ptx/')
  eval "$cmd"
Usage:
  python3 tools/ptx_same_functions.py --before before.ptx --after a.ptx b.ptx [--rename OLD=NEW]
Exit status 0 when every function and variable matches, 1 otherwise (the differences listed)."""

import argparse
import difflib
import re
import subprocess
import sys

SYMBOL = re.compile(r"_Z[A-Za-z0-9_$]+")
PARAM = re.compile(r"^(.*?)(_param_\d+)$")
INTERNAL = re.compile(r"_INTERNAL_[0-9a-f]+_\d+_[A-Za-z0-9_]+?_cu_[0-9a-f]+::")
LABEL = re.compile(r"\$L__[A-Za-z_]+?\d+(?:_\d+)?")
DEPOT = re.compile(r"__local_depot\d+")
FUNC_START = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+|\.extern\s+)*\.(entry|func)\b")
VAR_START = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+|\.extern\s+)*\.(global|shared|const)\b")


def demangle_all(names):
    """Demangled text of every mangled name (one c++filt call)."""
    names = sorted(names)
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names) + "\n", capture_output=True,
                         text=True, check=True).stdout.split("\n")
    return dict(zip(names, out))


class Normaliser:
    def __init__(self, renames):
        self.renames = renames
        self.cache = {}

    def prime(self, texts):
        bases = set()
        for t in texts:
            for s in SYMBOL.findall(t):
                m = PARAM.match(s)
                bases.add(m.group(1) if m else s)
        todo = [b for b in bases if b not in self.cache]
        for b, d in demangle_all(todo).items():
            d = INTERNAL.sub("", d).replace("(anonymous namespace)::", "")
            for old, new in self.renames:
                d = d.replace(old, new)
            self.cache[b] = d

    def symbol(self, s):
        m = PARAM.match(s)
        base, suffix = (m.group(1), m.group(2)) if m else (s, "")
        return "{" + self.cache.get(base, base) + "}" + suffix

    def line(self, text, labels):
        text = SYMBOL.sub(lambda m: self.symbol(m.group(0)), text)
        text = DEPOT.sub("__local_depot", text)

        def label(m):
            return labels.setdefault(m.group(0), "$L%d" % len(labels))

        return LABEL.sub(label, text)


def strip_comment(line):
    i = line.find("//")
    return (line if i < 0 else line[:i]).rstrip()


def parse(path):
    """(functions, variables): functions as (raw header line, [code lines]), variables as lines."""
    lines = open(path).read().split("\n")
    funcs, variables = [], []
    i = 0
    while i < len(lines):
        raw = lines[i]
        code = strip_comment(raw)
        if not code.strip():
            i += 1
            continue
        if code.lstrip().startswith(".section"):  # debug sections (-lineinfo): skip the block
            depth, opened = 0, False
            while i < len(lines):
                c = strip_comment(lines[i])
                depth += c.count("{") - c.count("}")
                opened = opened or "{" in c
                i += 1
                if opened and depth == 0:
                    break
            continue
        if FUNC_START.match(code):
            body = []
            depth = 0
            opened = False
            while i < len(lines):
                c = strip_comment(lines[i])
                s = c.strip()
                if s and not s.startswith((".loc", ".file")):
                    body.append(s)
                depth += c.count("{") - c.count("}")
                opened = opened or "{" in c
                i += 1
                if (opened and depth == 0) or (not opened and s.endswith(";")):
                    break
            funcs.append((code.strip(), body))
            continue
        if VAR_START.match(code):
            variables.append(code.strip())
        i += 1
    return funcs, variables


def load(paths, norm):
    texts = [open(p).read() for p in paths]
    norm.prime(texts)
    funcs, variables = {}, []
    for p in paths:
        fs, vs = parse(p)
        for header, body in fs:
            labels = {}
            nb = [norm.line(s, labels) for s in body]
            name_m = SYMBOL.search(header)
            key = norm.symbol(name_m.group(0)) if name_m else nb[0]
            kind = "entry" if ".entry" in header else "func"
            if not any(s.startswith("{") or s == "{" for s in body):
                kind += " (declaration)"
            funcs.setdefault((kind, key), []).append((p, nb))
        variables += [norm.line(v, {}) for v in vs]
    return funcs, sorted(variables)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", nargs="+", required=True)
    ap.add_argument("--after", nargs="+", required=True)
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="applied to demangled names after the anonymous scopes are dropped")
    args = ap.parse_args()
    renames = [tuple(r.split("=", 1)) for r in args.rename]
    norm = Normaliser(renames)
    fb, vb = load(args.before, norm)
    fa, va = load(args.after, norm)
    bad = 0
    for key in sorted(set(fb) | set(fa)):
        kind, name = key
        if key not in fa:
            print(f"ONLY BEFORE  {kind:5} {name}")
            bad += 1
            continue
        if key not in fb:
            print(f"ONLY AFTER   {kind:5} {name}")
            bad += 1
            continue
        if len(fb[key]) != 1 or len(fa[key]) != 1:
            print(f"DUPLICATE    {kind:5} {name}: {len(fb[key])} before, {len(fa[key])} after")
            bad += 1
            continue
        (pb, b), (pa, a) = fb[key][0], fa[key][0]
        if a == b:
            print(f"identical    {kind:5} {name}  ({len(b)} lines; after: {pa})")
        else:
            bad += 1
            print(f"DIFFERS      {kind:5} {name}  ({len(b)} lines before, {len(a)} after)")
            for d in list(difflib.unified_diff(b, a, "before", "after", lineterm="", n=1))[:40]:
                print("    " + d)
    if vb == va:
        print(f"identical    module variables ({len(vb)})")
    else:
        bad += 1
        print("DIFFERS      module variables")
        for d in difflib.unified_diff(vb, va, "before", "after", lineterm="", n=0):
            print("    " + d)
    nf = len(set(fb) | set(fa))
    print(f"{nf} functions compared, {len(vb)} module variables: "
          + ("all identical" if bad == 0 else f"{bad} differences"))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
