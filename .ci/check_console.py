"""CI check of what the README's main job printed (`sde-ray train`'s console, teed by .ci/run): the
progress lines, the P@1 table and the paths a user needs, in fewer than 80 lines, and none of Ray's,
Ray Data's or DeepSpeed's own output (that stays in the Ray log folder the last line names).

Usage: python3 .ci/check_console.py CONSOLE_FILE   (exit status 1 with the reasons when it fails)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MAX_LINES = 80
PATHS = ("output_dir", "model_dir", "checkpoint", "metrics_jsonl", "spectrum_plot", "logs")
PROGRESS = re.compile(r"^step +\d+/\d+ \[[#.]+\] +\d+% \| loss ")
# Ray-forwarded worker lines, Ray Train's reports, Ray Data's plans, DeepSpeed, deprecation warnings,
# wandb's banner and summary, tqdm redraws (`45%|####`) in a non-terminal.
CHATTER = re.compile(r"\((RayTrainWorker|TrainController|PlacementGroupCleaner)|TrainingReport\(|Execution plan|"
                     r"DeepSpeed|FutureWarning|^wandb:|\d%\|")


def problems(lines: list[str]) -> list[str]:
    """Why this console is not the one the README promises ([] when it is)."""
    found = []
    if len(lines) >= MAX_LINES:
        found.append(f"{len(lines)} lines (at most {MAX_LINES - 1})")
    if not any(PROGRESS.match(line) for line in lines):
        found.append("no progress line (`step N/M [###...] P% | loss ...`)")
    if not any(line.startswith("| Dataset | Meta-task |") for line in lines) or \
            not any(line.startswith("| Overall |") for line in lines):
        found.append("no P@1 table (per dataset and overall)")
    missing = [key for key in PATHS if not any(line.startswith(f"{key}: ") for line in lines)]
    if missing:
        found.append(f"paths missing: {', '.join(missing)}")
    chatter = [line for line in lines if CHATTER.search(line)]
    if chatter:
        found.append(f"{len(chatter)} lines of library output, first: {chatter[0]!r}")
    return found


def main(path: str) -> int:
    lines = Path(path).read_text(errors="replace").splitlines()
    found = problems(lines)
    print(f"== [main] sde-ray train printed {len(lines)} lines" + (": " + "; ".join(found) if found else ""))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
