"""A PNG screenshot of a run's report (the whole page), rendered by headless Chromium.

    python scripts/screenshot_report.py runs/demo docs/report.png [--width 1280]

RUN_DIR may also be a report's HTML file. The report of a run folder is rebuilt first (runs/demo/report.html).
Needs Chromium (apt-get install -y chromium).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlmtune.report import screenshot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's output_dir (or a report .html file)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="page width in CSS pixels")
    args = parser.parse_args()
    print(screenshot(args.run_dir, args.out, width=args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
