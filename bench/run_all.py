"""`make bench`: every benchmark in bench/, one after the other; each writes bench/results/<name>.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ["prepare_throughput.py", "pretrain_overhead.py", "cpu_demo_mfu.py", "onebit_network.py",
           "onebit_convergence.py", "pruned_step_time.py", "host_overhead.py", "earlybird_emergence.py"]


def main() -> int:
    here = Path(__file__).resolve().parent
    for name in BENCHES:
        print(f"== {name}", flush=True)
        code = subprocess.call([sys.executable, str(here / name)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
