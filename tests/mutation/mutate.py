"""Mutation testing of the safety core: would the tests notice a plausible bug?

Runs the curated mutants of ``tests/mutation/mutants/*.toml`` (README.md in this folder: the
format, and why a curated set rather than a generating tool), one at a time, each against the
tests that should kill it, in a private copy of the tree (the developer's files are never
touched), and writes a report (``tests/mutation/results/latest.md`` by default)::

    python tests/mutation/mutate.py                 # every mutant (``make mutate``)
    python tests/mutation/mutate.py --check         # only: is every mutant's snippet still there?
    python tests/mutation/mutate.py --only 'fence-*' --only session-revoke-before-own-expiry -j 2

Per mutant: the exact ``original`` snippet must occur once in ``file`` (otherwise the mutant
is *stale*: re-anchor it to the current code); it is replaced, the file must still compile
(otherwise *invalid*), then ``pytest -x`` runs the mutant's ``tests`` (a skipped system test
counts as failed: ``VIRTLEASE_REQUIRE_SYSTEM_TESTS=1``).  A test failure *kills* the mutant
(a pytest-timeout or the run's own timeout: *timeout*, counted as killed) once that test failed
the same way when run again, and passes on the unmutated tree (else *error*: the test is broken,
not the mutant caught); a test that fails only once is named and set aside, the rest run again.
A mutant that survives its own tests runs the wide suite of its file (``[suites]``) before it
counts as *survived*.  Mutants marked ``equivalent`` (with the reason) are not run.
Score: (killed + timeout) / (killed + timeout + survived).

Exit status: 0 when no mutant survived and none is stale, invalid or in error; 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CATALOGUE = HERE / "mutants"
REPORT = HERE / "results" / "latest.md"

STATUSES = ("killed", "timeout", "survived", "equivalent", "stale", "invalid", "error")
PYTEST_SELECT = ["-m", "not safety", "-k", "not container"]
"""Never the long nemesis run, never the container twin of a test (the same code again)."""


@dataclass(frozen=True)
class Mutant:
    """One hand-made bug: ``original`` (exact, once in ``file``) becomes ``replacement``."""

    id: str
    file: str
    original: str
    replacement: str
    why: str
    tests: tuple[str, ...]
    group: str = ""
    equivalent: str = ""
    """Why no test can tell it from the original (then it is not run)."""


@dataclass
class Result:
    mutant: Mutant
    status: str
    seconds: float = 0.0
    killer: str = ""
    """The first failing test, or what went wrong (stale, invalid, error)."""
    detail: str = ""
    wide: bool = False
    """The wide suite of the file ran too (the mutant survived its own tests)."""


@dataclass
class Catalogue:
    mutants: list[Mutant] = field(default_factory=list)
    suites: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Source file -> its wide test suite."""


class CatalogueError(Exception):
    """A mutant file that cannot be used (named with the file and the mutant)."""


def load_catalogue(folder: Path = CATALOGUE) -> Catalogue:
    """Every ``*.toml`` in ``folder``: ``[suites]`` (file -> tests) and ``[[mutant]]`` entries."""
    cat = Catalogue()
    seen: dict[str, Path] = {}
    for path in sorted(folder.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise CatalogueError(f"{path}: {exc}") from None
        for file, tests in data.get("suites", {}).items():
            cat.suites[file] = tuple(tests)
        for raw in data.get("mutant", []):
            where = f"{path.name}: mutant {raw.get('id', '?')!r}"
            missing = [k for k in ("id", "file", "original", "replacement", "why", "tests") if k not in raw]
            if missing:
                raise CatalogueError(f"{where}: missing {', '.join(missing)}")
            unknown = set(raw) - {"id", "file", "original", "replacement", "why", "tests", "group", "equivalent"}
            if unknown:
                raise CatalogueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
            if raw["id"] in seen:
                raise CatalogueError(f"{where}: id already used in {seen[raw['id']].name}")
            if raw["original"] == raw["replacement"]:
                raise CatalogueError(f"{where}: the replacement is the original")
            seen[raw["id"]] = path
            cat.mutants.append(Mutant(raw["id"], raw["file"], raw["original"], raw["replacement"],
                                      " ".join(raw["why"].split()), tuple(raw["tests"]), raw.get("group", ""),
                                      " ".join(raw.get("equivalent", "").split())))
    return cat


def anchor(text: str, mutant: Mutant) -> str | None:
    """Why ``mutant`` cannot be applied to ``text`` (None: its snippet occurs exactly once)."""
    count = text.count(mutant.original)
    if count == 0:
        return f"snippet not found in {mutant.file}"
    if count > 1:
        return f"snippet occurs {count} times in {mutant.file}; extend it to one place"
    return None


def mutated(text: str, mutant: Mutant) -> str:
    return text.replace(mutant.original, mutant.replacement, 1)


# -- the private tree ------------------------------------------------------------------------


def copy_tree(repo: Path, dest: Path) -> Path:
    """Copy the files git knows (tracked and untracked-not-ignored) of ``repo`` into ``dest``."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
                         check=True, capture_output=True).stdout
    for name in filter(None, out.decode().split("\0")):
        src = repo / name
        if not src.is_file():  # deleted in the work tree but still in the index
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


class Tree:
    """One private copy of the repository that mutants are applied to, one at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pycache = root.parent / f"{root.name}-pycache"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(self.root / p) for p in ("src", "backends", "lab")]
        env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONPYCACHEPREFIX"] = str(self.pycache)
        env["VIRTLEASE_REQUIRE_SYSTEM_TESTS"] = "1"  # a skipped test proves nothing: it must fail
        env.pop("PYTEST_ADDOPTS", None)
        return env

    def fresh_cache(self) -> None:
        """A mutant and its restore may have the same size and mtime second: never reuse bytecode."""
        shutil.rmtree(self.pycache, ignore_errors=True)


@dataclass
class Run:
    returncode: int | None
    """None: the run's own timeout stopped it."""
    output: str
    seconds: float


STOP = threading.Event()
"""Set on Ctrl-C: running pytest processes are stopped, no further mutant starts."""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (by /proc parent links), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a pytest run and everything it started: SIGINT (its teardown runs), then SIGTERM,
    then SIGKILL to its process group, and SIGKILL to any process of it left in another group
    (an etcd member, a guard: they start sessions of their own)."""
    kids = descendants(proc.pid)
    for sig, grace in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            kids = sorted(set(kids) | set(descendants(proc.pid)))
    for pid in kids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def pytest(tree: Tree, tests: Sequence[str], *, timeout: float, test_timeout: float, log: Path,
           deselect: Sequence[str] = ()) -> Run:
    """``pytest -x`` over ``tests`` in ``tree`` (without the ``deselect`` test ids), stopped
    (:func:`stop`) after ``timeout`` seconds or on Ctrl-C."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *PYTEST_SELECT,
           f"--timeout={test_timeout:g}", *(f"--deselect={t}" for t in deselect), *tests]
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tree.root, env=tree.env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        code: int | None = None
        while code is None and not STOP.is_set() and time.monotonic() - started < timeout:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(0.5)
        if code is None:
            stop(proc)
    return Run(code, log.read_text(errors="replace"), time.monotonic() - started)


FAILED = re.compile(r"^(?:FAILED|ERROR) (tests/\S+?\.py\S*(?: [^-].*?)?)(?: - (.*))?$", re.MULTILINE)
"""A failure in pytest's short summary (the captured log's ``ERROR    logger:...`` lines are not)."""


def first_failure(output: str) -> tuple[str, str]:
    """The first failing test id and its message from pytest's short summary."""
    summary = output.rsplit("short test summary info", 1)[-1]
    m = FAILED.search(summary)
    if m is None:
        tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        return "", tail[0][:200]
    return m.group(1).strip(), (m.group(2) or "")[:200]


def failure_kind(message: str) -> str:
    """The exception class of a short-summary message (``AssertionError``, ``Failed``, ...)."""
    return message.split(":", 1)[0].strip()


# -- running mutants --------------------------------------------------------------------------


class Runner:
    def __init__(self, cat: Catalogue, *, timeout: float, test_timeout: float, verify: bool, wide: bool,
                 logs: Path, progress: bool = True, wide_only: bool = False) -> None:
        """``wide_only``: every mutant runs its file's wide suite only (the files of it that
        exist), not its own tests: what a suite catches without the tests written for a mutant."""
        self.cat = cat
        self.timeout = timeout
        self.test_timeout = test_timeout
        self.verify = verify
        self.wide = wide
        self.wide_only = wide_only
        self.logs = logs
        self.progress = progress
        self._lock = threading.Lock()
        self._verified: dict[str, bool] = {}
        self._done = 0
        self._total = 0
        self._started = time.monotonic()

    def say(self, msg: str) -> None:
        if self.progress:
            with self._lock:
                print(msg, flush=True)

    def run_all(self, mutants: Sequence[Mutant], trees: Sequence[Tree]) -> list[Result]:
        self._total = len(mutants)
        free: list[Tree] = list(trees)
        results: dict[str, Result] = {}
        cond = threading.Condition()

        def one(m: Mutant) -> None:
            if STOP.is_set():
                return
            with cond:
                cond.wait_for(lambda: bool(free))
                tree = free.pop()
            try:
                r = self.run_one(m, tree)
            except Exception as exc:  # the runner's own failure: reported, never hides a mutant
                r = Result(m, "error", killer="runner", detail=f"{type(exc).__name__}: {exc}")
            finally:
                with cond:
                    free.append(tree)
                    cond.notify()
            if STOP.is_set():
                return  # interrupted: not a result
            results[m.id] = r
            with self._lock:
                self._done += 1
                done = self._done
            elapsed = time.monotonic() - self._started
            self.say(f"[{done}/{self._total} {elapsed / 60:5.1f} min] {r.status:<10} {m.id:<44} "
                     f"{r.seconds:6.1f}s {r.killer}")

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(trees))
        try:
            futures = [pool.submit(one, m) for m in mutants]
            for f in futures:
                f.result()
        except KeyboardInterrupt:
            STOP.set()
            self.say("interrupted: stopping the running tests, restoring the private tree")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [results[m.id] for m in mutants if m.id in results]

    def run_one(self, m: Mutant, tree: Tree) -> Result:
        path = tree.root / m.file
        if not path.is_file():
            return Result(m, "stale", killer=f"{m.file} does not exist")
        original = path.read_text()
        problem = anchor(original, m)
        if problem is not None:
            return Result(m, "stale", killer=problem)
        if m.equivalent:
            return Result(m, "equivalent", detail=m.equivalent)
        text = mutated(original, m)
        try:
            compile(text, str(path), "exec")
        except SyntaxError as exc:
            return Result(m, "invalid", killer=f"does not compile: {exc}")
        started = time.monotonic()
        path.write_text(text)
        tree.fresh_cache()
        try:
            wide = self.cat.suites.get(m.file, ())
            if self.wide_only:
                wide = tuple(t for t in wide if (tree.root / t.split("::")[0]).exists())
                result = self._confirmed(m, tree, wide, wide=True)
            else:
                result = self._confirmed(m, tree, m.tests, wide=False)
            wider_too = self.wide and not self.wide_only and wide and set(wide) != set(m.tests)
            if result.status == "survived" and wider_too:
                wider = self._confirmed(m, tree, wide, wide=True)
                wider.detail = "; ".join(filter(None, [result.detail, wider.detail]))
                result = wider
        finally:
            path.write_text(original)
            tree.fresh_cache()
        result.seconds = time.monotonic() - started
        if result.status == "killed" and self.verify and result.killer:
            if not self._passes_unmutated(result.killer, tree):
                return Result(m, "error", result.seconds, killer=result.killer,
                              detail="the killing test fails on the unmutated tree too (broken or flaky)")
        return result

    def _confirmed(self, m: Mutant, tree: Tree, tests: Sequence[str], *, wide: bool) -> Result:
        """Run ``tests`` on the mutated tree; a test that kills the mutant must fail again when
        re-run alone (a test that fails only now and then under load is no proof): one that
        passes the second time, or fails another way, is set aside (named in the result) and the
        rest run again."""
        flaky: list[str] = []
        while True:
            result = self._test(m, tree, tests, wide=wide, deselect=flaky)
            if flaky:
                result.detail = "; ".join(filter(None, [result.detail, "failed once, not the same way again (not counted): "
                                                        + ", ".join(flaky)]))
            if result.status != "killed" or not result.killer or not self.verify or len(flaky) >= 3:
                return result
            log = self.logs / f"{m.id}-again-{len(flaky)}.log"
            again = pytest(tree, [result.killer], timeout=self.timeout, test_timeout=self.test_timeout, log=log)
            if again.returncode != 0 and failure_kind(first_failure(again.output)[1]) == failure_kind(result.detail):
                return result
            flaky.append(result.killer)  # passed, or failed another way: no proof either

    def _test(self, m: Mutant, tree: Tree, tests: Sequence[str], *, wide: bool,
              deselect: Sequence[str] = ()) -> Result:
        log = self.logs / f"{m.id}{'-wide' if wide else ''}{f'-{len(deselect)}' if deselect else ''}.log"
        run = pytest(tree, tests, timeout=self.timeout, test_timeout=self.test_timeout, log=log, deselect=deselect)
        if run.returncode is None:
            return Result(m, "timeout", killer=f"no result within {self.timeout:g}s", wide=wide)
        if run.returncode == 0:
            return Result(m, "survived", wide=wide)
        if run.returncode == 1:
            test, message = first_failure(run.output)
            status = "timeout" if "Timeout >" in message else "killed"
            return Result(m, status, killer=test, detail=message, wide=wide)
        return Result(m, "error", killer=f"pytest exit {run.returncode}", detail=first_failure(run.output)[1],
                      wide=wide)

    def _passes_unmutated(self, test: str, tree: Tree) -> bool:
        with self._lock:
            known = self._verified.get(test)
        if known is not None:
            return known
        log = self.logs / f"verify-{re.sub(r'[^A-Za-z0-9_.-]+', '_', test)[:120]}.log"
        run = pytest(tree, [test], timeout=self.timeout, test_timeout=self.test_timeout, log=log)
        ok = run.returncode == 0
        with self._lock:
            self._verified[test] = ok
        return ok


# -- the report ---------------------------------------------------------------------------------


def score(results: Iterable[Result]) -> tuple[int, int, float]:
    """(caught, counted, percent): caught = killed + timeout, counted = caught + survived."""
    rs = list(results)
    caught = sum(1 for r in rs if r.status in ("killed", "timeout"))
    counted = caught + sum(1 for r in rs if r.status == "survived")
    return caught, counted, (100.0 * caught / counted if counted else 100.0)


def module_of(file: str) -> str:
    parts = Path(file).with_suffix("").parts
    return "/".join(parts[-2:])


def report(results: Sequence[Result], *, seconds: float, commit: str, argv: Sequence[str],
           planned: int | None = None) -> str:
    caught, counted, pct = score(results)
    counts = {s: sum(1 for r in results if r.status == s) for s in STATUSES}
    lines = [
        "# Mutation run of the safety core",
        "",
        f"Tree: `{commit}`. Command: `python tests/mutation/mutate.py{''.join(' ' + a for a in argv)}`.",
        "",
        *([f"**Interrupted: {len(results)} of {planned} mutants ran.**", ""]
          if planned is not None and len(results) < planned else []),
        f"**Score: {caught}/{counted} non-equivalent mutants killed ({pct:.1f}%)** in {seconds / 60:.1f} min; "
        + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]) + ".",
        "",
        "| module | mutants | killed | timeout | survived | equivalent | stale/invalid/error | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_module: dict[str, list[Result]] = {}
    for r in results:
        by_module.setdefault(module_of(r.mutant.file), []).append(r)
    for mod in sorted(by_module):
        rs = by_module[mod]
        c = {s: sum(1 for r in rs if r.status == s) for s in STATUSES}
        _caught, n, p = score(rs)
        lines.append(f"| {mod} | {len(rs)} | {c['killed']} | {c['timeout']} | {c['survived']} | "
                     f"{c['equivalent']} | {c['stale'] + c['invalid'] + c['error']} | "
                     f"{f'{p:.0f}%' if n else '-'} |")

    def section(title: str, status: Sequence[str], text: str) -> None:
        rs = [r for r in results if r.status in status]
        if not rs:
            return
        lines.extend(["", f"## {title}", "", text, ""])
        for r in rs:
            extra = r.detail or r.killer
            lines.append(f"- `{r.mutant.id}` ({module_of(r.mutant.file)}): {r.mutant.why}"
                         + (f" -- {extra}" if extra else ""))

    section("Survivors", ("survived",), "Each is a bug no test notices yet (its own tests and its file's wide "
            "suite passed with it).")
    section("Stale, invalid, errors", ("stale", "invalid", "error"), "Not measured: re-anchor a stale mutant to "
            "the current code, fix an invalid one; an error names what went wrong.")
    section("Equivalent mutants", ("equivalent",), "Not run: no test can tell them from the original, for the "
            "reason given.")
    lines.extend(["", "## Every mutant", "", "| mutant | module | status | s | killed by |", "|---|---|---|---|---|"])
    for r in results:
        killer = r.killer.replace("|", "\\|") if r.status in ("killed", "timeout") else ""
        lines.append(f"| `{r.mutant.id}` | {module_of(r.mutant.file)} | {r.status}{' (wide)' if r.wide else ''} | "
                     f"{r.seconds:.0f} | {killer} |")
    return "\n".join(lines) + "\n"


# -- command line --------------------------------------------------------------------------------


def select(mutants: Sequence[Mutant], only: Sequence[str], files: Sequence[str]) -> list[Mutant]:
    out = [m for m in mutants if (not only or any(fnmatch.fnmatchcase(m.id, p) for p in only))
           and (not files or any(f in m.file for f in files))]
    return out


def head_commit() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[], metavar="ID", help="mutant id or glob (repeatable)")
    p.add_argument("--file", action="append", default=[], metavar="PART", help="only mutants of files containing PART")
    p.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once, each in its own copy (default 1)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds one pytest run may take (default 1200)")
    p.add_argument("--test-timeout", type=float, default=180.0, help="seconds one test may take (default 180)")
    p.add_argument("--no-verify", action="store_true", help="do not check that a killing test passes unmutated")
    p.add_argument("--wide-only", action="store_true", help="run each mutant against its file's wide suite only "
                   "(the files of it that exist), not its own tests")
    p.add_argument("--no-wide", action="store_true", help="a survivor of its own tests is not run against the "
                   "wide suite of its file")
    p.add_argument("--check", action="store_true", help="only report stale or invalid mutants; run no test")
    p.add_argument("--list", action="store_true", help="list the selected mutants and exit")
    p.add_argument("--out", type=Path, default=REPORT, help=f"report file (default {REPORT.relative_to(REPO)})")
    p.add_argument("--keep", action="store_true", help="keep the private tree and the logs (path printed)")
    args = p.parse_args(args_in)

    try:
        cat = load_catalogue()
    except CatalogueError as exc:
        print(f"mutate: {exc}", file=sys.stderr)
        return 2
    mutants = select(cat.mutants, args.only, args.file)
    if not mutants:
        print("mutate: no mutant selected", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id:<44} {m.file}{'  (equivalent)' if m.equivalent else ''}")
        return 0
    if args.check:
        bad = 0
        for m in mutants:
            path = REPO / m.file
            problem = anchor(path.read_text(), m) if path.is_file() else f"{m.file} does not exist"
            if problem is None:
                try:
                    compile(mutated(path.read_text(), m), str(path), "exec")
                except SyntaxError as exc:
                    problem = f"invalid: {exc}"
            if problem is not None:
                bad += 1
                print(f"{m.id}: {problem}")
        print(f"{len(mutants) - bad}/{len(mutants)} mutants apply to the current tree")
        return 1 if bad else 0

    def interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, interrupt)
    work = Path(tempfile.mkdtemp(prefix="virtlease-mutate-"))
    logs = work / "logs"
    logs.mkdir()
    started = time.monotonic()
    try:
        trees = []
        for i in range(max(1, args.jobs)):
            trees.append(Tree(copy_tree(REPO, work / f"tree{i}")))
        print(f"mutate: {len(mutants)} mutant(s), {len(trees)} private tree(s) under {work}", flush=True)
        runner = Runner(cat, timeout=args.timeout, test_timeout=args.test_timeout, verify=not args.no_verify,
                        wide=not args.no_wide, logs=logs, wide_only=args.wide_only)
        results = runner.run_all(mutants, trees)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - started
    text = report(results, seconds=seconds, commit=head_commit(), argv=args_in, planned=len(mutants))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    caught, counted, pct = score(results)
    print(f"\nmutate: {caught}/{counted} killed ({pct:.1f}%) in {seconds / 60:.1f} min; report: {args.out}"
          + (f"; logs: {logs}" if args.keep else ""))
    unkilled = [r for r in results if r.status in ("survived", "stale", "invalid", "error")]
    return 1 if unkilled or len(results) < len(mutants) else 0


if __name__ == "__main__":
    sys.exit(main())
