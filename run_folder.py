"""The output folder of a training run: one run per folder (a previous run's outputs are refused unless --resume
continues it or --overwrite replaces it, and --overwrite removes nothing else) and a full disk said in one line.
"""
from __future__ import annotations

import contextlib
import errno
import glob
from pathlib import Path

from checkpoint import CheckpointError
from runtime import UsageError, one_line

# What a run writes in its output folder; --overwrite removes these (and the SETUP_OUTPUTS) and nothing else.
RUN_OUTPUTS = ("checkpoint.pth", "best_model.pth", "training_results.csv", "test_predictions.csv", "val_metrics.json",
               "losses.png", "metrics.png", "confusion_matrix.png")
PROBLEMS_NAME = "dataset_problems.txt"
SETUP_OUTPUTS = ("split.json", "train.log", PROBLEMS_NAME)
PREVIOUS_RUN = ("checkpoint.pth", "best_model.pth", "training_results.csv")   # a folder holding one holds a run
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def prepare_output_dir(output_dir: Path, args, rank: int) -> list[str]:
    """Make ``output_dir`` hold one run only, before the log opens (--overwrite removes train.log): a previous
    run's outputs are refused unless --resume or --overwrite says what to do with them; --overwrite removes them;
    --resume without checkpoint.pth (a kill before the first one) removes the killed attempt's results, since the
    run starts from scratch; temporary files of an interrupted write are removed. Only rank 0 removes anything.
    Returns the lines to log."""
    previous = [name for name in PREVIOUS_RUN if (output_dir / name).exists()]
    if previous and not (args.resume or args.overwrite):
        raise UsageError(f"--output_dir {output_dir} holds a previous run ({', '.join(previous)}): continue it with "
                         "--resume, replace it with --overwrite, or choose another folder")
    doomed, why = (), ""
    if args.overwrite:
        doomed, why = RUN_OUTPUTS + SETUP_OUTPUTS, "--overwrite: removed the previous run's outputs:"
    elif args.resume and not (output_dir / "checkpoint.pth").exists():
        doomed, why = RUN_OUTPUTS, "--resume: no checkpoint.pth (the earlier attempt stopped before its first), " \
                                   "so its outputs are removed:"
    doomed = [output_dir / name for name in doomed if (output_dir / name).is_file()]
    keep_inputs(args, doomed)
    if rank != 0:
        return []
    temporary = [path for name in RUN_OUTPUTS + SETUP_OUTPUTS
                 for path in output_dir.glob(f".{glob.escape(name)}.*.tmp") if path.is_file()]
    notes = [f"{why} {', '.join(remove(doomed))}"] if doomed else []
    if temporary:
        notes.append(f"removed {len(temporary)} temporary file(s) left by an interrupted write: "
                     f"{', '.join(remove(temporary))}")
    return notes


def keep_inputs(args, doomed: list[Path]) -> None:
    """Refuse to remove a file the run reads (fine-tuning from the previous run's best_model.pth)."""
    for flag, value in (("--init_from", args.init_from), ("--backbone_weights", args.backbone_weights)):
        if value and any(Path(value).resolve() == path.resolve() for path in doomed):
            raise UsageError(f"{flag} {value}: a previous run's output that this run would remove; copy it out of "
                             "--output_dir first")


def remove(paths) -> list[str]:
    """Delete ``paths``; their names, for the log."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise UsageError(f"{path}: cannot remove it ({one_line(err, path)})") from None
    return [path.name for path in paths]


def disk_full(err: BaseException | None) -> bool:
    """Whether a full disk (or quota) caused ``err``: torch reports a failed write as a RuntimeError ('unexpected
    pos') with the OSError only in its context, and save_checkpoint wraps that again."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def writing(path: Path):
    """A full disk while writing ``path``: one line that says so and names the file (main.py exits 2)."""
    try:
        yield
    except (OSError, CheckpointError) as err:
        if not disk_full(err):
            raise
        raise UsageError(f"{path}: the disk is full, writing it failed; checkpoint.pth still holds the last epoch "
                         "saved (free some space, then continue with --resume)") from None
