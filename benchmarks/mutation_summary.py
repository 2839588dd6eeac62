"""Mutation testing summary per module: killed / survived / no test / timeout, and every survivor's change.

    make mutation                                  # mutmut run (outside the default suite), then this script
    .venv/bin/python benchmarks/mutation_summary.py [--no-diffs]

Reads mutmut's own results (`mutmut results --all true`, `mutmut show <mutant>`), prints a table per module of the
scope in pyproject.toml ([tool.mutmut] only_mutate) and writes benchmarks/results/mutation.json and mutation.md.
"Killed" counts mutants a test failed on (timeouts count as killed: the mutant made a test hang); the killed share
is killed / (every mutant that was run).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

RESULTS = Path("benchmarks/results")
MUTMUT = str(Path(sys.executable).parent / "mutmut")
# mutmut's names: evopress.mutation.x_level_switch__mutmut_3, evopress.scoring.xǁFitnessContextǁkl__mutmut_1
NAME = re.compile(r"^(?P<module>[\w.]+?)\.x(?:_|ǁ)(?P<function>.+?)__mutmut_\d+$")


def mutmut(*args: str) -> str:
    return subprocess.run([MUTMUT, *args], capture_output=True, text=True, check=True).stdout


def statuses() -> dict[str, str]:
    """mutant name -> status (killed, survived, no tests, timeout, not checked, ...)."""
    out = {}
    for line in mutmut("results", "--all", "true").splitlines():
        name, sep, status = line.strip().partition(": ")
        if sep and NAME.match(name):
            out[name] = status.strip()
    return out


def change_of(name: str) -> list[str]:
    """The lines a mutant removes and adds (its diff without headers)."""
    diff = mutmut("show", name).splitlines()
    return [d for d in diff if d[:1] in "+-" and not d.startswith(("+++", "---"))]


def summarize(found: dict[str, str]) -> dict[str, dict]:
    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in found.items():
        per_module[NAME.match(name)["module"]][status] += 1
    table = {}
    for module, counts in sorted(per_module.items()):
        killed = counts["killed"] + counts["timeout"]
        run = killed + counts["survived"] + counts["no tests"] + counts["suspicious"]
        table[module] = {
            "mutants": sum(counts.values()),
            "killed": killed,
            "survived": counts["survived"],
            "no_tests": counts["no tests"],
            "not_checked": counts["not checked"],
            "killed_share": round(killed / run, 4) if run else None,
        }
    return table


def markdown(table: dict, survivors: dict[str, list[str]]) -> str:
    lines = [
        "| module | mutants | killed | survived | no test | not run | killed share |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for module, row in table.items():
        share = f"{100 * row['killed_share']:.1f}%" if row["killed_share"] is not None else "-"
        lines.append(
            f"| {module} | {row['mutants']} | {row['killed']} | {row['survived']} | {row['no_tests']} "
            f"| {row['not_checked']} | {share} |"
        )
    lines += [
        "",
        f"python {platform.python_version()}, {platform.machine()}; mutmut scope: pyproject.toml",
        "",
    ]
    for name, change in survivors.items():
        lines += [f"- `{name}`", "  ```diff", *[f"  {c}" for c in change], "  ```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-diffs", action="store_true", help="do not list each survivor's change")
    args = ap.parse_args()
    found = statuses()
    if not found:
        sys.exit("no mutmut results here: run `make mutation` (or `.venv/bin/mutmut run`) first")
    table = summarize(found)
    alive = [n for n, s in sorted(found.items()) if s in ("survived", "no tests")]
    survivors = {} if args.no_diffs else {n: change_of(n) for n in alive}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutation.json").write_text(json.dumps({"modules": table, "survivors": survivors}, indent=1))
    text = markdown(table, survivors)
    (RESULTS / "mutation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
