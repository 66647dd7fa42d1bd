"""The mutation runner's own checks (fast; the mutation run itself is ``make mutate``): the
catalogue is usable, a missing snippet is reported stale, mutants are applied to a private copy
and never to the working tree, and a run tells killed from survived from stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mutation import mutate as mt

REPO = Path(__file__).resolve().parents[2]


def test_every_mutant_names_an_existing_file_and_existing_tests() -> None:
    cat = mt.load_catalogue()
    assert len(cat.mutants) >= 60
    for m in cat.mutants:
        assert (REPO / m.file).is_file(), f"{m.id}: {m.file} does not exist"
        assert m.tests, f"{m.id}: names no test"
        for t in m.tests:
            assert (REPO / t.split("::")[0]).is_file(), f"{m.id}: test file {t} does not exist"
    for file, suite in cat.suites.items():
        assert (REPO / file).is_file(), file
        for t in suite:
            assert (REPO / t).is_file(), f"suite of {file}: {t} does not exist"
    modules = {m.file for m in cat.mutants}
    assert all(f in cat.suites for f in modules), sorted(modules - set(cat.suites))


def test_every_mutant_anchors_exactly_once() -> None:
    """Code moved or rewritten leaves no mutant behind: each snippet is still in its file, once
    (a stale mutant tests nothing; re-anchor it on the code that now does what it broke)."""
    stale = {}
    for m in mt.load_catalogue().mutants:
        err = mt.anchor((REPO / m.file).read_text(), m)
        if err:
            stale[m.id] = err
    assert not stale, stale


def test_every_safety_core_module_has_several_mutants() -> None:
    cat = mt.load_catalogue()
    counts: dict[str, int] = {}
    for m in cat.mutants:
        counts[m.file] = counts.get(m.file, 0) + 1
    core = [f"backends/virtlease_etcd/{p}.py" for p in (
        "ops/plan", "ops/grants", "ops/handoff", "ops/markers", "ops/records", "ops/coverage",
        "session/writes", "session/hostsession", "session/fencing", "session/failure", "session/owners", "session/reattach",
        "session/guard", "agent/restart")]
    thin = {f: counts.get(f, 0) for f in core if counts.get(f, 0) < 3}
    assert not thin, f"modules with fewer than 3 mutants: {thin}"


def test_equivalent_mutants_say_why() -> None:
    for m in mt.load_catalogue().mutants:
        if m.equivalent:
            assert len(m.equivalent.split()) >= 8, f"{m.id}: an equivalent mutant needs its reason"


def test_a_snippet_must_occur_exactly_once() -> None:
    m = mt.Mutant("x", "f.py", "a = 1", "a = 2", "why", ("t",))
    assert mt.anchor("b = 0\na = 1\n", m) is None
    assert mt.mutated("b = 0\na = 1\n", m) == "b = 0\na = 2\n"
    assert "not found" in (mt.anchor("b = 0\n", m) or "")
    assert "2 times" in (mt.anchor("a = 1\na = 1\n", m) or "")


def test_a_bad_catalogue_is_named(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text('[[mutant]]\nid = "m"\nfile = "f.py"\noriginal = "a"\nreplacement = "b"\n'
                                     'tests = ["t"]\n')
    with pytest.raises(mt.CatalogueError, match=r"x\.toml: mutant 'm': missing why"):
        mt.load_catalogue(tmp_path)
    (tmp_path / "x.toml").write_text('[[mutant]]\nid = "m"\nfile = "f.py"\noriginal = "a"\nreplacement = "a"\n'
                                     'why = "w"\ntests = ["t"]\n')
    with pytest.raises(mt.CatalogueError, match="the replacement is the original"):
        mt.load_catalogue(tmp_path)


def test_pytest_summary_names_the_first_failure() -> None:
    out = ("....F\n=== short test summary info ===\n"
           "FAILED tests/test_a.py::test_b[process] - AssertionError: held twice\n"
           "FAILED tests/test_a.py::test_c - Failed: Timeout >180.0s\n")
    assert mt.first_failure(out) == ("tests/test_a.py::test_b[process]", "AssertionError: held twice")
    spaced = "FAILED tests/test_a.py::test_d[a case with spaces] - assert 1 == 2\n"
    assert mt.first_failure(spaced) == ("tests/test_a.py::test_d[a case with spaces]", "assert 1 == 2")
    assert mt.first_failure("ERROR tests/test_a.py::test_e\n") == ("tests/test_a.py::test_e", "")
    logged = ("ERROR    virtlease_etcd.session.hostsession:hostsession.py:269 host a: session lost\n"
              "=== short test summary info ===\nFAILED tests/test_f.py::test_g - assert 0\n")
    assert mt.first_failure(logged) == ("tests/test_f.py::test_g", "assert 0")


def _toy_repo(root: Path) -> Path:
    """A git repository with one module and two tests of it."""
    root.mkdir()
    (root / "src").mkdir()
    (root / "src" / "toy.py").write_text("def limit(n: int) -> bool:\n    return n <= 3\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_toy.py").write_text(
        "import toy\n\n\ndef test_limit() -> None:\n    assert toy.limit(3) and not toy.limit(4)\n")
    (root / "tests" / "test_weak.py").write_text("import toy\n\n\ndef test_small() -> None:\n    assert toy.limit(1)\n")
    (root / "tests" / "test_flaky.py").write_text(  # fails the first time it runs in a tree, then passes
        "from pathlib import Path\n\n\ndef test_sometimes() -> None:\n    seen = Path('flaky-seen')\n"
        "    if not seen.exists():\n        seen.write_text('')\n        raise AssertionError('unlucky')\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "."], check=True)
    return root


def test_a_run_applies_mutants_to_a_copy_and_tells_killed_survived_and_stale(tmp_path: Path) -> None:
    repo = _toy_repo(tmp_path / "repo")
    original = (repo / "src" / "toy.py").read_text()
    cat = mt.Catalogue(
        mutants=[mt.Mutant("off-by-one", "src/toy.py", "n <= 3", "n < 3", "boundary", ("tests/test_toy.py",)),
                 mt.Mutant("weakly-tested", "src/toy.py", "n <= 3", "n <= 4", "boundary", ("tests/test_weak.py",)),
                 mt.Mutant("moved-on", "src/toy.py", "n <= 30", "n <= 4", "gone", ("tests/test_toy.py",)),
                 mt.Mutant("unlucky", "src/toy.py", "n <= 3", "n <= 5", "boundary",
                           ("tests/test_flaky.py", "tests/test_weak.py"))],
        suites={"src/toy.py": ("tests/test_weak.py",)})
    tree = mt.Tree(mt.copy_tree(repo, tmp_path / "tree"))
    logs = tmp_path / "logs"
    logs.mkdir()
    runner = mt.Runner(cat, timeout=120, test_timeout=60, verify=True, wide=True, logs=logs, progress=False)
    results = {r.mutant.id: r for r in runner.run_all(cat.mutants, [tree])}
    assert results["off-by-one"].status == "killed"
    assert results["off-by-one"].killer == "tests/test_toy.py::test_limit"
    assert results["weakly-tested"].status == "survived"
    assert results["moved-on"].status == "stale" and "not found" in results["moved-on"].killer
    assert results["unlucky"].status == "survived"  # a failure that does not come again is no kill
    assert "failed once, not the same way again (not counted): tests/test_flaky.py::test_sometimes" in results["unlucky"].detail
    assert (repo / "src" / "toy.py").read_text() == original  # the developer's file untouched
    assert (tree.root / "src" / "toy.py").read_text() == original  # the copy restored
    text = mt.report(list(results.values()), seconds=12.0, commit="abc", argv=[])
    assert "**Score: 1/3 non-equivalent mutants killed (33.3%)**" in text
    assert "`weakly-tested`" in text.split("## Survivors")[1]


def test_the_command_lists_the_mutants() -> None:
    out = subprocess.run([sys.executable, str(REPO / "tests" / "mutation" / "mutate.py"), "--list"],
                         capture_output=True, text=True, check=True).stdout
    assert "fence-state-d-exited" in out
