"""The web demo's example videos: a few synthetic clips (synthetic_data.py), made once into a cache folder, and
the real footage of ``../shared/media`` where present."""
from __future__ import annotations

import csv
import logging
import pathlib
import shutil
import tempfile

import video
from runtime import one_line
from synthetic_data import make_sample_dataset

log = logging.getLogger("star.app")

MEDIA_DIR = pathlib.Path(__file__).resolve().parent.parent / "shared" / "media"   # real footage, when present
SAMPLE_VIDEOS, SAMPLE_SEED, SAMPLE_EXAMPLES = 8, 1, 3


def sample_examples(cache_dir, count: int = SAMPLE_EXAMPLES) -> list[tuple[str, str]]:
    """A few synthetic clips from synthetic_data.py, made once into ``cache_dir``:
    ``(path, label)`` pairs, clips with an action (one per class) first, then one without."""
    root = pathlib.Path(cache_dir) / f"sample_seed{SAMPLE_SEED}"
    if not (root / "action_challenge.csv").is_file():
        _make_samples(root)
    names = (root / "classes.txt").read_text().split()
    actions, negatives, seen = [], [], set()
    with (root / "action_challenge.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            path = str(root / row["video_file"])
            classes = _label_classes(root / row["label_file"], names) if row["label_file"] else []
            if not classes:
                negatives.append((path, "sample: no action"))
            elif classes[0] not in seen:
                seen.add(classes[0])
                actions.append((path, "sample: " + " + ".join(classes)))
    return actions[:count] + negatives[:1]


def _make_samples(root: pathlib.Path) -> None:
    """Write the sample clips to a temporary folder, then move it in place (two servers may start at once)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".samples_", dir=root.parent))
    make_sample_dataset(tmp, num_videos=SAMPLE_VIDEOS, seed=SAMPLE_SEED)
    try:
        tmp.rename(root)
    except OSError:   # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)


def _label_classes(label_file: pathlib.Path, names: list[str]) -> list[str]:
    """The class names a sample label file names (first field of each line), in order."""
    ids = [int(line.split()[0]) for line in label_file.read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    return list(dict.fromkeys(names[i] if i < len(names) else f"action_{i}" for i in ids))


def media_examples(media_dir=MEDIA_DIR) -> list[tuple[str, str]]:
    """Real footage from ``../shared/media`` where present: ``(path, label)`` pairs."""
    folder = pathlib.Path(media_dir)
    if not folder.is_dir():
        return []
    return [(str(p), f"footage: {p.name}") for p in sorted(folder.iterdir()) if p.is_file() and video.is_video_file(p)]


def collect_examples(cache_dir) -> list[tuple[str, str]]:
    """Sample clips plus real footage; an example that cannot be made is left out with a warning."""
    try:
        samples = sample_examples(cache_dir)
    except (OSError, ValueError, video.VideoError) as err:
        log.warning("no sample clips (%s): the page shows real footage only, if any", one_line(err))
        samples = []
    return samples + media_examples()
