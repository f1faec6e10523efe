"""Instructions counted by callgrind for one Python command: the measure the *_instructions benches share.

Instructions, not seconds: repeatable on a noisy machine. Run `python ARGS...` under
`valgrind --tool=callgrind`; callgrind writes one file per thread (the SQLite transport's connection
thread, an SDK's batch processor), so the total is their sum.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["instructions_of"]


def instructions_of(args: list[str], *, what: str, env: Mapping[str, str] | None = None) -> int:
    """Instructions of `python *args` (PYTHONHASHSEED=0 unless `env` says); exits on its failure.

    `{scratch}` in an argument becomes a temporary directory the command may use.
    """
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        environment = {"PYTHONHASHSEED": "0", **(env if env is not None else os.environ)}
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             *(arg.replace("{scratch}", scratch) for arg in args)],
            check=False, capture_output=True, text=True, env=environment,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"{what} failed:\n{done.stderr[-2000:]}")
        total = 0
        for path in Path(scratch).glob("callgrind.out*"):
            found = re.search(r"^summary: (\d+)", path.read_text(), re.MULTILINE)
            assert found, f"no summary in {path.name} for {what}"
            total += int(found.group(1))
        return total
