"""Job entrypoint: `ray job submit --working-dir . -- python jobs/tune.py --config configs/sweeps/NAME.yaml`.

Thin by design: `sde-ray tune` parses the arguments and the sweep driver validates the sweep file
and every key of its search space before any trial starts. Pass `--output-dir` on shared storage
(or `train.storage_path=s3://...`) so a resubmitted job resumes the sweep.
"""

import sys

from sde_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
