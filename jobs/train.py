"""Job entrypoint: `ray job submit --working-dir . -- python jobs/train.py --config C [k=v ...]`.

Thin by design: the `sde-ray train` command parses the arguments, validates the config (a bad key
exits with status 2 before Ray is touched) and runs the training driver. Inside a Ray job
`RAY_ADDRESS` is set, so the driver joins the submitting cluster instead of starting its own.
"""

import sys

from sde_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
