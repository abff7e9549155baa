"""Job entrypoint: `ray job submit --working-dir . -- python jobs/compare.py --config C --seeds 3`.

Thin by design: `sde-ray compare` parses and validates the config, then trains every objective ×
seed on equal terms and writes the comparison table.
"""

import sys

from sde_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
