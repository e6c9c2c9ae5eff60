"""Output safety: no file is clobbered, a model and its data file are one unit, interrupts and
kills leave the previous output intact and nothing behind, and every way out is one line with a
documented exit code (0, 1, 2, 3, 130, 143)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import mlp, run, save, small_cnn
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.storage import io, writer

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxprune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if not line.startswith("onnxprune: warning")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def external(tmp_path: Path, name: str = "m.onnx", location: str | None = None) -> Path:
    path = tmp_path / name
    onnx.save(
        mlp(dims=(16, 64, 32, 8)),
        str(path),
        save_as_external_data=True,
        location=location or f"{name}.data",
        size_threshold=0,
    )
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(writer.TEMP_PREFIX)]


def zeros(path: Path) -> int:
    proto = onnx.load(str(path))  # external data loaded from the file the model names
    return sum(int((numpy_helper.to_array(t) == 0).sum()) for t in proto.graph.initializer)


# -- 1. no clobbering --------------------------------------------------------------------------


def test_input_data_file_named_like_the_output_data_is_never_written(tmp_path) -> None:
    src = external(tmp_path, location="out.onnx.data")
    before = snapshot(tmp_path)
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "out.onnx", "--external-data", "-q")
    assert result.exit_code == 0, result.output
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before  # the input and its data untouched
    assert zeros(src) == 0
    new = [p for p in io.model_files(tmp_path / "out.onnx")[1:]]
    assert [p.name for p in new] == ["out.onnx.2.data"]
    assert zeros(tmp_path / "out.onnx") > 0


@pytest.mark.parametrize("force", [False, True])
def test_output_is_an_input_data_file(tmp_path, force) -> None:
    src = external(tmp_path, location="m.bin")
    before = snapshot(tmp_path)
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "m.bin", *(["--force"] * force))
    assert result.exit_code == 2
    assert "is a data file of the input model" in one_line(result.stderr)
    assert snapshot(tmp_path) == before


def test_input_named_like_the_output_data_file(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "out.onnx.data")
    before = src.read_bytes()
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "out.onnx", "--external-data", "-q")
    assert result.exit_code == 0, result.output
    assert src.read_bytes() == before
    assert [p.name for p in io.model_files(tmp_path / "out.onnx")[1:]] == ["out.onnx.2.data"]


def test_links_to_the_input_are_the_input(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    os.link(src, tmp_path / "hard.onnx")
    os.symlink(src, tmp_path / "soft.onnx")
    for name in ("hard.onnx", "soft.onnx"):
        result = invoke(src, "-s", "0.5", "-o", tmp_path / name, "--force")
        assert result.exit_code == 2 and "is the input model" in one_line(result.stderr)
    assert onnx.load(str(src)) == small_cnn()


def test_reports_never_overwrite_inputs_or_outputs(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((2, 3, 8, 8), np.float32))
    before = snapshot(tmp_path)
    cases = [
        (["--report", src], "is the input model"),
        (["--report", data, "--data", data], "is the --data file"),
        (["-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx"], "is also the output"),
        (["-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx.data"], "its data file"),
    ]
    for args, message in cases:
        result = invoke(src, "-s", "0.5", "--force", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in one_line(result.stderr)
    assert snapshot(tmp_path) == before
    sweep = invoke("sweep", src, "--sparsities", "0.5", "--markdown", src)
    assert sweep.exit_code == 2 and "is the input model" in one_line(sweep.stderr)
    assert snapshot(tmp_path) == before


def test_reports_need_force_to_replace(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    report.write_text("keep")
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx", "--report", report)
    assert result.exit_code == 2 and "--force" in one_line(result.stderr)
    assert report.read_text() == "keep" and not (tmp_path / "o.onnx").exists()
    for command in (
        ["inspect", src, "--report", report],
        ["sweep", src, "--sparsities", "0.5", "--report", report],
        ["validate", src, src, "--report", report],
    ):
        result = invoke(*command)
        assert result.exit_code == 2 and "--force" in one_line(result.stderr), command
        assert report.read_text() == "keep"
        assert invoke(*command, "--force").exit_code == 0
        assert report.read_text().startswith("{")
        report.write_text("keep")


def test_report_into_missing_folder_fails_before_any_work(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx", "--report", tmp_path / "no/r.json")
    assert result.exit_code == 2 and "does not exist" in one_line(result.stderr)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_a_file_created_while_the_run_worked_is_not_overwritten(tmp_path, monkeypatch) -> None:
    src = external(tmp_path)
    out = tmp_path / "o.onnx"

    def other_run_wins(step: str) -> None:
        if step == "committing":
            out.write_bytes(b"the other run's model")

    monkeypatch.setattr(io, "_fault", other_run_wins)
    result = invoke(src, "-s", "0.5", "-o", out)
    assert result.exit_code == 2
    assert "created while this run worked" in one_line(result.stderr)
    assert out.read_bytes() == b"the other run's model"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "o.onnx"]


def test_two_runs_race_for_one_output(tmp_path) -> None:
    """Two processes at once, no --force: one writes, the other is refused; never both exit 0."""
    src = external(tmp_path)
    out = tmp_path / "o.onnx"
    args = [sys.executable, "-m", "onnxprune", str(src), "-s", "0.5", "-o", str(out), "-q"]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(3)]
    codes = sorted(p.wait(timeout=120) for p in procs)
    errors = [p.stderr.read() for p in procs]
    assert codes[0] == 0 and all(c in (0, 2) for c in codes), errors
    assert codes.count(0) == 1 or all("already exists" not in e for e in errors)
    assert zeros(out) > 0
    assert not temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "o.onnx", "o.onnx.data"]


# -- 2. a model and its data file are one unit ------------------------------------------------


def _previous_output(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    src = external(tmp_path)
    out = tmp_path / "o.onnx"
    assert invoke(src, "-s", "0.5", "-o", out, "-q").exit_code == 0
    return src, out, snapshot(tmp_path)


@pytest.mark.parametrize("step", io.SAVE_STEPS)
def test_failure_at_every_step_of_a_save(tmp_path, monkeypatch, step) -> None:
    """An error at any step: the old model with its old data, or (after the rename) the new
    model with its new data; never a mix, never a temporary file left."""
    src, out, before = _previous_output(tmp_path)

    def fail(at: str) -> None:
        if at == step:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_fault", fail)
    result = invoke(src, "-s", "0.9", "-o", out, "--force", "-q")
    assert result.exit_code in (2, 3)
    assert "Traceback" not in result.stderr
    assert not temporaries(tmp_path)
    committed = io.SAVE_STEPS.index(step) >= io.SAVE_STEPS.index("committed")
    if not committed:
        assert snapshot(tmp_path) == before
    else:
        assert zeros(out) > zeros(tmp_path / "m.onnx") and run(out, {"x": np.ones((1, 16), "f")})


@pytest.mark.parametrize("step", io.SAVE_STEPS)
def test_kill_at_every_step_of_a_save(tmp_path, step) -> None:
    """SIGKILL (nothing can clean up): a reader still sees one whole model with its own data.
    The next run removes the killed run's temporary files and says so; a kill inside the commit
    also leaves one final file that nothing reads (the new data file before the model was in
    place, the replaced one after), which it names and never deletes (issue 20: a later run
    deletes only provable temporaries)."""
    src, out, before = _previous_output(tmp_path)
    old = zeros(out)
    killer = (
        "import os, signal, sys\n"
        "import onnxprune.storage.io as io\n"
        "def fault(at):\n"
        f"    if at == {step!r}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "io._fault = fault\n"
        "from onnxprune.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", killer, str(src), "-s", "0.9", "-o", str(out), "--force", "-q"],
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL
    now = zeros(out)  # loads whole, with the data file its header names
    assert now == old or now > old
    if io.SAVE_STEPS.index(step) < io.SAVE_STEPS.index("committed"):
        assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    again = cli(src, "-s", "0.9", "-o", out, "--force", "-q")
    assert again.returncode == 0, again.stderr
    assert not temporaries(tmp_path)
    names = sorted(os.listdir(tmp_path))
    data = [p.name for p in io.model_files(out)[1:]]
    left = sorted(set(names) - {"m.onnx", "m.onnx.data", "o.onnx", *data})
    assert len(left) == (step in ("data placed", "committing", "committed")), names
    for name in left:
        assert f"{tmp_path / name} was left by a run killed while it put {out}" in again.stderr
        assert (tmp_path / name).stat().st_size > 0
    if step not in ("cleaned",):
        assert "temporary file(s) an interrupted run left" in again.stderr


def test_stale_temporaries_of_live_runs_are_kept(tmp_path, caplog) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    host = writer._HOST
    dead = tmp_path / f"{writer.TEMP_PREFIX}{host}-999999999-ab.onnx{writer.TEMP_SUFFIX}"
    alive = tmp_path / f"{writer.TEMP_PREFIX}{host}-{os.getppid()}-cd.onnx{writer.TEMP_SUFFIX}"
    other_host = tmp_path / f"{writer.TEMP_PREFIX}00000000-999999999-ef.onnx{writer.TEMP_SUFFIX}"
    no_pid = tmp_path / f"{writer.TEMP_PREFIX}{host}-{'9' * 25}-aa.onnx{writer.TEMP_SUFFIX}"
    if host == "00000000":
        pytest.skip("this host's tag is the made-up one")
    for p in (dead, alive, other_host, no_pid):
        p.write_bytes(b"x")
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0
    assert not dead.exists() and alive.exists() and other_host.exists() and no_pid.exists()
    assert "removed 1 temporary file(s)" in caplog.text


# -- interrupts and signals -------------------------------------------------------------------


# Where a signal can land, in the order a run meets them: "start" is the launcher's first moment
# with its handlers in place (before the heavy imports), "loading" and "pruning" the work, then
# every step of the save. No test guesses how long a step takes: each child sends its signal to
# itself at the moment named, or says when it is ready (ONNXPRUNE_READY_FD) and waits for it.
MOMENTS = ("start", "loading", "pruning", *io.SAVE_STEPS)
HELD = ("data placed", "committing", "committed", "cleaned")  # inside a commit: signals wait

SIGNALLED = """
import os, signal, sys
moment, signum, ignored = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "ignored"
if ignored:  # as `nohup` and a shell's background job leave it
    signal.signal(signum, signal.SIG_IGN)
else:  # as a terminal leaves it, whatever this test run inherited (`make test &` ignores SIGINT)
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
def fire(*args, **kwargs):
    os.kill(os.getpid(), signum)
from onnxprune import launch
if moment == "start":
    launch._say_ready = fire
else:
    import onnxprune.storage.io as io, onnxprune.pipeline as pipeline
    def at(name, real):
        def wrapped(*args, **kwargs):
            fire()
            return real(*args, **kwargs)
        return wrapped
    if moment == "loading":
        io.load_model = at("loading", io.load_model)
    elif moment == "pruning":
        pipeline.ZeroWeightsPass = at("pruning", pipeline.ZeroWeightsPass)
    else:
        io._fault = lambda step: fire() if step == moment else None
sys.argv = ["onnxprune", *sys.argv[4:]]
launch.main()
"""


def signalled(
    moment: str, signum: int, *args: object, ignored: bool = False
) -> subprocess.CompletedProcess:
    """Run onnxprune through its launcher; it sends itself `signum` at `moment`."""
    command = [sys.executable, "-c", SIGNALLED, moment, str(int(signum))]
    command += ["ignored" if ignored else "handled", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


SIGNALS = [signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]


@pytest.mark.parametrize(
    ("moment", "signum"),
    [
        *itertools.product(MOMENTS, [signal.SIGINT, signal.SIGTERM]),
        *((m, s) for m in ("start", "pruning", "committing") for s in SIGNALS[2:]),
    ],
    ids=lambda v: signal.Signals(v).name if isinstance(v, int) else v,
)
def test_a_signal_at_every_moment_of_a_run(tmp_path, moment, signum) -> None:
    """Before the commit: one line, 128 + the signal, the previous output and its data as they
    were, nothing left. Inside the commit the signal waits for it to end: the new output whole,
    named in the line."""
    src, out, before = _previous_output(tmp_path)
    proc = signalled(moment, signum, src, "-s", "0.9", "-o", out, "--force", "-q")
    assert proc.returncode == 128 + signum, proc.stderr
    line = one_line(proc.stderr)
    name = "interrupted" if signum == signal.SIGINT else f"terminated ({signum.name})"
    assert line.startswith(f"onnxprune: {name}")
    assert not temporaries(tmp_path)
    if moment in HELD:
        assert line.endswith(f"{out} was written whole")
        assert zeros(out) > zeros(src) and len(io.model_files(out)) == 2
        assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith("m.")} == {
            k: v for k, v in before.items() if k.startswith("m.")
        }
    else:
        assert line.endswith("nothing was written")
        if moment == "start":
            assert "while starting" in line
        assert snapshot(tmp_path) == before


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("moment", ["start", "written", "committing"])
def test_an_ignored_hang_up_stays_ignored(tmp_path, moment) -> None:
    """`nohup onnxprune ... &`: SIGHUP was ignored when the process started, so a hang-up at
    any moment, inside a commit too, leaves the run going (it died with 129)."""
    src, out, before = _previous_output(tmp_path)
    proc = signalled(moment, signal.SIGHUP, src, "-s", "0.9", "-o", out, "--force", ignored=True)
    assert proc.returncode == 0, proc.stderr
    assert zeros(out) > zeros(src) and not temporaries(tmp_path)
    assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith("m.")} == {
        k: v for k, v in before.items() if k.startswith("m.")
    }


def as_from_a_terminal() -> None:
    """In the child before it runs: the signals as a terminal leaves them. A test run started in
    the background (`make test &`, some CI runners) ignores SIGINT, and an ignored signal stays
    ignored (nohup must keep working): without this, Ctrl-C tests would test nothing."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)


def started(command: list[str], **popen: object) -> subprocess.Popen:
    """Start a command and return once onnxprune's launcher says its handlers are in place."""
    read, write = os.pipe()
    env = {**os.environ, "ONNXPRUNE_READY_FD": str(write)}
    proc = subprocess.Popen(
        command,
        pass_fds=(write,),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
        **popen,
    )
    os.close(write)
    with os.fdopen(read) as ready:
        said = ready.readline()  # "" if the child closed it unsaid: then its stderr says why
    assert said == "ready\n", proc.communicate(timeout=60)
    return proc


def console_script() -> Path:
    command = Path(sys.executable).with_name("onnxprune")  # the console script users run
    if not command.is_file():
        pytest.skip("the onnxprune command is not installed beside this Python")
    return command


def test_interrupt_during_start_up(tmp_path) -> None:
    """Ctrl-C once the launcher is ready (it is importing ONNX Runtime then, for half a second):
    one line and 130; should the run win the race, the output is whole. A Ctrl-C inside
    CPython's own start-up, before onnxprune runs at all, is the interpreter's (README)."""
    src = save(small_cnn(), tmp_path / "m.onnx")
    before = src.read_bytes()
    out = tmp_path / "o.onnx"
    proc = started([console_script(), src, "-s", "0.5", "-o", out])
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode in (0, 130), stderr  # 0: the run finished before the signal came
    if proc.returncode == 130:
        assert one_line(stderr).startswith("onnxprune: interrupted")
        assert not out.exists()
    else:
        assert zeros(out) > 0
    assert src.read_bytes() == before and not temporaries(tmp_path)


@pytest.mark.skipif(shutil.which("nohup") is None, reason="no nohup command")
def test_nohup_outlives_the_hang_up(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    before = src.read_bytes()
    out = tmp_path / "o.onnx"
    proc = started(["nohup", console_script(), src, "-s", "0.5", "-o", out, "-q"], cwd=tmp_path)
    proc.send_signal(signal.SIGHUP)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, stderr
    assert zeros(out) > 0 and src.read_bytes() == before and not temporaries(tmp_path)


def test_handlers_keep_an_inherited_ignore() -> None:
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("POSIX signals")
    previous = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        writer.install_signal_handlers()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        with writer.signals_deferred():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing is raised after the block
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_interrupt_after_the_output_is_in_place_says_so(tmp_path, monkeypatch) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"

    def interrupt(step: str) -> None:
        if step == "cleaned":
            raise KeyboardInterrupt

    monkeypatch.setattr(io, "_fault", interrupt)
    result = invoke(src, "-s", "0.5", "-o", out)
    assert result.exit_code == 130
    assert one_line(result.stderr) == f"onnxprune: interrupted; {out} was written whole"
    assert out.is_file()


def test_signals_are_held_while_a_commit_runs() -> None:
    if sys.platform == "win32":
        pytest.skip("POSIX signals")
    with pytest.raises(writer.Terminated), writer.signals_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        done = True  # reached: the signal waited for the block to end
    assert done


# -- 3. exit codes ----------------------------------------------------------------------------


def test_internal_error_is_one_line_exit_3(tmp_path, monkeypatch) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    from onnxprune import pipeline

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "prune_weights", bug)
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 3
    line = one_line(result.stderr)
    assert line.startswith("onnxprune: internal error: ZeroDivisionError: a bug")
    assert "--debug" in line
    assert not (tmp_path / "o.onnx").exists() and not temporaries(tmp_path)
    debug = invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx", "--debug")
    assert debug.exit_code == 3 and "Traceback" in debug.stderr
    monkeypatch.setenv("ONNXPRUNE_DEBUG", "1")
    env = invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx")
    assert env.exit_code == 3 and "Traceback" in env.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["-s", "abc"],
        ["-s"],
        ["--device", "tpu"],
        ["--round-to", "0", "--structured"],
    ],
)
def test_usage_errors_are_one_line(tmp_path, args) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    result = invoke(src, *args)
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("onnxprune: error: ")


def test_help_and_version_exit_0() -> None:
    assert invoke("--help").exit_code == 0
    assert invoke("--version").exit_code == 0
    assert invoke("prune", "--help").exit_code == 0
    assert cli("--version").returncode == 0


# -- 4. paths ---------------------------------------------------------------------------------


def test_bad_paths_are_one_line(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    cases = [
        ([tmp_path, "-s", "0.5"], "not a file"),
        ([tmp_path / ("a" * 300), "-s", "0.5"], "cannot be read"),
        ([src, "-s", "0.5", "-o", tmp_path / ("b" * 300 + ".onnx")], "file name too long"),
        ([src, "-s", "0.5", "-o", tmp_path], "is a folder"),
        ([src, "-s", "0.5", "-o", str(tmp_path) + "/"], "not a file name"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in one_line(result.stderr), args
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_non_utf8_names(tmp_path) -> None:
    if sys.platform != "linux":
        pytest.skip("byte file names")
    src = save(small_cnn(), tmp_path / os.fsdecode(b"m\xff.onnx"))
    for extra in ([], ["--external-data"]):
        out = tmp_path / os.fsdecode(b"o\xfe.onnx")
        result = invoke(src, "-s", "0.5", "-o", out, "--force", "-q", *extra)
        assert result.exit_code == 0, result.output
        check = invoke("validate", src, out, "-q")
        assert check.exit_code == 0, check.output
        assert not temporaries(tmp_path)
    assert len(io.model_files(out)) == 2  # a data file with a name ONNX can store


def test_no_room_for_the_checker_skeleton(tmp_path, monkeypatch) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    real = onnx.save

    def full(proto, path, *args, **kwargs):
        if ".check" in str(path):
            raise OSError(28, "No space left on device")
        return real(proto, path, *args, **kwargs)

    monkeypatch.setattr(onnx, "save", full)
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "No space left" in one_line(result.stderr)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


# -- 6. layout --------------------------------------------------------------------------------


def test_external_layout_is_kept_when_every_weight_is_pruned(tmp_path) -> None:
    b = [numpy_helper.from_array(np.ones((64, 64), np.float32), f"w{i}") for i in range(2)]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h"]),
            helper.make_node("MatMul", ["h", "w1"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        b,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="m.onnx.data")
    out = tmp_path / "o.onnx"
    assert invoke(src, "-s", "0.99", "-o", out, "-q").exit_code == 0
    assert [p.name for p in io.model_files(out)[1:]] == ["o.onnx.data"]


def test_a_forged_claim_never_reaches_outside_its_folder(tmp_path) -> None:
    """A claim names files of its own folder only: one that names a path elsewhere is dropped
    without touching that path."""
    folder = tmp_path / "out"
    folder.mkdir()
    victim = tmp_path / "victim.data"
    victim.write_bytes(b"keep")
    src = save(small_cnn(), folder / "m.onnx")
    claim = folder / f"{writer.TEMP_PREFIX}{writer._HOST}-999999999-ab.claim{writer.TEMP_SUFFIX}"
    claim.write_text('{"model": "../x.onnx", "data": "../victim.data", "inode": [0, 0], '
                     '"replaced": []}')  # fmt: skip
    assert invoke(src, "-s", "0.5", "-o", folder / "o.onnx").exit_code == 0
    assert victim.read_bytes() == b"keep" and not claim.exists()


# -- issue 20: a later run deletes only its own temporaries -------------------------------------


def forged(folder: Path, kind: str, pid: int = 999999999) -> Path:
    """A name of onnxprune's own temporary pattern, this host, a pid that is not running."""
    return folder / f"{writer.TEMP_PREFIX}{writer._HOST}-{pid}-f0.{kind}{writer.TEMP_SUFFIX}"


def identity(path: Path) -> list[int]:
    st = os.lstat(path)
    return [st.st_dev, st.st_ino, st.st_size]


@pytest.fixture
def shared(tmp_path) -> tuple[Path, Path, Path, dict[str, bytes]]:
    """A shared output folder: the input with its data file, a previous output with its data
    file, a user's file, a symlink to a file in another folder; and that other folder."""
    folder, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    src = external(folder)
    out = folder / "o.onnx"
    assert invoke(src, "-s", "0.5", "-o", out, "-q").exit_code == 0
    (folder / "notes.txt").write_text("a colleague's notes")
    (elsewhere / "victim.data").write_bytes(b"somebody's data")
    os.symlink(elsewhere / "victim.data", folder / "link.data")
    os.symlink(elsewhere / "victim.data", folder / "o.onnx.5.data")  # named like a data file
    return src, out, elsewhere, {**snapshot(folder), **snapshot(elsewhere)}


TARGETS = [
    "m.onnx",
    "m.onnx.data",
    "o.onnx",
    "o.onnx.data",
    "notes.txt",
    "link.data",
    "o.onnx.5.data",
    "../elsewhere/victim.data",
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("when", ["before the model", "after the model"])
def test_a_forged_claim_deletes_nothing_it_names(shared, target, when, caplog) -> None:
    """A claim written by anyone, naming the input, the output, a user file, a symlink or a file
    in another folder, with their true device, inode and size (the strongest forgery): the run
    deletes none of them, says nothing about them, and removes only the claim itself."""
    src, out, elsewhere, before = shared
    folder = src.parent
    name = target
    true = identity(folder / target) if os.path.lexists(folder / target) else [0, 0, 0]
    record = {"model": out.name, "data": "", "replaced": []}
    if when == "before the model":  # the output is not the claimed model: its data file goes
        record.update(model_id=[0, 0], data=name, data_id=true)
    else:  # the output is the claimed model: the files it replaced go
        record.update(model_id=identity(out)[:2], replaced=[[name, *true]])
    claim = forged(folder, "claim")
    claim.write_text(json.dumps(record))
    result = invoke(src, "-s", "0.7", "-o", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    after = {**snapshot(folder), **snapshot(elsewhere)}
    for kept in ("m.onnx", "m.onnx.data", "notes.txt", "link.data", "o.onnx.5.data"):
        assert after[kept] == before[kept], kept
    assert after["victim.data"] == before["victim.data"]
    assert os.path.islink(folder / "link.data") and os.path.islink(folder / "o.onnx.5.data")
    assert zeros(out) > zeros(src) and not temporaries(folder)
    assert "was left by a run killed" not in caplog.text


@pytest.mark.parametrize(
    "content", ["[" * 60000 + "]" * 60000, "{" * 100000, "x" * (1 << 20), ""], ids=str.__len__
)
def test_a_claim_that_is_not_one_is_only_removed(shared, content) -> None:
    """A nesting bomb, a truncated record, a megabyte of junk, nothing: exit 0, the claim gone
    (a temporary of onnxprune's pattern, a dead run's), nothing else touched."""
    src, out, elsewhere, before = shared
    claim = forged(src.parent, "claim")
    claim.write_text(content)
    fifo = forged(src.parent, "data", pid=999999998)
    os.mkfifo(fifo)  # never opened: not a regular file
    result = invoke(src, "-s", "0.7", "-o", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert not claim.exists() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    after = {**snapshot(src.parent), **snapshot(elsewhere)}
    assert {k: after[k] for k in ("m.onnx", "m.onnx.data", "notes.txt", "victim.data")} == {
        k: before[k] for k in ("m.onnx", "m.onnx.data", "notes.txt", "victim.data")
    }


def test_forged_temporary_names_are_judged_by_what_they_are(shared) -> None:
    """Named like onnxprune's temporaries of a dead run: a symlink (to a user file) is left
    alone, a hard link to the input is left alone (the input is never touched), a hard link to a
    user file loses only that name; the user's file and the input keep every byte."""
    src, out, _, before = shared
    folder = src.parent
    symlink, to_input, to_user = forged(folder, "onnx"), forged(folder, "data"), forged(folder, "x")
    os.symlink(folder / "notes.txt", symlink)
    os.link(src, to_input)  # (a second name of its data file would make the input refused)
    os.link(folder / "notes.txt", to_user)
    result = invoke(src, "-s", "0.7", "-o", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert os.path.islink(symlink) and to_input.exists() and not to_user.exists()
    after = snapshot(folder)
    for kept in ("m.onnx", "m.onnx.data", "notes.txt"):
        assert after[kept] == before[kept]


def test_an_input_named_like_a_temporary_is_never_removed(tmp_path) -> None:
    src = forged(tmp_path, "onnx")
    onnx.save(small_cnn(), str(src))
    before = src.read_bytes()
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert src.read_bytes() == before and zeros(tmp_path / "o.onnx") > 0
    assert sorted(os.listdir(tmp_path)) == sorted([src.name, "o.onnx"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_another_users_temporary_is_left_alone(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    theirs = forged(tmp_path, "onnx")
    theirs.write_bytes(b"another user's run")
    os.chown(theirs, 65534, 65534)
    assert invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx", "-q").exit_code == 0
    assert theirs.read_bytes() == b"another user's run"


# -- issue 20: a failed run leaves what was there -----------------------------------------------


RACER = """
import sys
from contextlib import contextmanager
from onnxprune.storage import io, writer
role = sys.argv[1]
def say(word):
    print(word, flush=True)
if role == "holder":  # pauses inside its commit, holding the folder's lock
    def fault(step):
        if step == "data placed":
            say("paused")
            sys.stdin.readline()
    io._fault = fault
else:  # says when it is about to take the lock
    real = writer.folder_lock
    @contextmanager
    def announced(folder):
        say("locking")
        with real(folder):
            yield
    writer.folder_lock = announced
from onnxprune.cli import main
main(sys.argv[2:])
"""


def test_two_forced_runs_onto_one_output_leave_one_data_file(tmp_path) -> None:
    """Both read the output before either replaced it, and the earlier run's data file stayed
    behind. Now they take turns: one commits while the other waits at the folder's lock, then
    the second replaces the first's model and its data file with it."""
    src, out, _ = _previous_output(tmp_path)
    args = [src, "-s", "0.9", "-o", out, "--force", "--external-data", "-q"]

    def start(role: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", RACER, role, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    holder = start("holder")
    assert holder.stdout.readline() == "paused\n", holder.communicate()
    waiter = start("waiter")
    assert waiter.stdout.readline() == "locking\n", waiter.communicate()
    holder.stdin.write("go\n")
    holder.stdin.flush()
    for proc in (holder, waiter):
        stderr = proc.communicate(timeout=120)[1]
        assert proc.returncode == 0, stderr
    data = [p.name for p in io.model_files(out)[1:]]
    assert len(data) == 1 and zeros(out) > zeros(src)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", "m.onnx.data", "o.onnx", *data])


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_commit_holds_its_folder_against_other_processes(tmp_path) -> None:
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n"
        "    sys.exit(1)\n"
    )
    command = [sys.executable, "-c", probe, str(tmp_path)]
    with writer.folder_lock(tmp_path):
        assert subprocess.run(command, timeout=60).returncode == 1
    assert subprocess.run(command, timeout=60).returncode == 0


def test_three_forced_runs_at_once_leave_one_model_and_its_data(tmp_path) -> None:
    src, out, _ = _previous_output(tmp_path)
    args = [sys.executable, "-m", "onnxprune", src, "-s", "0.9", "-o", out, "--force", "-q"]
    args = [*map(str, args), "--external-data"]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    data = [p.name for p in io.model_files(out)[1:]]
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", "m.onnx.data", "o.onnx", *data])


def full_disk_for(part: str):
    """`writer.sync` failing with ENOSPC for temporary files of one kind (`part`: reports and
    tables; the model's are `onnx` and `data`)."""
    real = writer.sync

    def sync(path: Path) -> None:
        if f".{part}{writer.TEMP_SUFFIX}" in path.name:
            raise OSError(28, "No space left on device")
        real(path)

    return sync


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "force-over-previous"])
def test_a_report_the_disk_has_no_room_for_leaves_no_model(tmp_path, monkeypatch, previous):
    """The report is written before anything is put in place: no room for it, and the folder is
    as it was (with --force, the previous output, its data file and report too); the rerun
    does not find an output "already exists"."""
    src = external(tmp_path)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    force = ["--force"] if previous else []
    if previous:
        assert invoke(src, "-s", "0.5", "-o", out, "--report", report, "-q").exit_code == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(writer, "sync", full_disk_for("part"))
    result = invoke(src, "-s", "0.9", "-o", out, "--report", report, "-q", *force)
    assert result.exit_code == 2
    assert "No space left on device" in one_line(result.stderr)
    assert snapshot(tmp_path) == before and not temporaries(tmp_path)
    monkeypatch.undo()
    again = invoke(src, "-s", "0.9", "-o", out, "--report", report, "-q", *force)
    assert again.exit_code == 0, again.output
    assert json.loads(report.read_text())["output"] == str(out) and zeros(out) > 0


def test_a_model_refused_at_its_commit_takes_the_report_back(tmp_path, monkeypatch) -> None:
    """The report goes in place first; the model, last, is refused (a file appeared at the
    output meanwhile): the report is taken back, and the file that appeared is not touched."""
    src = external(tmp_path)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"

    def other_run_wins(step: str) -> None:
        if step == "committing":
            out.write_bytes(b"the other run's model")

    monkeypatch.setattr(io, "_fault", other_run_wins)
    result = invoke(src, "-s", "0.5", "-o", out, "--report", report)
    assert result.exit_code == 2 and "created while this run worked" in one_line(result.stderr)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "o.onnx"]
    assert out.read_bytes() == b"the other run's model"


def test_a_forced_report_taken_back_restores_the_previous_one(tmp_path, monkeypatch) -> None:
    src = external(tmp_path)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    report.write_text("the previous report")

    def refused(step: str) -> None:
        if step == "committing":
            raise OSError(13, "Permission denied")

    monkeypatch.setattr(io, "_fault", refused)
    result = invoke(src, "-s", "0.5", "-o", out, "--report", report, "--force")
    assert result.exit_code in (2, 3) and "Traceback" not in result.stderr
    assert report.read_text() == "the previous report"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "r.json"]


def test_sweep_outputs_all_or_none(tmp_path, monkeypatch) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    markdown, report = tmp_path / "t.md", tmp_path / "r.json"
    real = writer.sync

    def no_room_for_the_second(path: Path) -> None:
        if path.name.endswith(f".part{writer.TEMP_SUFFIX}") and no_room_for_the_second.seen:
            raise OSError(28, "No space left on device")
        no_room_for_the_second.seen += path.name.endswith(f".part{writer.TEMP_SUFFIX}")
        real(path)

    no_room_for_the_second.seen = 0
    monkeypatch.setattr(writer, "sync", no_room_for_the_second)
    args = ["sweep", src, "--sparsities", "0.5", "--device", "cpu"]
    args += ["--markdown", markdown, "--report", report]
    result = invoke(*args)
    # (the sweep's notes on its generated inputs come first)
    assert result.exit_code == 2 and "No space left" in result.stderr.splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
