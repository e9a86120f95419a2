#!/usr/bin/env python
"""Entry script for `ray submit cluster.yaml scripts/run_study.py -- STUDY [sweep run options]`.

`ray submit` copies this one file to the head node (as ~/run_study.py) and runs it there with the
head's `python`, so it carries no project code: the project must already be installed on every node
(cluster.yaml's setup_commands do `pip install -e ~/calibration-sweep`). It runs `sweep run` joined to
the cluster the script runs on:

  * relative paths (the study file, --out) are taken relative to the project checkout on the node
    (the installed `sweep` package's repository, ~/calibration-sweep with cluster.yaml);
  * without --address and without $RAY_ADDRESS it adds `--address auto` (the Ray instance already
    running on this node), never starting a second, embedded Ray beside the cluster;
  * the exit code is `sweep run`'s (0 all done, 1 some trial failed, 2 invalid input, 3 locked,
    4 study directory not writable, 130 interrupted), so `ray submit` reports a failure as one.

Examples (from the repository root on your machine):

  ray submit cluster.yaml scripts/run_study.py -- sweep/studies/kurz2024.yaml --out s3://bucket/kurz2024
  ray submit --tmux cluster.yaml scripts/run_study.py -- sweep/studies/kurz2024.yaml   # survives a dropped SSH
"""
from __future__ import annotations

import os
import sys


def build_argv(args: list[str]) -> list[str]:
    """`sweep run` arguments for the given script arguments (the study file, then `sweep run` options)."""
    if not args or args[0] in ("-h", "--help"):
        return ["run", "--help"]
    argv = ["run", *args]
    has_address = any(a == "--address" or a.startswith("--address=") for a in args)
    if not has_address and not os.environ.get("RAY_ADDRESS"):
        argv += ["--address", "auto"]
    return argv


def main(args: list[str] | None = None) -> int:
    try:
        from sweep.cli.main import main as sweep_main
        from sweep.study.env import REPO_ROOT
    except ImportError as problem:
        print(f"error: the calibration-sweep package is not installed for {sys.executable} ({problem}); "
              "cluster.yaml's setup_commands install it on every node (`ray up cluster.yaml` again "
              "re-runs them)", file=sys.stderr)
        return 2
    os.chdir(REPO_ROOT)  # relative study and output paths mean the project checkout on this node
    return sweep_main(build_argv(sys.argv[1:] if args is None else args))


if __name__ == "__main__":
    sys.exit(main())
