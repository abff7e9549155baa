"""Job entrypoint: `ray job submit --working-dir . -- python jobs/eval.py --checkpoint P [--data DIR]`.

Thin by design: `sde-ray eval` parses and validates the arguments, then runs the MMEB evaluator.
"""

import sys

from sde_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
