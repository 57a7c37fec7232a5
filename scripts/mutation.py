"""Mutation testing of the core packages against the fast unit tests, within a time budget (docs/testing.md).

    python scripts/mutation.py [--budget-min 60] [--report-only] [--show] [PATTERN ...]

PATTERN: mutmut mutant-name globs, e.g. "pipeline.models.masking*" (default: every module that pyproject's
[tool.mutmut] only_mutate names: models, methods, train, data, evaluation). Runs `mutmut run` on them for at most
the budget (mutmut keeps its results in mutants/: a later run goes on where this one stopped), then prints the score
of each module it has results for: mutants detected (killed by a test, or timed out) over those checked, less the
equivalent ones. The survivors are explained in tests/mutation_survivors.txt, one a line: the mutant's name, then
a one-line reason why it is equivalent, or "killed by NODEID": a test that mutmut's run leaves out (seconds long: node
processes, torch.compile) or cannot switch the mutant on for (code run at import). The script runs that test on the
mutant in a fresh process and counts the mutant detected only if the test fails. Exits 1 when a checked mutant
survived that the file does not explain, or that its named test lets live, or when the file names a mutant that
mutmut no longer makes (the code changed under its reason).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SURVIVORS = ROOT / "tests" / "mutation_survivors.txt"
DETECTED = {1, 3, 36, -24, 24, 152, 255}          # mutmut's exit codes of a killed or timed-out mutant
SURVIVED = 0


def explained_survivors(path: Path = SURVIVORS) -> dict[str, str]:
    """{mutant name: reason} from the survivors file (blank lines and # comments skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            if not reason.strip():
                raise SystemExit(f"{path}: {name} has no reason")
            found[name] = reason.strip()
    return found


def results(root: Path = ROOT) -> dict[str, dict[str, int | None]]:
    """{module: {mutant name: exit code or None (not checked)}} from mutmut's meta files."""
    return {str(meta.relative_to(root / "mutants").with_suffix("").with_suffix("")).replace("/", "."):
            json.loads(meta.read_text())["exit_code_by_key"]
            for meta in sorted((root / "mutants").rglob("*.py.meta"))}


KILLED_BY = "killed by "


def _named_test(nodeid: str, mutant: str, root: Path) -> int:
    """pytest's exit code for one test with `mutant` switched on (mutmut's mutants/ copy, MUTANT_UNDER_TEST as mutmut
    sets it), in a fresh process."""
    env = dict(os.environ, MUTANT_UNDER_TEST=mutant, MIM_TEST_COLD="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:randomly",
                           "-p", "no:cacheprovider", nodeid], cwd=root / "mutants", env=env,
                          capture_output=True).returncode


@functools.cache
def _passes_unmutated(nodeid: str, root: Path) -> bool:
    return _named_test(nodeid, "none", root) == 0


def killed_by_named_test(name: str, reason: str, root: Path = ROOT) -> bool:
    """Whether the test a "killed by NODEID" reason names passes without the mutant and fails with it, in a fresh
    process: it also kills the mutants of code that runs at import, which mutmut's workers, forked after the
    import, never switch on. Failing counts in any form: a failed assertion, or a mutant that breaks the import
    (pytest then reports no such test, exit 4, which is why the test must first pass without it)."""
    nodeid = reason[len(KILLED_BY):].split()[0]
    return _passes_unmutated(nodeid, root) and _named_test(nodeid, name, root) != 0


def score(modules: dict[str, dict[str, int | None]], equivalent: dict[str, str],
          killed=killed_by_named_test) -> tuple[list[dict], list[str]]:
    """One row per module with checked mutants, and the names of the survivors not explained: not listed as
    equivalent, or listed as killed by a named test that lets them live."""
    rows, unexplained = [], []
    for module, codes in modules.items():
        checked = {name: code for name, code in codes.items() if code is not None}
        if not checked:
            continue
        survived = [name for name, code in checked.items() if code == SURVIVED]
        named = [name for name in survived if equivalent.get(name, "").startswith(KILLED_BY)]
        slow_kills = [name for name in named if killed(name, equivalent[name])]
        listed = [name for name in survived if name in equivalent and name not in named]
        unexplained += [name for name in survived if name not in listed and name not in slow_kills]
        detected = sum(code in DETECTED for code in checked.values()) + len(slow_kills)
        counts = Counter(checked.values())
        rows.append({"module": module, "mutants": len(codes), "checked": len(checked), "detected": detected,
                     "equivalent": len(listed), "survived": len(survived) - len(listed) - len(slow_kills),
                     "other": len(checked) - detected + len(slow_kills) - counts[SURVIVED],   # no test, suspicious
                     "score": detected / max(1, len(checked) - len(listed))})
    return rows, unexplained


def stale_entries(modules: dict[str, dict[str, int | None]], equivalent: dict[str, str]) -> list[str]:
    """Names the survivors file lists in a module mutmut has generated, that are no longer among its mutants: the
    code changed, so the name now points at no mutant or (numbers shift) at another; the reason must be read again."""
    prefixes = {module: tuple(module.removesuffix(".__init__") + f".x{mark}" for mark in "_ǁ")   # x_func, xǁClass
                for module in modules}
    return [name for name in equivalent
            if any(name.startswith(prefixes[module]) and name not in names for module, names in modules.items())]


def table(rows: list[dict]) -> str:
    lines = ["| module | mutants | checked | detected | equivalent | survived | other | score |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['module']} | {r['mutants']} | {r['checked']} | {r['detected']} | {r['equivalent']} | "
              f"{r['survived']} | {r['other']} | {r['score']:.1%} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", help="mutant-name globs (default: every core module)")
    parser.add_argument("--budget-min", type=float, default=60.0, help="stop mutmut after this many minutes")
    parser.add_argument("--report-only", action="store_true", help="only print the scores of the results so far")
    parser.add_argument("--show", action="store_true", help="also print the diff of every unexplained survivor")
    args = parser.parse_args(argv)
    if not args.report_only:
        env = dict(os.environ, MIM_TEST_COLD="1")   # no fork server per pytest run (tests/conftest.py)
        proc = subprocess.Popen([Path(sys.executable).parent / "mutmut", "run", "--max-children",
                                 str(os.cpu_count() or 1), *args.patterns], cwd=ROOT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=60 * args.budget_min)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)      # mutmut and the test processes it started
            proc.wait()
            print(f"\nbudget of {args.budget_min:g} min spent: the scores below count the mutants checked so far")
    modules, equivalent = results(), explained_survivors()
    rows, unexplained = score(modules, equivalent)
    stale = stale_entries(modules, equivalent)
    print(table(rows))
    for name in stale:
        print(f"stale: {name} is listed in {SURVIVORS.relative_to(ROOT)} but mutmut no longer makes it (the code "
              "changed): find the mutant its reason describes and list that one, or drop the line")
    for name in unexplained:
        print(f"survived: {name} (kill it with a test, or list it in {SURVIVORS.relative_to(ROOT)} with a reason)")
        if args.show:
            diff = subprocess.run([Path(sys.executable).parent / "mutmut", "show", name], cwd=ROOT,
                                  capture_output=True, text=True).stdout
            print("".join(f"    {line}\n" for line in diff.splitlines() if line[:2] in ("- ", "+ ")))
    return 1 if unexplained or stale else 0


if __name__ == "__main__":
    sys.exit(main())
