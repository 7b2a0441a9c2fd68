"""mutation/run.py (scripts/mutation.sh's driver): its config files, scoring and the merge of a rerun's results,
on files written here (mutmut itself is not run: that is the slow, separate job)."""

import importlib.util
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_run", ROOT / "mutation" / "run.py")
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)

MODULE = "adamerge/merging/toy.py"


def _meta(tree: Path, codes: dict) -> Path:
    meta = tree / "mutants" / (MODULE + ".meta")
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes, "durations_by_key": {}}))
    return meta


def test_config_files_parse_and_a_reasonless_equivalent_is_refused(tmp_path):
    tests = tmp_path / "tests.txt"
    tests.write_text("# comment\n*: tests/test_pins_*.py\nadamerge/x.py: tests/a.py tests/b.py  # why\n")
    assert run.read_tests_map(tests) == {"*": ["tests/test_pins_*.py"], "adamerge/x.py": ["tests/a.py", "tests/b.py"]}
    eq = tmp_path / "equivalent.txt"
    eq.write_text("# c\nm__mutmut_1  same value\n\n")
    assert run.read_equivalent(eq) == {"m__mutmut_1": "same value"}
    eq.write_text("m__mutmut_2\n")
    with pytest.raises(SystemExit, match="m__mutmut_2 has no reason"):
        run.read_equivalent(eq)


def test_the_repositorys_lists_are_well_formed():
    equivalent = run.read_equivalent(ROOT / "mutation" / "equivalent.txt")
    assert equivalent and all(m.startswith("adamerge.") and "__mutmut_" in m for m in equivalent)
    for module in run.read_tests_map(ROOT / "mutation" / "tests.txt"):
        assert module == "*" or (ROOT / module).is_file(), module


def test_score_counts_timeouts_as_killed_and_leaves_equivalents_and_unchecked_out(tmp_path):
    _meta(tmp_path, {"a": 1, "b": 36, "c": 0, "d": 0, "e": 33, "f": None})
    r = run.collect(tmp_path, MODULE, {"d": "same", "b": "listed but killed"})
    assert (r["killed"], r["timeout"], r["survived"], r["equivalent"], r["not_checked"]) == (2, 1, 2, 1, 1)
    assert r["score"] == round(2 / (5 - 1), 4) and r["survivors"] == ["c", "e"]
    assert r["listed_equivalent_but_killed"] == ["b"]


def test_a_rerun_keeps_the_results_of_the_mutants_it_did_not_run(tmp_path):
    meta = _meta(tmp_path, {"a": 1, "b": 0, "c": 0})
    before = run.exit_codes(tmp_path, MODULE)
    meta.write_text(json.dumps({"exit_code_by_key": {"a": None, "b": 1, "c": 0}, "durations_by_key": {"b": 2.0}}))
    run.keep_earlier_results(tmp_path, MODULE, before)
    data = json.loads(meta.read_text())
    assert data["exit_code_by_key"] == {"a": 1, "b": 1, "c": 0} and data["durations_by_key"] == {"b": 2.0}


def test_shared_pins_join_only_the_modules_they_name(tmp_path):
    # The `*` files join a module only when they name it, so one module's stats run does not pay for every
    # pins file; a mapped or discovered file joins whatever it says.
    (tmp_path / "tests").mkdir()
    files = {
        "test_pins_a.py": "from adamerge.merging import (\n    registry,\n    ties,\n)\n",
        "test_pins_b.py": "from adamerge.merging import ties_stream  # not ties\nfrom adamerge.merging.ties_stream import x\n",
        "test_pins_c.py": "import adamerge.merging.ties as t\n",
        "test_other.py": "from adamerge.merging import ties\n",
        "test_mapped.py": "nothing named\n",
    }
    for name, text in files.items():
        (tmp_path / "tests" / name).write_text(text)
    shared = {"*": ["tests/test_pins_*.py"]}
    module = "adamerge/merging/ties.py"
    assert run.tests_for(module, shared, tmp_path) == [
        "tests/test_other.py", "tests/test_pins_a.py", "tests/test_pins_c.py"]
    mapped = {**shared, module: ["tests/test_mapped.py"]}
    assert run.tests_for(module, mapped, tmp_path) == ["tests/test_mapped.py", "tests/test_pins_a.py",
                                                      "tests/test_pins_c.py"]
    assert run.tests_for("adamerge/merging/ties_stream.py", shared, tmp_path) == ["tests/test_pins_b.py"]


def test_a_second_run_into_one_record_keeps_the_other_modules_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    monkeypatch.setattr(run, "_commit", lambda rev: "abc")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)

    def row(killed, survived):
        keys = ("mutants", "checked", "killed", "timeout", "survived", "no_tests", "other", "equivalent",
                "not_checked")
        r = dict.fromkeys(keys, 0) | {"killed": killed, "survived": survived}
        r["mutants"] = r["checked"] = killed + survived
        return r

    args = SimpleNamespace(rerun_survivors=True, label="L", rev=None, max_minutes=1, collect_only=False)
    run.write_record(args, {"m/a.py": row(8, 2)}, 0.0)
    out = run.write_record(args, {"m/b.py": row(3, 1)}, 0.0)
    assert out.name.endswith("_L_after.json")
    data = json.loads(out.read_text())
    assert sorted(data["modules"]) == ["m/a.py", "m/b.py"] and data["overall"]["killed"] == 11
    data = json.loads(run.write_record(args, {"m/a.py": row(10, 0)}, 0.0).read_text())
    assert data["modules"]["m/a.py"]["killed"] == 10 and data["overall"]["score"] == round(13 / 14, 4)


def test_a_records_statuses_map_back_to_codes_of_the_same_status():
    # --survivors-of puts a record's results back as mutmut exit codes; each must read back as the same status
    for status, code in run.STATUS_CODES.items():
        assert run.classify(code) == status


def test_survivors_of_reads_the_records_commit_and_refuses_a_changed_module(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, text=True)
    git("init", "-q")
    (repo / "pkg" / "m.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit = git("rev-parse", "--short=12", "HEAD").stdout.strip()
    record = tmp_path / "r.json"
    record.write_text(json.dumps({"rev": f"work tree on {commit}", "modules": {"pkg/m.py": {"mutants": 1}}}))
    monkeypatch.setattr(run, "ROOT", repo)
    found, rows = run.record_rows(record)
    assert found == commit and list(rows) == ["pkg/m.py"]
    assert run.unchanged_since("pkg/m.py", commit)
    (repo / "pkg" / "m.py").write_text("x = 2\n")  # an edit under way in the work tree: HEAD is what runs
    assert run.unchanged_since("pkg/m.py", commit)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two")  # its mutants would be others
    assert not run.unchanged_since("pkg/m.py", commit)
    assert not run.unchanged_since("pkg/absent.py", commit)
    record.write_text(json.dumps({"rev": "somewhere", "modules": {}}))
    with pytest.raises(SystemExit, match="no commit"):
        run.record_rows(record)


def test_overall_takes_each_modules_latest_record_and_todays_equivalents(tmp_path, monkeypatch):
    spec2 = importlib.util.spec_from_file_location("mutation_overall", ROOT / "mutation" / "overall.py")
    overall = importlib.util.module_from_spec(spec2)
    spec2.loader.exec_module(overall)

    def record(name, date, modules):
        (tmp_path / f"mutation_{name}.json").write_text(json.dumps({"date": date, "modules": modules}))

    first = {"m/a.py": {"mutants": 3, "status": {"a1": "killed", "a2": "survived", "a3": "survived"}},
             "m/b.py": {"mutants": 2, "status": {"b1": "killed", "b2": "no tests"}}}
    record("z_first", "2026-01-01T10:00:00", first)  # named after the rerun but written before it
    record("a_rerun", "2026-01-02T10:00:00", {"m/a.py": {"status": {"a1": "killed", "a2": "killed",
                                                                    "a3": "survived"}}})
    record("old", "2025-12-31T10:00:00", {"m/b.py": {"status": {"b1": "killed", "b2": "killed"}}})
    record("empty", "2026-01-03T10:00:00", {"m/b.py": {"mutants": 0, "status": {}}})  # a run stopped before mutmut
    latest = overall.latest_rows(tmp_path)
    assert {m: name for m, (name, _) in latest.items()} == {"m/a.py": "mutation_a_rerun.json",
                                                            "m/b.py": "mutation_z_first.json"}
    a = overall.rescore(latest["m/a.py"][1], {"a3": "why"})
    assert (a["killed"], a["equivalent"], a["survived"], a["score"]) == (2, 1, 0, 1.0)
    b = overall.rescore(latest["m/b.py"][1], {})
    assert (b["killed"], b["no_tests"], b["survivors"], b["score"]) == (1, 1, ["b2"], 0.5)
