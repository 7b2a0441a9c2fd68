import json
import statistics

import pytest

from adamerge.results import (
    collect,
    main,
    read_metrics,
    render_regime,
    render_table,
    update_readme,
    write_metrics,
)


def test_write_read_and_table_mean_sd(tmp_path):
    write_metrics(tmp_path / "s0" / "ta", "TA", {"a": 0.5, "b": 0.75}, seed=0)
    write_metrics(tmp_path / "s1" / "ta", "TA", {"a": 0.7, "b": 0.85}, seed=1)
    write_metrics(tmp_path / "s0" / "zs", "Zero-shot", {"a": 0.1, "b": 0.2}, seed=0)
    rec = read_metrics(tmp_path / "s0" / "ta" / "metrics.json")
    assert rec["avg"] == pytest.approx(0.625)
    table = render_table(collect(tmp_path))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["method"] == ["a", "b", "Avg"]
    sd = statistics.stdev([50.0, 70.0])
    assert rows["TA"][0] == f"60.0 ± {sd:.1f}"
    assert rows["TA"][2] == f"{statistics.mean([62.5, 77.5]):.1f} ± {statistics.stdev([62.5, 77.5]):.1f}"
    assert rows["Zero-shot"] == ["10.0", "20.0", "15.0"]
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("| ")]
    assert names == ["Zero-shot", "TA"]  # known methods first, in the papers' order


def test_readme_markers_replaced_and_cli(tmp_path, capsys):
    write_metrics(tmp_path / "runs" / "x", "X", {"a": 1.0}, seed=0)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    main([str(tmp_path / "runs"), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and "| X | 100.0 | 100.0 |" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    no_markers = tmp_path / "R2.md"
    no_markers.write_text("nothing")
    with pytest.raises(ValueError, match="markers"):
        update_readme(no_markers, "t")
    assert no_markers.read_text() == "nothing"


def test_bad_records_are_named(tmp_path):
    with pytest.raises(ValueError, match="task 'a'"):
        write_metrics(tmp_path, "M", {"a": 93.0})
    assert not (tmp_path / "metrics.json").exists()
    with pytest.raises(ValueError, match="no per-task"):
        write_metrics(tmp_path, "M", {})
    bad = tmp_path / "b" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"method": "M"}))
    with pytest.raises(ValueError, match=r"metrics.json: missing field 'accuracy'"):
        collect(tmp_path)


def test_one_table_is_one_benchmark(tmp_path):
    write_metrics(tmp_path / "s0" / "ta", "TA", {"a": 0.5}, seed=0, benchmark="mini-default-aaaa")
    write_metrics(tmp_path / "old" / "ta", "TA", {"a": 0.9}, seed=0, benchmark="mini-default-bbbb")
    with pytest.raises(ValueError, match=r"2 benchmarks \(mini-default-aaaa, mini-default-bbbb\).*--benchmark"):
        render_table(collect(tmp_path))
    table = main([str(tmp_path), "--benchmark", "mini-default-aaaa"])
    assert "| TA | 50.0 | 50.0 |" in table


def test_regime_checks_from_seed_means(tmp_path):
    rows = {"Zero-shot": (0.60, 0.64), "Individual experts": (0.88, 0.88), "Task arithmetic (λ on val)": (0.75, 0.77),
            "AdaMerging (layer-wise)": (0.74, 0.77)}
    for method, avgs in rows.items():
        for seed, a in enumerate(avgs):
            write_metrics(tmp_path / f"s{seed}" / method[:5], method, {"a": a}, seed=seed)
    text = main([str(tmp_path)])
    # zs 62, experts 88, TA 76, AM 75.5: gap 26 ✔, TA +14 ✔, 12 below ✔, AdaMerging -0.5 ✘
    assert "✔ zero-shot 26.0 points below the experts" in text
    assert "✔ task arithmetic (λ on val) +14.0 over zero-shot" in text
    assert "✔ task arithmetic (λ on val) 12.0 below the experts" in text
    assert "✘ layer-wise AdaMerging -0.5 over task arithmetic" in text
    assert f"task arithmetic {100 * 14 / 26:.0f} %, layer-wise AdaMerging {100 * 13.5 / 26:.0f} %" in text
    assert render_regime(collect(tmp_path / "s0")[:1]) == ""  # no zero-shot/experts/TA rows: no checks


def test_a_users_own_run_beside_the_demos_records(tmp_path, capsys):
    """The demo's records plus a user's own run: a rerun of a seed counts once (the newest), and a run
    on another benchmark gets its own table instead of breaking the command."""
    import os

    write_metrics(tmp_path / "seed0" / "am", "AdaMerging (task-wise)", {"a": 0.5}, seed=0, benchmark="mini-default-aaaa")
    write_metrics(tmp_path / "seed1" / "am", "AdaMerging (task-wise)", {"a": 0.7}, seed=1, benchmark="mini-default-aaaa")
    mine = write_metrics(tmp_path / "adamerging_task" / "export", "AdaMerging (task-wise)", {"a": 0.9}, seed=0,
                         benchmark="mini-default-aaaa")
    os.utime(mine, (mine.stat().st_atime, mine.stat().st_mtime + 10))  # the user's run is the newer
    write_metrics(tmp_path / "tiny_run" / "export", "AdaMerging (task-wise)", {"a": 0.2}, seed=0,
                  benchmark="mini-tiny-bbbb")
    text = main([str(tmp_path)])
    sd = statistics.stdev([90.0, 70.0])
    assert f"| AdaMerging (task-wise) | 80.0 ± {sd:.1f} |" in text  # seeds 0 (the newer, 0.9) and 1; not 0.5
    assert "Benchmark mini-default-aaaa:" in text and "Benchmark mini-tiny-bbbb:" in text
    assert "| AdaMerging (task-wise) | 20.0 | 20.0 |" in text
    assert "seed0/am/metrics.json left out" in capsys.readouterr().err
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    with pytest.raises(ValueError, match=r"2 benchmarks .*pick it with --benchmark"):
        main([str(tmp_path), "--readme", str(readme)])
    main([str(tmp_path), "--readme", str(readme), "--benchmark", "mini-tiny-bbbb"])
    assert "| 20.0 |" in readme.read_text()
