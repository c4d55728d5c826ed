"""The README's picture of the report: a real sweep's page, from its top down to the front's table.

    paretoray report ruler -o /tmp/ruler.html
    python docs/screenshot.py /tmp/ruler.html docs/report.png

Drives Debian's Chromium through Playwright (`make browser` installs it; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a page written by `paretoray report`")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 1000})
        page.goto(args.report.resolve().as_uri())
        page.wait_for_function("window.paretorayReport !== undefined")
        page.evaluate("() => window.paretorayReport.ready")
        bottom = page.evaluate("() => document.querySelector('#front-table').closest('section').getBoundingClientRect().bottom")
        page.screenshot(path=str(args.out), full_page=True, clip={"x": 0, "y": 0, "width": args.width, "height": bottom + 16})
        browser.close()
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
