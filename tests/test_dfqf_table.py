"""benchmarks.dfqf_table: rows over several seeds (mean ± sample std, every seed's value), rows kept from before
seeds were a column, runs that fail while the others finish. The train.dfqf runs are replaced by fake reports."""
import json
import statistics

import pytest

from benchmarks import dfqf_table
from train.dfqf_config import resolve


def report(seed: int, top1: float, fp: float = 88.47) -> dict:
    return {"seed": seed, "fp_top1": fp, "fakequant_top1": top1, "fakequant_top1_without_ema": top1 - 0.1,
            "teacher": "/d/teachers/resnet20_cifar10_jpeg.pt", "split": "test", "generator_steps": 300,
            "student_steps": 400, "student_ema_decay": 0.9659, "threads": 1, "wall_seconds": 600.0 + seed,
            "images_generated": 44800}


def shown(flags: list[str]) -> dict:
    c = resolve(flags)
    return {k: getattr(c, k) for k in dfqf_table.SHOWN}


def test_a_row_kept_from_before_seeds_becomes_its_seed():
    legacy = {**report(0, 87.43), "flags": "", "config": {**shown([]), "seed": 0}}
    row = dfqf_table.as_seeds(legacy)
    assert row["config"] == shown([]) and "seed" not in row["config"]
    assert list(row["seeds"]) == ["0"] and row["seeds"]["0"]["fakequant_top1"] == 87.43
    assert dfqf_table.as_seeds(row) is row  # already per seed


def test_summary_is_the_mean_and_sample_std_in_seed_order():
    row = {"flags": "", "config": shown([]),
           "seeds": {"10": report(10, 87.0), "2": report(2, 87.2), "0": report(0, 87.6)}}
    s = dfqf_table.summary(row)
    assert s["seeds"] == [0, 2, 10] and s["top1"] == [87.6, 87.2, 87.0]
    assert s["mean"] == pytest.approx(87.2667, abs=1e-4)
    assert s["std"] == pytest.approx(statistics.stdev([87.6, 87.2, 87.0]))
    assert s["wall"] == pytest.approx(604.0)
    p = s["mean"] / 100  # split "test" without `eval_images` in the report: its 10,000 images
    assert s["binomial"] == pytest.approx(100 * (p * (1 - p) / 10000) ** 0.5)
    small = dfqf_table.summary({**row, "seeds": {"0": {**report(0, 90.0), "eval_images": 932}}})
    assert small["binomial"] == pytest.approx(100 * (0.9 * 0.1 / 932) ** 0.5)  # 0.98 points
    assert dfqf_table.summary({**row, "seeds": {"0": report(0, 87.6)}})["std"] is None


def test_markdown_shows_mean_std_and_every_seed():
    rows = {"w4a4": {"flags": "", "config": shown([]), "seeds": {"0": report(0, 87.6), "1": report(1, 87.0)}},
            "w5a5": {"flags": "--wbits 5 --abits 5", "config": shown(["--wbits", "5", "--abits", "5"]),
                     "seeds": {"0": report(0, 87.75)}}}
    env = {"command": "python -m benchmarks.dfqf_table", "date": "today", "git_commit": "abc", "cpu": "cpu",
           "cores": 2, "torch": "2"}
    text = dfqf_table.markdown(rows, env, None)
    w4a4 = next(line for line in text.splitlines() if line.startswith("| w4a4 |"))
    assert "87.30 ± 0.42" in w4a4 and "87.60, 87.00 (0, 1)" in w4a4 and "| 1.17 |" in w4a4 and "| 0.33 |" in w4a4
    w5a5 = next(line for line in text.splitlines() if line.startswith("| w5a5 |"))
    assert "| 87.75 |" in w5a5 and "±" not in w5a5 and "87.75 (0)" in w5a5


def test_new_seeds_join_the_kept_ones_and_a_failed_run_is_said(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    legacy = {**report(0, 87.43), "flags": "", "config": {**shown([]), "seed": 0}}
    (results / "dfqf_table.json").write_text(json.dumps({"environment": {}, "rows": {"w4a4": legacy}}))
    monkeypatch.setattr(dfqf_table, "RESULTS", results)

    def fake_run(name, seed, data_dir, runs_dir, quiet=False):
        if seed == 2:
            raise dfqf_table.DFQFError("train.dfqf exited 1")
        return {**report(seed, 87.03 + seed / 10), "config": shown(dfqf_table.ROWS[name][2])}

    monkeypatch.setattr(dfqf_table, "run_row", fake_run)
    rc = dfqf_table.main(["--rows", "w4a4", "--seeds", "1,2", "--jobs", "2", "--data-dir", str(tmp_path),
                          "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2 and "1 of 2 runs failed" in capsys.readouterr().err
    row = json.loads((results / "dfqf_table.json").read_text())["rows"]["w4a4"]
    assert sorted(row["seeds"]) == ["0", "1"]
    assert row["seeds"]["1"]["fakequant_top1"] == pytest.approx(87.13) and "measured" in row["seeds"]["1"]
    assert "87.28 ± 0.21" in (results / "dfqf_table.md").read_text()


def test_run_folders_keep_seed_0_where_it_was():
    assert dfqf_table.run_folder(dfqf_table.Path("r"), "w4a4", 0).name == "w4a4"
    assert dfqf_table.run_folder(dfqf_table.Path("r"), "w4a4", 3).name == "w4a4-seed3"


def test_a_table_run_at_the_same_time_keeps_the_other_ones_results(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(dfqf_table, "RESULTS", results)
    w5a5 = ["--wbits", "5", "--abits", "5"]

    def fake_run(name, seed, data_dir, runs_dir, quiet=False):
        # meanwhile another invocation finishes a w5a5 run and writes the table
        with dfqf_table.saved_rows() as rows:
            rows["w5a5"] = {"flags": " ".join(w5a5), "config": shown(w5a5), "seeds": {"0": report(0, 87.75)}}
            dfqf_table.write(rows, {"command": "other", "date": "d", "git_commit": "c", "cpu": "x", "cores": 2,
                                    "torch": "2"})
        return {**report(seed, 87.4), "config": shown([])}

    monkeypatch.setattr(dfqf_table, "run_row", fake_run)
    assert dfqf_table.main(["--rows", "w4a4", "--seeds", "0", "--data-dir", str(tmp_path)]) == 0
    rows = json.loads((results / "dfqf_table.json").read_text())["rows"]
    assert set(rows) == {"w4a4", "w5a5"} and rows["w5a5"]["seeds"]["0"]["fakequant_top1"] == 87.75


def test_re_render_keeps_the_environment_and_every_seed(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    env = {"command": "python -m benchmarks.dfqf_table --rows w4a4", "date": "2026-12-04", "git_commit": "abc",
           "cpu": "cpu", "cores": 2, "torch": "2"}
    rows = {"w4a4": {"flags": "", "config": shown([]), "seeds": {"0": report(0, 87.6), "1": report(1, 87.0)}}}
    (results / "dfqf_table.json").write_text(json.dumps({"environment": env, "rows": rows}))
    monkeypatch.setattr(dfqf_table, "RESULTS", results)
    assert dfqf_table.main(["--rows", ""]) == 0
    saved = json.loads((results / "dfqf_table.json").read_text())
    assert saved["environment"] == env and sorted(saved["rows"]["w4a4"]["seeds"]) == ["0", "1"]
    assert "87.30 ± 0.42" in (results / "dfqf_table.md").read_text()


@pytest.mark.parametrize("quiet", [True, False])
def test_a_failing_train_dfqf_run_is_one_error(tmp_path, quiet):
    """A real train.dfqf that fails (no teacher in the data folder) becomes one DFQFError, its output in the run
    folder's log when quiet; no report is read."""
    with pytest.raises(dfqf_table.DFQFError, match="w4a4 seed 1: train.dfqf failed") as e:
        dfqf_table.run_row("w4a4", 1, tmp_path / "no-data", tmp_path / "runs", quiet=quiet)
    log = tmp_path / "runs" / "w4a4-seed1" / "dfqf_table.log"
    assert (", see " in str(e.value)) == quiet and log.exists() == quiet
    if quiet:
        assert "error" in log.read_text()
