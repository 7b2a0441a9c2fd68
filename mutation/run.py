"""Mutation testing of adamerge's core with mutmut, one module at a time (entry point: scripts/mutation.sh).

For each module (a path such as ``adamerge/merging/ties.py``) a scratch copy of the tree is made (the work
tree's tracked and untracked-but-not-ignored files, or ``git archive REV``), its ``[tool.mutmut]`` section
is the repository's with ``only_mutate`` set to the module and ``pytest_add_cli_args_test_selection`` set
to the module's tests from ``mutation/tests.txt``, and ``mutmut run --max-children 1`` runs there. mutmut
first runs those tests once to record which tests call which function, then runs each mutant against only
the tests that call the mutated function.

Counted per module: killed (a test failed; a timeout counts as killed and is also shown on its own),
survived (``no tests`` included: nothing ran that could catch it), equivalent (survivors listed in
``mutation/equivalent.txt``), not checked (the run was stopped first; left out of the score).
Score = killed / (checked - equivalent). The table goes to stdout; the record to
``benchmarks/results/mutation_<date>[_<label>].json``; the diffs of the survivors to
``<workdir>/survivors.txt``. ``--rerun-survivors`` continues a labelled run after tests were written: it copies
the work tree's tests/ into each scratch tree and reruns only the survivors (record suffix ``_after``).
``--survivors-of RECORD`` does the same from a record when the scratch trees are gone: a fresh copy of HEAD
(commit the new tests first), mutmut run on the record's survivors and unchecked mutants only, the rest taken from
the record.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CORE = ("adamerge/merging", "adamerge/components", "adamerge/models", "adamerge/systems")
KILLED_CODES = {1, 3}
TIMEOUT_CODES = {36, 24, -24, 152, 255}
SURVIVED_CODES = {0}
NO_TESTS_CODES = {5, 33}


def read_tests_map(path: Path) -> dict[str, list[str]]:
    """``module: pattern ...`` lines (``*`` for every module); ``#`` starts a comment."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        module, _, patterns = line.partition(":")
        out.setdefault(module.strip(), []).extend(patterns.split())
    return out


def read_equivalent(path: Path) -> dict[str, str]:
    """``mutant-id  reason`` lines; ``#`` at the start of a line is a comment."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        mutant, _, reason = line.strip().partition(" ")
        if not reason.strip():
            sys.exit(f"{path}: mutant {mutant} has no reason; write one after its id")
        out[mutant] = reason.strip()
    return out


def default_modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in CORE for p in (ROOT / d).glob("*.py") if p.name != "__init__.py")


def names_module(text: str, module: str) -> bool:
    """Whether a test file's text names ``module`` (``adamerge/x/y.py``): its dotted path, or ``y`` imported
    from ``adamerge.x`` (``from adamerge.x import a, y`` or a parenthesised list)."""
    dotted = module[: -len(".py")].replace("/", ".")
    pkg, _, stem = dotted.rpartition(".")
    if re.search(rf"\b{re.escape(dotted)}\b", text):
        return True
    imports = re.findall(rf"^from {re.escape(pkg)} import (\([^)]*\)|[^\n#]*)", text, flags=re.MULTILINE)
    return any(re.search(rf"\b{stem}\b", names) for names in imports)


def tests_for(module: str, mapping: dict[str, list[str]], tree: Path) -> list[str]:
    """The module's test files in ``tree``: its mapping's patterns, else every test file naming the module
    (``names_module``). ``*`` patterns are added to both, keeping only the files that name the module, so that
    each module's stats run pays for its own pins only. Patterns matching nothing (e.g. files not in REV) are
    dropped."""
    patterns = mapping.get(module, [])
    if not patterns:
        patterns = [str(p.relative_to(tree)) for p in sorted((tree / "tests").glob("test_*.py"))
                    if names_module(p.read_text(), module)]
    found: list[str] = []
    shared = [(pattern, True) for pattern in mapping.get("*", [])]
    for pattern, filtered in [(pattern, False) for pattern in patterns] + shared:
        for p in sorted(tree.glob(pattern)):
            rel = str(p.relative_to(tree))
            if rel not in found and not (filtered and not names_module(p.read_text(), module)):
                found.append(rel)
    return found


def populate(tree: Path, rev: str | None) -> None:
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    if rev:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", _commit(rev)], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        return
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / name)


def _commit(rev: str) -> str:
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", rev], check=False,
                           capture_output=True, text=True)
    return found.stdout.strip() or rev


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"[tool.mutmut] value {value!r}: only strings, numbers, booleans and lists are supported")


def write_config(tree: Path, module: str, tests: list[str]) -> None:
    """The tree's pyproject.toml with its ``[tool.mutmut]`` section replaced by the repository's, narrowed."""
    section = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"])
    section.update(only_mutate=[module], pytest_add_cli_args_test_selection=tests)
    lines, skipping = [], False
    for line in (tree / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            skipping = line.strip() == "[tool.mutmut]"
        if not skipping:
            lines.append(line)
    lines += ["", "[tool.mutmut]"] + [f"{k} = {_toml(v)}" for k, v in section.items()]
    (tree / "pyproject.toml").write_text("\n".join(lines) + "\n")


def refresh(tree: Path, module: str) -> bool:
    """Bring the scratch tree up to the work tree for a rerun of the survivors: its tests/ replaced by the work
    tree's, and every other file of the work tree copied over (also into mutmut's mutants/ copy), so that tests
    written for changed code run against that code. The mutated module itself stays as it was mutated; when it
    has changed since, nothing is done and False returned (its mutants are stale: run it afresh)."""
    if (ROOT / module).read_bytes() != (tree / module).read_bytes():
        print(f"{module} changed since its run in {tree}: its mutants are stale; run it again without "
              "--rerun-survivors", file=sys.stderr)
        return False
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    shutil.rmtree(tree / "tests", ignore_errors=True)
    shutil.rmtree(tree / "mutants" / "tests", ignore_errors=True)
    for name in filter(None, files):
        if name == module or not (ROOT / name).is_file():
            continue
        targets = [tree / name]
        if (tree / "mutants" / name).exists() or name.startswith("tests/"):
            targets.append(tree / "mutants" / name)
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    return True


STATUS_CODES = {"killed": 1, "timeout": 36, "survived": 0, "no tests": 33, "other": -11}


def record_rows(path: Path) -> tuple[str, dict[str, dict]]:
    """The commit a record's run mutated (its ``rev``: a commit, or ``work tree on <commit>``) and its rows."""
    record = json.loads(path.read_text())
    found = re.search(r"\b[0-9a-f]{7,40}\b", record["rev"])
    if not found:
        raise SystemExit(f"{path}: no commit in its rev {record['rev']!r}")
    return found.group(0), record["modules"]


def unchanged_since(module: str, commit: str, rev: str = "HEAD") -> bool:
    """Whether ``module`` at ``rev`` is the one in ``commit`` (its mutants have the same names and diffs)."""
    shown = [subprocess.run(["git", "-C", str(ROOT), "show", f"{c}:{module}"], check=False, capture_output=True)
             for c in (commit, rev)]
    return all(s.returncode == 0 for s in shown) and shown[0].stdout == shown[1].stdout


def run_mutmut(tree: Path, deadline: float, log: Path, mutants: list[str] | None = None) -> bool:
    """Run mutmut in ``tree`` (on ``mutants`` only, when given) until it ends or ``deadline``; False when it was
    stopped at the deadline. mutmut collects which functions the tests call for the tests it has not seen."""
    with open(log, "w") as out:
        proc = subprocess.Popen(["mutmut", "run", "--max-children", "1", *(mutants or [])], cwd=tree, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGINT)  # mutmut saves its results on KeyboardInterrupt
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                return False
            time.sleep(2)
    if proc.returncode != 0:
        print(f"mutmut failed in {tree} (exit {proc.returncode}); see {log}", file=sys.stderr)
    return True


def classify(code: int | None) -> str:
    if code is None:
        return "not checked"
    if code in KILLED_CODES:
        return "killed"
    if code in TIMEOUT_CODES:
        return "timeout"
    if code in SURVIVED_CODES:
        return "survived"
    if code in NO_TESTS_CODES:
        return "no tests"
    return "other"  # suspicious, segfault, skipped, caught by a type check: neither killed nor survived


def exit_codes(tree: Path, module: str) -> dict[str, int | None]:
    """mutmut's exit code of each mutant of ``module`` in ``tree`` (None: not run)."""
    meta = tree / "mutants" / (module + ".meta")
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}


def keep_earlier_results(tree: Path, module: str, before: dict[str, int | None]) -> None:
    """Put back the results of the mutants a rerun of the survivors did not run (mutmut clears them)."""
    meta = tree / "mutants" / (module + ".meta")
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    for mutant, code in before.items():
        if codes.get(mutant) is None and code is not None:
            codes[mutant] = code
    tmp = meta.with_suffix(".meta.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, meta)


def collect(tree: Path, module: str, equivalent: dict[str, str]) -> dict:
    """The counts of ``module``'s mutants in ``tree`` (:func:`score` of their statuses)."""
    return score({m: classify(c) for m, c in sorted(exit_codes(tree, module).items())}, equivalent)


def score(status: dict[str, str], equivalent: dict[str, str]) -> dict:
    """Counts and score of per-mutant statuses (what :func:`classify` says), ``equivalent`` left out."""
    count = {s: sum(v == s for v in status.values()) for s in
             ("killed", "timeout", "survived", "no tests", "other", "not checked")}
    survivors = [m for m, s in status.items() if s in ("survived", "no tests")]
    eq = [m for m in survivors if m in equivalent]
    stale = [m for m, s in status.items() if m in equivalent and s in ("killed", "timeout")]
    checked = len(status) - count["not checked"]
    killed = count["killed"] + count["timeout"]
    denominator = checked - len(eq)
    return {
        "mutants": len(status), "checked": checked, "killed": killed, "timeout": count["timeout"],
        "survived": len(survivors) - len(eq), "no_tests": count["no tests"], "other": count["other"],
        "equivalent": len(eq), "not_checked": count["not checked"],
        "score": round(killed / denominator, 4) if denominator else None,
        "survivors": [m for m in survivors if m not in equivalent], "equivalent_ids": eq,
        "listed_equivalent_but_killed": stale, "status": status,
    }


_SHOW = """
import sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
for name in sys.argv[1:]:
    print(f"### {name}")
    print(get_diff_for_mutant(name, path=find_mutant(name).path))
"""


def survivor_diffs(tree: Path, mutants: list[str]) -> str:
    """The diffs of ``mutants`` (what ``mutmut show`` prints), read in one process."""
    if not mutants:
        return ""
    shown = subprocess.run([sys.executable, "-c", _SHOW, *mutants], check=False, cwd=tree, capture_output=True,
                           text=True)
    return shown.stdout if shown.returncode == 0 else f"(mutmut show failed: {shown.stderr.strip()[-500:]})\n"


def table(rows: dict[str, dict], overall: dict) -> str:
    head = ("module", "mutants", "checked", "killed", "(timeout)", "survived", "equivalent", "other",
            "not checked", "score")
    lines = [head]
    for name, r in [*rows.items(), ("overall", overall)]:
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f} %"
        lines.append((name, r["mutants"], r["checked"], r["killed"], r["timeout"], r["survived"],
                      r["equivalent"], r["other"], r["not_checked"], score))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    fmt = lambda line: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                                 for i, (v, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def summary(rows: dict[str, dict]) -> dict:
    """The modules' counts added up, with the overall score."""
    keys = ("mutants", "checked", "killed", "timeout", "survived", "no_tests", "other", "equivalent", "not_checked")
    overall = {k: sum(r[k] for r in rows.values()) for k in keys}
    denominator = overall["checked"] - overall["equivalent"]
    overall["score"] = round(overall["killed"] / denominator, 4) if denominator else None
    return overall


def write_record(args: argparse.Namespace, rows: dict[str, dict], start: float) -> Path:
    """benchmarks/results/mutation_<date>[_<label>][_after].json for the modules done so far (written after each
    module, atomically, so that a run stopped midway leaves the record of what it finished). Modules of an
    earlier run into the same record that this run did not measure keep their rows (e.g. the survivors of one
    module rerun after its pins, then another's)."""
    import mutmut

    stamp = datetime.date.today().isoformat()
    suffix = "_after" if args.rerun_survivors else ""
    name = f"mutation_{stamp}{'_' + args.label if args.label else ''}{suffix}.json"
    out = ROOT / "benchmarks" / "results" / name
    earlier = json.loads(out.read_text()).get("modules", {}) if out.exists() else {}
    rows = {**{m: r for m, r in earlier.items() if m not in rows}, **rows}
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "label": args.label,
        "rev": _commit(args.rev) if args.rev else f"work tree on {_commit('HEAD')}", "tool": f"mutmut {mutmut.__version__}",
        "workers": 1, "wall_s": round(time.time() - start, 1), "max_minutes": args.max_minutes,
        "score": "killed / (checked - equivalent); timeouts count as killed",
        "modules": rows, "overall": summary(rows),
    }
    if args.collect_only and out.exists():  # keep what the run itself measured
        old = json.loads(out.read_text())
        record.update({k: old[k] for k in ("date", "wall_s", "max_minutes") if k in old})
        for m, r in rows.items():
            r.update({k: old["modules"][m][k] for k in ("wall_s", "finished") if m in old.get("modules", {})})
        record["rescored"] = datetime.datetime.now().isoformat(timespec="seconds")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help="module paths (default: every module of merging/, components/, "
                    "models/, systems/)")
    ap.add_argument("--rev", help="mutate and test this git revision instead of the work tree (e.g. HEAD)")
    ap.add_argument("--label", default="", help="suffix of the record's name and of the scratch folder")
    ap.add_argument("--workdir", default=os.environ.get("MUTATION_WORKDIR", "/tmp/adamerge-mutation"),
                    help="scratch folder (a copy of the tree per module)")
    ap.add_argument("--max-minutes", type=float, default=float("inf"),
                    help="stop after this many minutes of wall time in all; unchecked mutants are reported")
    ap.add_argument("--resume", action="store_true", help="keep earlier results in the scratch folders")
    ap.add_argument("--collect-only", action="store_true",
                    help="run nothing: report the results already in the scratch folders (e.g. after editing "
                    "mutation/equivalent.txt)")
    ap.add_argument("--rerun-survivors", action="store_true",
                    help="in the scratch folders of --label, copy the work tree's tests/ and run only the mutants "
                    "that survived (e.g. after writing tests that pin them); the record gets the suffix _after")
    ap.add_argument("--survivors-of", type=Path, metavar="RECORD",
                    help="like --rerun-survivors, from a record (benchmarks/results/mutation_*.json) instead of its "
                    "scratch folders: a fresh copy of HEAD (commit the new tests first), mutmut run on the record's "
                    "survivors and unchecked mutants only, the other results taken from the record; modules default "
                    "to the record's, a module changed since the record's commit is refused")
    ap.add_argument("--exclude-tests", action="append", default=[], metavar="GLOB",
                    help="leave this test file out, repeatable (e.g. a pins file still being written, whose failing tests "
                    "would stop mutmut's first run)")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/results/mutation_*.json")
    args = ap.parse_args(argv)

    if args.rerun_survivors and (args.rev or args.collect_only or not args.label):
        ap.error("--rerun-survivors needs --label (the run to continue) and goes with neither --rev nor --collect-only")
    earlier_rows: dict[str, dict] = {}
    if args.survivors_of:
        if args.rev or args.collect_only or args.rerun_survivors or not args.label:
            ap.error("--survivors-of needs a new --label and goes with none of --rev, --collect-only, --rerun-survivors")
        earlier_commit, earlier_rows = record_rows(args.survivors_of)
        args.rerun_survivors = True  # the record's suffix, _after
    modules = [m.rstrip("/") for m in args.modules] or list(earlier_rows) or default_modules()
    for m in modules:
        if not (ROOT / m).is_file() or not m.endswith(".py"):
            ap.error(f"{m}: not a module of this repository (give a path such as adamerge/merging/ties.py)")
        if not any(fnmatch.fnmatch(m, d + "/*") for d in CORE):
            ap.error(f"{m}: outside the mutated core ({', '.join(CORE)})")
    mapping = read_tests_map(ROOT / "mutation" / "tests.txt")
    equivalent = read_equivalent(ROOT / "mutation" / "equivalent.txt")
    work = Path(args.workdir) / (args.label or "worktree")
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + 60 * args.max_minutes
    rows: dict[str, dict] = {}
    diffs = []
    for module in modules:
        tree = work / module.replace("/", "_")[: -len(".py")]
        if args.survivors_of:
            if module not in earlier_rows or not unchanged_since(module, earlier_commit):
                print(f"{module}: {'not in ' if module not in earlier_rows else 'changed since '}{args.survivors_of}"
                      f"{'' if module not in earlier_rows else ' was run'}: run it afresh", file=sys.stderr)
                continue
            earlier = {m: STATUS_CODES.get(st) for m, st in earlier_rows[module]["status"].items()}
            survivors = [m for m, st in earlier_rows[module]["status"].items()
                         if st in ("survived", "no tests", "not checked") and m not in equivalent]
            if not survivors:
                print(f"{module}: nothing survived in {args.survivors_of}", file=sys.stderr)
                continue
            populate(tree, "HEAD")  # committed tests only: the work tree may hold edits under way
        elif args.collect_only or args.rerun_survivors:
            if not tree.exists():
                print(f"{module}: no earlier run in {tree}", file=sys.stderr)
                continue
            if args.rerun_survivors and not refresh(tree, module):
                continue
        elif not (args.resume and tree.exists()):
            populate(tree, args.rev)
        tests = [t for t in tests_for(module, mapping, tree)
                 if not any(fnmatch.fnmatch(t, g) for g in args.exclude_tests)]
        if not tests:
            print(f"{module}: no test file found; add it to mutation/tests.txt", file=sys.stderr)
            continue
        t0 = time.time()
        if not args.survivors_of:  # (with it, survivors and earlier come from the record, above)
            survivors = collect(tree, module, equivalent)["survivors"] if args.rerun_survivors else None
        if args.collect_only or survivors == []:
            finished = None
        else:
            write_config(tree, module, tests)
            before = earlier if args.survivors_of else exit_codes(tree, module)
            finished = time.time() < deadline and run_mutmut(tree, deadline, tree / "mutmut.log", survivors)
            if survivors and exit_codes(tree, module):  # mutmut keeps only the results of the mutants it ran
                if args.survivors_of and set(exit_codes(tree, module)) != set(before):
                    print(f"{module}: its mutants differ from those of {args.survivors_of}: run it afresh",
                          file=sys.stderr)
                    continue
                keep_earlier_results(tree, module, before)
        rows[module] = collect(tree, module, equivalent)
        rows[module].update(tests=tests, wall_s=round(time.time() - t0, 1), finished=finished)
        print(f"{module}: {rows[module]['killed']}/{rows[module]['checked']} killed "
              f"({rows[module]['not_checked']} not checked) in {rows[module]['wall_s']} s", flush=True)
        if rows[module]["survivors"]:
            diffs.append(survivor_diffs(tree, rows[module]["survivors"]))
        if not (args.no_record or args.collect_only):
            write_record(args, rows, start)
    overall = summary(rows)
    print()
    print(table(rows, overall))
    (work / "survivors.txt").write_text("\n".join(diffs))
    print(f"\nsurvivors' diffs: {work / 'survivors.txt'}")
    for m, r in rows.items():
        if r["listed_equivalent_but_killed"]:
            print(f"warning: {m}: listed in mutation/equivalent.txt but killed: {r['listed_equivalent_but_killed']}")
    if rows and not args.no_record:
        print(f"record: {write_record(args, rows, start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
