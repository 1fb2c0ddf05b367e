"""
course/handout.py: write a student copy of tinydit with the assignment regions blanked.

    python course/handout.py ../tinydit-handout              # every assignment
    python course/handout.py ../tinydit-handout --only 2,5   # only assignments 2 and 5
    python course/handout.py --list                          # the assignments and where they are

Every region between `# assignment N begin: <title>` and `# assignment N end` (the markers stay) becomes
`raise NotImplementedError("assignment N: see course/README.md")` at the marker's indentation; every other
byte of every file is copied unchanged, the shipped weights included. Run in the handout:
`python -m pytest -q test_all.py -k assignment_N` grades assignment N (course/graders.py).
"""
import argparse
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {".git", "out", "data", "__pycache__", ".pytest_cache"}  # run outputs and caches are not handed out
BEGIN = re.compile(r"^(\s*)# assignment (\d+) begin: (.*)$")
END = re.compile(r"^\s*# assignment (\d+) end$")


def blank(text, chosen):
    """The text with the regions of the `chosen` assignments (a set; None = all) replaced by one raise each.
    Returns (new text, {assignment: title}) of the regions found; unbalanced markers raise ValueError."""
    out, found, inside = [], {}, None
    for k, line in enumerate(text.splitlines(keepends=True)):
        begin, end = BEGIN.match(line.rstrip("\n")), END.match(line.rstrip("\n"))
        if begin:
            if inside:
                raise ValueError(f"line {k + 1}: assignment {begin[2]} begins inside assignment {inside}")
            indent, inside = begin[1], int(begin[2])
            found[inside] = begin[3]
            out.append(line)
            if chosen is None or inside in chosen:
                out.append(f'{indent}raise NotImplementedError("assignment {inside}: '
                           'see course/README.md")\n')
        elif end:
            if inside != int(end[1]):
                raise ValueError(f"line {k + 1}: assignment {end[1]} ends without its begin")
            inside = None
            out.append(line)
        elif inside is None or not (chosen is None or inside in chosen):
            out.append(line)
    if inside:
        raise ValueError(f"assignment {inside} has no end marker")
    return "".join(out), found


def regions(root=ROOT):
    """{assignment: (title, [files])} over the top-level scripts."""
    found = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            for n, title in blank(open(os.path.join(root, name)).read(), set())[1].items():
                found.setdefault(n, (title, []))[1].append(name)
    return found


def make_handout(dest, only=None, root=ROOT):
    """Copy root to dest (which must not exist or be empty), blanking the chosen regions of the scripts."""
    if os.path.exists(dest) and os.listdir(dest):
        sys.exit(f"error: {dest} exists and is not empty; choose a new folder")
    known = regions(root)
    if only and not set(only) <= set(known):
        sys.exit(f"error: --only {','.join(map(str, only))}: the assignments are "
                 f"{', '.join(map(str, known))}")
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP and os.path.join(here, d) != os.path.abspath(dest)]
        rel = os.path.relpath(here, root)
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        for name in files:
            src, dst = os.path.join(here, name), os.path.join(dest, rel, name)
            if rel == "." and name.endswith(".py"):
                with open(dst, "w") as f:
                    f.write(blank(open(src).read(), set(only) if only else None)[0])
                shutil.copymode(src, dst)
            elif not name.endswith((".pyc", ".tmp")):
                shutil.copy2(src, dst)
    return known


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest", nargs="?", help="the new folder for the handout")
    p.add_argument("--only", default="", help="comma list of assignments to blank (default: all)")
    p.add_argument("--list", action="store_true", help="list the assignments and their files")
    args = p.parse_args(argv)
    if args.list or not args.dest:
        for n, (title, files) in sorted(regions().items()):
            print(f"assignment {n}: {title} ({', '.join(files)})")
        return
    try:
        only = [int(v) for v in args.only.split(",")] if args.only else None
    except ValueError:
        sys.exit(f"error: --only must be a comma list of numbers, not {args.only!r}")
    known = make_handout(args.dest, only)
    print(f"wrote {args.dest}: assignments {', '.join(map(str, only or sorted(known)))} blanked; "
          f"grade with `cd {args.dest} && python -m pytest -q test_all.py -k assignment`")


if __name__ == "__main__":
    main()
