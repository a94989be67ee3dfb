"""Put each sweep's report into README.md, so that the benchmark tables are generated, not typed.

    python bench/readme_tables.py           # rewrite README.md between the markers
    python bench/readme_tables.py --check   # exit 1 if README.md differs from the reports

README.md marks a generated block as

    <!-- report: seed_methods -->
    ... (replaced by bench/results/sweeps/seed_methods/report.md) ...
    <!-- /report -->

and the report itself comes from `bbpt report bench/sweeps/NAME.toml --out
bench/results/sweeps/NAME` (see each sweep file's header).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- report: ([\w-]+) -->\n)(.*?)(<!-- /report -->)", re.S)


def render(text: str) -> str:
    def one(m: re.Match) -> str:
        rep = ROOT / "bench" / "results" / "sweeps" / m.group(2) / "report.md"
        if not rep.is_file():
            sys.exit(f"{rep} does not exist; run the sweep and `bbpt report` first (see bench/sweeps/{m.group(2)}.toml)")
        return m.group(1) + rep.read_text().rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(one, text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = render(old)
    if args.check:
        sys.exit(0 if new == old else "README.md differs from the sweep reports; run python bench/readme_tables.py")
    readme.write_text(new)
    print(f"README.md: {len(BLOCK.findall(new))} generated blocks")


if __name__ == "__main__":
    main()
