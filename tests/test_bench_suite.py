"""bench/bench_suite.py without training: the table with its mean, worst and held-out rows on made-up results, the
resume logic and a failing variant with a fake child runner (no main.py, no test.py), and the multi-actor subset on a
tiny variant rendered by tools/make_suite_data.py."""
import dataclasses
import json
import pathlib

import pytest

import clip_loader
from bench import bench_suite, common
from records import load_dataset
from tools import make_suite_data as suite


def fake_row(name, maps, aps, multi=(0, None, None), minutes=(50.0, 2.0), held_out=False):
    row = {"variant": name, "held_out": held_out, "status": "ok", "note": "", "commands": [],
           **dict(zip(bench_suite.MAPS, maps)), "frame_ap50": aps, "multi_videos": multi[0],
           "multi_frame_map50": multi[1], "multi_video_map50": multi[2], "train_min": minutes[0],
           "test_min": minutes[1]}
    return {**row, "worst_class": bench_suite.worst_class(aps)}


def test_held_out_variants_are_left_out_unless_asked():
    held = [n for n, v in suite.SUITE.items() if v.held_out]
    assert len(held) == 2
    run, left = bench_suite.select_variants(["all"], held_out=False)
    assert left == held and not set(run) & set(held) and len(run) == len(suite.SUITE) - 2
    assert bench_suite.select_variants([f"people_base,{held[0]}"], held_out=False) == (["people_base"], [held[0]])
    assert bench_suite.select_variants(["all"], held_out=True) == (list(suite.SUITE), [])
    with pytest.raises(SystemExit, match="nobody"):
        bench_suite.select_variants(["people_base", "nobody"], held_out=False)


def test_table_has_mean_and_worst_over_the_variants_not_held_out_and_held_out_apart():
    results = [fake_row("a", (0.6, 0.8, 0.5), {"wave": 0.3, "jump": 0.9}, (2, 0.5, 0.4), (50.0, 2.0)),
               fake_row("b", (0.8, 0.9, 0.7), {"wave": 0.5, "jump": 0.7, "fall": None}, minutes=(70.0, 3.0)),
               {"variant": "c", "held_out": False, "status": "failed", "commands": [],
                "note": "FAILED: train (exit code 1), see w/c/train.out"},
               fake_row("h", (0.1, 0.2, 0.05), {"wave": 0.05}, held_out=True)]
    mean, worst = bench_suite.summarise(results)
    assert mean["frame_map50"] == pytest.approx(0.7) and mean["video_map50"] == pytest.approx(0.6)
    assert mean["frame_ap50"]["fall"] is None   # no ground truth of it anywhere: left out, not a 0
    assert {c: ap for c, ap in mean["frame_ap50"].items() if ap is not None} == pytest.approx({"wave": 0.4, "jump": 0.8})
    assert mean["multi_frame_map50"] == pytest.approx(0.5) and mean["train_min"] == pytest.approx(60)
    assert worst["frame_map50"] == 0.6 and worst["video_map20"] == 0.8 and worst["train_min"] == 70.0
    assert worst["worst_class"] == ("a: wave", 0.3) and mean["worst_class"][0] == "wave"
    assert mean["note"] == "2 of 3 variants; without c"

    args = bench_suite.get_args_parser().parse_args(["--quick"])
    text = bench_suite.report(results, args, ["fps_15_60"])
    lines = text.splitlines()
    assert "QUICK schedule" in lines[0] and "--decoder_steps 60" in lines[0] and "--score_threshold 0.05" in lines[0]
    first_table = [ln for ln in lines[2:lines.index("Held out (kept out of every choice until the end):")] if ln]
    assert [ln.split("|")[1].strip() for ln in first_table[2:]] == ["a", "b", "c", "mean", "worst"]
    assert first_table[-2].startswith("| mean | 0.700 | 0.850 | 0.600 | wave 0.40 | wave 0.40, jump 0.80, fall n/a |")
    assert first_table[-1].startswith("| worst | 0.600 | 0.800 | 0.500 | a: wave 0.30 |")
    assert "| a | 0.600 | 0.800 | 0.500 | wave 0.30 | wave 0.30, jump 0.90 | 2 | 0.500 | 0.400 | 50.0 | 2.0 |" in text
    assert "| b | 0.800 | 0.900 | 0.700 | wave 0.50 | wave 0.50, jump 0.70, fall n/a | 0 | - | - |" in text
    assert "| c | - |" in text and "FAILED: train (exit code 1), see w/c/train.out" in text
    held_table = text.split("Held out (kept out of every choice until the end):")[1]
    assert "| h | 0.100 |" in held_table and "| h |" not in text.split("Held out (kept")[0]
    assert lines[-1] == "Held out, not run: fps_15_60 (--held_out runs them, at the end only)"
    assert bench_suite.summarise(results[2:]) == []   # nothing finished outside the held-out set: no summary rows


def _fake_dataset(root: pathlib.Path) -> pathlib.Path:
    """A variant's data folder as make_variant leaves it, with text only: v0 two actors, v1 one, v2 none."""
    unseen = root / "unseen"
    unseen.mkdir(parents=True)
    labels = {"v0.txt": "# header\n0 1 0 1 2 3 4\n0 2 1 5 6 7 8\n", "v1.txt": "0 1 0 1 2 3 4\n1 1 0 1 2 3 4\n"}
    for name, text in labels.items():
        (unseen / name).write_text(text)
    for name in ("v0.mp4", "v1.mp4", "v2.mp4"):
        (unseen / name).write_bytes(b"")
    (unseen / "classes.txt").write_text("wave\njump\n")
    (unseen / "action_challenge.csv").write_text("video_file,label_file\nv0.mp4,v0.txt\nv1.mp4,v1.txt\nv2.mp4,\n")
    return root


class FakeRunner:
    """Stands for main.py and test.py: writes best_model.pth or the metrics JSON; fails main.py for ``fail``."""

    def __init__(self, fail=()):
        self.calls, self.fail, self.mute = [], set(fail), False   # mute: test.py exits 0 and writes nothing

    def __call__(self, cmd, log, timeout):
        self.calls.append(cmd)
        log.write_text("fake child\n")
        flags = dict(zip(cmd, cmd[1:]))
        if cmd[1].endswith("main.py"):
            out = pathlib.Path(flags["--output_dir"])
            if out.parent.name in self.fail:
                return common.ChildRun(1, 3.0, 10.0, None)
            out.mkdir(parents=True, exist_ok=True)
            (out / "best_model.pth").write_bytes(b"weights")
            return common.ChildRun(0, 600.0, 10.0, None)
        out = pathlib.Path(flags["--output_file"])
        multi = out.stem == "multi_actor"
        if self.mute:
            return common.ChildRun(0, 30.0, 10.0, None)
        out.with_name(out.stem + "_metrics.json").write_text(json.dumps(
            {"frame_map50": 0.4 if multi else 0.6, "video_map20": 0.7, "video_map50": 0.3 if multi else 0.5,
             "frame_ap50": {"wave": 0.2, "jump": 0.8}}))
        return common.ChildRun(0, 30.0, 10.0, None)


@pytest.fixture
def fake_suite(tmp_path, monkeypatch):
    data = _fake_dataset(tmp_path / "data")
    monkeypatch.setattr(bench_suite, "ensure_data", lambda args, name: (data, "make the data"))
    argv = ["--work_dir", str(tmp_path / "work"), "--json", str(tmp_path / "out.json")]
    return lambda *more: bench_suite.main(bench_suite.get_args_parser().parse_args(argv + list(more)))


def _results(tmp_path):
    return {r["variant"]: r for r in json.loads((tmp_path / "out.json").read_text())["variants"]}


def test_finished_variant_is_reused_not_rerun(fake_suite, tmp_path, monkeypatch, capsys):
    runner = FakeRunner()
    monkeypatch.setattr(bench_suite, "run_logged", runner)
    assert fake_suite("--variants", "people_base", "--quick", "--main_args", "--epochs 2") == 0
    train, test, multi = runner.calls
    assert train[1].endswith("main.py") and train[-4:] == ["--decoder_steps", "60", "--epochs", "2"]
    assert " ".join(bench_suite.TESTER) in " ".join(train) and "--overwrite" in train
    work = tmp_path / "work" / "people_base"
    flags = dict(zip(test, test[1:]))
    assert flags["--score_threshold"] == "0.05" and flags["--labels"] == flags["--input_dir"] == str(tmp_path / "data"
                                                                                                     / "unseen")
    flags = dict(zip(multi, multi[1:]))   # only v0 has two actors; scored against the whole unseen set's labels
    assert flags["--input_dir"] == str(work / "multi_actor_videos") and flags["--labels"] == str(tmp_path / "data"
                                                                                                 / "unseen")
    assert sorted(p.name for p in (work / "multi_actor_videos").iterdir()) == ["action_challenge.csv", "classes.txt",
                                                                               "v0.mp4", "v0.txt"]
    row = _results(tmp_path)["people_base"]
    assert (row["frame_map50"], row["multi_frame_map50"], row["multi_videos"], row["note"]) == (0.6, 0.4, 1, "")
    assert row["train_min"] == 10.0 and row["test_min"] == 1.0 and row["worst_class"] == ["wave", 0.2]

    runner.calls.clear()
    assert fake_suite("--variants", "people_base", "--quick", "--main_args", "--epochs 2") == 0
    assert runner.calls == []   # everything there: reused, figures and minutes from the first run
    row = _results(tmp_path)["people_base"]
    assert row["note"] == "reused" and row["train_min"] == 10.0 and row["frame_map50"] == 0.6
    assert "(reused" in capsys.readouterr().out

    (work / "unseen_metrics.json").unlink()   # killed while testing: the training is kept, every later stage re-runs
    assert fake_suite("--variants", "people_base", "--quick", "--main_args", "--epochs 2") == 0
    assert [c[1].rsplit("/", 1)[1] for c in runner.calls] == ["test.py", "test.py"]
    assert _results(tmp_path)["people_base"]["note"] == "reused train"

    runner.calls.clear()   # another schedule in the same folder is refused, not mixed in
    assert fake_suite("--variants", "people_base", "--quick") == 1
    assert runner.calls == [] and "other settings" in _results(tmp_path)["people_base"]["note"]
    assert fake_suite("--variants", "people_base", "--quick", "--fresh") == 0 and len(runner.calls) == 3

    runner.mute = True   # a new training whose test writes no figures: the old unseen_metrics.json does not pass
    (work / "run" / "best_model.pth").unlink()
    assert fake_suite("--variants", "people_base", "--quick") == 1
    assert _results(tmp_path)["people_base"]["note"] == f"FAILED: test (no unseen_metrics.json), see {work / 'test.out'}"


def test_failed_variant_is_a_row_with_its_log_and_the_others_go_on(fake_suite, tmp_path, monkeypatch, capsys):
    runner = FakeRunner(fail={"small_actors"})
    monkeypatch.setattr(bench_suite, "run_logged", runner)
    assert fake_suite("--variants", "small_actors", "people_base") == 1
    assert len(runner.calls) == 1 + 3   # the failed training, then all of people_base
    rows = _results(tmp_path)
    log = tmp_path / "work" / "small_actors" / "train.out"
    assert rows["small_actors"]["status"] == "failed" and str(log) in rows["small_actors"]["note"]
    assert rows["people_base"]["status"] == "ok"
    out = capsys.readouterr().out
    assert "| small_actors | - | - |" in out and f"FAILED: train (exit code 1), see {log}" in out
    assert "| mean | 0.600 |" in out and "1 of 2 variants; without small_actors" in out
    assert "held out, not run" not in out   # none was asked for


def test_multi_actor_subset_of_a_tiny_generated_variant(tmp_path):
    v = dataclasses.replace(suite.SuiteVariant(), resolutions=((96, 72),), video_sec=(0.6, 0.6), action_sec=(0.5, 0.5),
                            negative_fraction=0.0, actors=(1, 2)).validate()
    stats = suite.make_variant("tiny", v, tmp_path, seed=SEED, num_videos=1, num_unseen=3)
    unseen = tmp_path / "tiny" / "unseen"
    picked = bench_suite.make_multi_actor_subset(unseen, tmp_path / "subset")
    tracks = {}   # read independently: distinct track ids of each video's label lines
    for row in (unseen / "action_challenge.csv").read_text().splitlines()[1:]:
        name, label = row.split(",")
        lines = (unseen / label).read_text().splitlines() if label else []
        tracks[name] = {ln.split()[1] for ln in lines if not ln.startswith("#")}
    assert picked == [n for n, t in tracks.items() if len(t) >= 2] and 0 < len(picked) < len(tracks)
    assert len(picked) == stats["unseen"]["multi_actor"]
    records, _, problems = load_dataset(tmp_path / "subset")   # classes.txt: all 5, the subset uses fewer
    assert all(p.kind == "class names" for p in problems) and [r.video for r in records] == picked and all(len(r.tracks) >= 2 for r in records)
    videos = clip_loader.list_videos(tmp_path / "subset")
    assert [p.name for p in videos] == picked and all(p.resolve().parent == unseen.resolve() for p in videos)


SEED = 3
