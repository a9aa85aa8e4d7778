#!/usr/bin/env python
"""Rewrite the golden outputs in tests/golden/ that tests/test_golden.py compares the code against.

    python tools/record_golden.py            # every golden file
    python tools/record_golden.py stream     # only the tests whose names match (pytest -k; several: "a or b")

It runs tests/test_golden.py with STAR_RECORD_GOLDEN=1 (the tests write their files instead of comparing), then once
more as usual, to show that what it wrote reproduces.

Run it only deliberately: when a change of behaviour is intended (a fixed bug, a new rule or default), or, before any
change, on a machine where the recorded files do not reproduce (another CPU or library version: tests/golden/meta.json
says what they were recorded with). Commit the rewritten files alone, with the reason in the commit message. Never run
it to make a failing golden test pass after a change that was meant to keep behaviour: the failure is the finding.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_FILE = "tests/test_golden.py"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_FILE]
    if argv:
        command += ["-k", " or ".join(argv)]
    rc = subprocess.call(command, cwd=ROOT, env={**os.environ, "STAR_RECORD_GOLDEN": "1"})
    if rc != 0:
        print(f"recording failed (exit {rc}); the golden files may be partly rewritten: git checkout tests/golden",
              file=sys.stderr)
        return rc
    env = {k: v for k, v in os.environ.items() if k != "STAR_RECORD_GOLDEN"}
    rc = subprocess.call(command, cwd=ROOT, env=env)
    if rc != 0:
        print("the files just written do not reproduce: something in the run is not deterministic", file=sys.stderr)
        return rc
    print("golden files rewritten and checked: review `git diff --stat tests/golden`, then commit them with the reason")
    return 0


if __name__ == "__main__":
    sys.exit(main())
