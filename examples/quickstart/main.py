"""Run the quickstart: basket and catalog in two OS processes over one SQLite file."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'quickstart.db'}"
        print(f"transport: {url}")
        command = [sys.executable, "-m", "examples.quickstart.services"]
        basket = subprocess.Popen([*command, "basket", url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert basket.stdout is not None
        # basket declares its queue and subscriptions first, so it hears every price change.
        if basket.stdout.readline().strip() != "ready":
            return 1
        catalog = subprocess.Popen([*command, "catalog", url], cwd=ROOT)
        for line in basket.stdout:
            print(line, end="")
        codes = [basket.wait(timeout=60), catalog.wait(timeout=60)]
    print("both services exited", "cleanly" if codes == [0, 0] else f"with {codes}")
    return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
