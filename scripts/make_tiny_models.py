"""Regenerate the tiny test models of every family (or the named ones) into a folder.

    python scripts/make_tiny_models.py --out /tmp/tiny [qwen2_5_vl gemma3 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny import all_specs, build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("names", nargs="*", help=f"default: all of {', '.join(all_specs())}")
    args = p.parse_args()
    for name in args.names or list(all_specs()):
        folder = build(name, args.out)
        n = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        print(f"{name}: {folder} ({n:.1f} MB)")


if __name__ == "__main__":
    main()
