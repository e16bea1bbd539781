"""Attacks on what bnfold writes (issue 12, part B): outputs that are inputs, failing disks, signals, ONNX pairs, races.

Every command-line attack checks the exit code, that stderr is one line (``error:`` for refusals, ``interrupted``
for signals) without a traceback, that no file is left behind (no hidden staging folder beside OUT) and that every
input is byte-identical afterwards (sha256). Tests that need root (a read-only bind mount, a small tmpfs) skip
without it; ``ulimit -f`` is set in the child's ``preexec_fn`` and needs no privilege.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torchvision

import bnfold
import bnfold.files as files_module
import bnfold.onnx as bo
from bnfold.errors import InvalidInputError, VerificationError
from bnfold.files import check_output_path, refuse_inputs, same_file, staged, staged_files, write_atomic
from conftest import calibrated_by_training
from helpers.onnx_cases import CASES, bn_count

SHAPE = ["--input-shape", "1,3,32,32"]


# ------------------------------------------------------------------------------------------------ helpers


def _environment() -> dict[str, str]:
    source = str(Path(bnfold.__file__).resolve().parents[1])  # the bnfold these tests imported, whatever the cwd
    path = os.pathsep.join([source, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    return {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def run_cli(*args: str, cwd: Path, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=cwd, capture_output=True, text=True,
                          env=_environment(), timeout=300, preexec_fn=preexec_fn)


def sha256(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def listing(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden ones included (a staging folder left behind shows here)."""
    return sorted(os.listdir(folder))


def assert_refused(result: subprocess.CompletedProcess[str], code: int, *expected: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return calibrated_by_training(torchvision.models.resnet18(), torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


def _external(model: onnx.ModelProto, path: Path, location: str) -> Path:
    """Save ``model`` to ``path`` with every tensor in the external data file ``location`` (relative to it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model moves the tensors of the model it is given into the data file
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only originals; each test copies what it needs into its own folder."""
    root = tmp_path_factory.mktemp("writes")
    model = _resnet18()
    made = {"r18.pth": root / "r18.pth", "conv.onnx": root / "conv.onnx"}
    torch.save(model.state_dict(), made["r18.pth"])
    onnx.save_model(CASES["conv2d_bias_groups"]().model, str(made["conv.onnx"]))
    return made


@pytest.fixture
def state_dict(sources: dict[str, Path], tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    return Path(shutil.copy(sources["r18.pth"], tmp_path / "m" / "r18.pth"))


def onnx_with_data(folder: Path, name: str = "model.onnx", location: str | None = None) -> list[Path]:
    """An ONNX file whose tensors live in an external data file (``<name>.data`` unless ``location``)."""
    folder.mkdir(parents=True, exist_ok=True)
    location = location or f"{name}.data"
    graph = _external(CASES["conv2d"]().model, folder / name, location)  # a weight of 1,152 bytes: stored outside
    return [graph, folder / location]


# ------------------------------------------------- 1. no output is ever a file the run reads, whatever --force says


def test_onnx_output_over_its_own_external_data_file_is_refused(tmp_path: Path) -> None:
    inputs = onnx_with_data(tmp_path / "m")
    before, names = sha256(inputs), listing(tmp_path / "m")
    result = run_cli("fold", "m/model.onnx", "-o", "m/model.onnx.data", "--force", cwd=tmp_path)
    assert_refused(result, 2, "m/model.onnx.data", "is the input file")
    assert sha256(inputs) == before and listing(tmp_path / "m") == names


def test_onnx_output_whose_data_file_is_the_inputs_data_is_refused(tmp_path: Path) -> None:
    # a.onnx keeps its tensors in b.onnx.data: writing b.onnx would write b.onnx.data too, over a.onnx's data
    inputs = onnx_with_data(tmp_path, "a.onnx", location="b.onnx.data")
    before = sha256(inputs)
    result = run_cli("fold", "a.onnx", "-o", "b.onnx", "--force", cwd=tmp_path)
    assert_refused(result, 2, "b.onnx.data", "is the input file")
    assert sha256(inputs) == before and listing(tmp_path) == ["a.onnx", "b.onnx.data"]


def test_onnx_library_save_refuses_the_files_it_was_read_from(tmp_path: Path) -> None:
    inputs = onnx_with_data(tmp_path, "a.onnx", location="b.onnx.data")
    before = sha256(inputs)
    result = bo.fold(tmp_path / "a.onnx")
    assert set(result.sources) == set(inputs) and result.external_data
    for target in ("b.onnx", "a.onnx", "b.onnx.data"):
        with pytest.raises(InvalidInputError, match="is the input file"):
            result.save(tmp_path / target, force=True)
    assert sha256(inputs) == before and listing(tmp_path) == ["a.onnx", "b.onnx.data"]


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_link_to_the_model_is_the_model(state_dict: Path, link: str) -> None:
    folder = state_dict.parent
    out = folder / "out.pth"
    (os.symlink if link == "symlink" else os.link)(state_dict, out)
    before, names = sha256([state_dict]), listing(folder)
    result = run_cli("fold", str(state_dict), "--arch", "resnet18", "-o", str(out), "--force", *SHAPE, cwd=folder)
    assert_refused(result, 2, "is the input file", "a link to it" if link == "symlink" else "out.pth")
    assert sha256([state_dict]) == before and listing(folder) == names


def test_weights_file_is_never_the_output(state_dict: Path) -> None:
    folder = state_dict.parent
    before = sha256([state_dict])
    result = run_cli("fold", "resnet18", "--weights", "r18.pth", "-o", "r18.pth", "--force", *SHAPE, cwd=folder)
    assert_refused(result, 2, "r18.pth", "is the input file")
    assert sha256([state_dict]) == before and listing(folder) == ["r18.pth"]


def test_bench_plot_never_replaces_the_model(state_dict: Path) -> None:
    folder = state_dict.parent
    before = sha256([state_dict])
    result = run_cli("bench", "r18.pth", "--arch", "resnet18", "--plot", "r18.pth", *SHAPE, "--repeats", "1", cwd=folder)
    assert_refused(result, 2, "r18.pth", "is the input file")
    assert sha256([state_dict]) == before and listing(folder) == ["r18.pth"]


def test_reproduce_report_never_lands_inside_its_data(tmp_path: Path) -> None:
    data = tmp_path / "imagenette"
    (data / "val" / "a").mkdir(parents=True)
    result = run_cli("reproduce", "--data", str(data), "--out", str(data / "val"), cwd=tmp_path)
    assert_refused(result, 2, "lies inside", str(data))
    assert listing(data / "val") == ["a"]


def test_same_file_by_path_symlink_and_inode(tmp_path: Path) -> None:
    original = tmp_path / "a.pth"
    original.write_bytes(b"weights")
    os.link(original, tmp_path / "hard.pth")
    os.symlink(original, tmp_path / "soft.pth")
    (tmp_path / "other.pth").write_bytes(b"weights")  # equal content, another file
    assert same_file(original, tmp_path / "hard.pth") and same_file(original, tmp_path / "soft.pth")
    assert same_file(original, tmp_path / "sub" / ".." / "a.pth")
    assert not same_file(original, tmp_path / "other.pth") and not same_file(original, tmp_path / "absent.pth")
    with pytest.raises(InvalidInputError, match="is the input file"):
        check_output_path(tmp_path / "x.onnx", [original], force=True, companions=[tmp_path / "hard.pth"])
    refuse_inputs([tmp_path / "other.pth"], [original])  # not an input: no error


# --------------------------------------------------------- 2. write failures are the environment: exit 2, not 3


@contextmanager
def mounted(*arguments: str) -> Iterator[None]:
    """Run ``mount ARGUMENTS`` (root only) and undo it afterwards; skip the test where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount")
    target = arguments[-1]
    done = subprocess.run(["mount", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", target], check=True)


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    folder.mkdir()
    with mounted("--bind", str(folder), str(folder)):
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield


def test_read_only_folder_is_exit_2_with_the_cause(state_dict: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    before = sha256([state_dict])
    with read_only(folder):
        result = run_cli("fold", str(state_dict), "--arch", "resnet18", "-o", str(folder / "out.pth"), *SHAPE, cwd=tmp_path)
        assert_refused(result, 2, str(folder / "out.pth"), "could not be written", "Read-only file system")
        assert listing(folder) == []
    assert sha256([state_dict]) == before


def test_full_disk_is_exit_2_and_leaves_nothing(state_dict: Path, tmp_path: Path) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    before = sha256([state_dict])
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)):
        result = run_cli("fold", str(state_dict), "--arch", "resnet18", "-o", str(folder / "out.pth"), *SHAPE, cwd=tmp_path)
        assert_refused(result, 2, str(folder / "out.pth"), "No space left on device", "free some space")
        assert listing(folder) == []
    assert sha256([state_dict]) == before


def _file_size_limit() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # 1 MB: the folded ResNet-18 is 45 MB


def test_file_size_limit_is_exit_2_and_leaves_nothing(state_dict: Path) -> None:
    folder = state_dict.parent
    before = sha256([state_dict])
    result = run_cli("fold", "r18.pth", "--arch", "resnet18", "-o", "out.pth", *SHAPE, cwd=folder, preexec_fn=_file_size_limit)
    assert_refused(result, 2, "out.pth could not be written (File too large)", "ulimit -f")
    assert sha256([state_dict]) == before and listing(folder) == ["r18.pth"]


def test_file_size_limit_on_an_onnx_pair_is_exit_2_and_leaves_nothing(tmp_path: Path) -> None:
    graph = CASES["conv2d_bias_groups"]().model
    big = onnx.helper.make_tensor("padding", onnx.TensorProto.FLOAT, [400_000], np.zeros(400_000, np.float32).tobytes(), raw=True)
    graph.graph.initializer.append(big)  # 1.6 MB of data, above the 1 MB limit: the data file cannot be written
    inputs = [_external(graph, tmp_path / "model.onnx", "model.onnx.data"), tmp_path / "model.onnx.data"]
    before = sha256(inputs)
    (tmp_path / "out").mkdir()
    result = run_cli("fold", "model.onnx", "-o", "out/folded.onnx", cwd=tmp_path, preexec_fn=_file_size_limit)
    assert_refused(result, 2, "out/folded.onnx could not be written (File too large)")
    assert sha256(inputs) == before and listing(tmp_path / "out") == []


def test_library_writers_name_the_target_when_the_folder_is_read_only(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    with read_only(folder):
        with pytest.raises(InvalidInputError, match=r"chart\.png could not be written \(Read-only file system\)"):
            write_atomic(folder / "chart.png", lambda handle: handle.write(b"png"))
        with pytest.raises(InvalidInputError, match="could not be written"):
            bo.save(CASES["conv2d"]().model, folder / "m.onnx")
        assert listing(folder) == []


# ----------------------------------------------------- 3. SIGINT, SIGTERM and SIGHUP while writing leave nothing


# The child runs the real command line, with torch.save made to announce that it wrote the staged file and then
# wait: the signal lands inside the write block every time. (Watching for the staging folder and signalling then
# raced the child: on a loaded machine it could finish the write, and exit, before the signal was sent.)
_PAUSED_IN_THE_WRITE = """
import pathlib, runpy, sys, time
import torch
real_save, marker = torch.save, pathlib.Path(sys.argv.pop(1))
def save_then_wait(*args, **kwargs):
    real_save(*args, **kwargs)
    marker.write_text("the staged file is written")
    time.sleep(600)
torch.save = save_then_wait
sys.argv[0] = "bnfold"
runpy.run_module("bnfold", run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_a_signal_while_writing_leaves_no_temporary_file(tmp_path: Path, signum: int) -> None:
    (folder, marker) = (tmp_path / "run", tmp_path / "writing")
    folder.mkdir()
    child = subprocess.Popen([sys.executable, "-c", _PAUSED_IN_THE_WRITE, str(marker), "fold", "resnet18",
                              "--input-shape", "1,3,32,32", "-o", "out.pth"],
                             cwd=folder, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.005)
        assert any(name.startswith(".out.pth.") for name in os.listdir(folder))  # the child is inside the staging
        child.send_signal(signum)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    expected = 130 if signum == signal.SIGINT else 128 + signum
    assert child.returncode == expected, (child.returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted") and "Traceback" not in stderr, stderr
    assert listing(folder) == []  # neither OUT nor the hidden staging folder


# A signal sent while the staged file is renamed into place: held until the rename is done, then honoured.
_SIGNALLED_IN_THE_COMMIT = """
import os, runpy, signal, sys
import bnfold.files
real_rename, signum = bnfold.files.rename_no_replace, int(sys.argv.pop(1))
def rename_then_signal(*args):
    os.kill(os.getpid(), signum)  # arrives while the commit holds signals
    real_rename(*args)
bnfold.files.rename_no_replace = rename_then_signal
sys.argv[0] = "bnfold"
runpy.run_module("bnfold", run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_a_signal_during_the_commit_lands_after_it_and_says_the_file_was_written(tmp_path: Path, signum: int) -> None:
    result = subprocess.run([sys.executable, "-c", _SIGNALLED_IN_THE_COMMIT, str(int(signum)), "fold", "resnet18",
                             "--input-shape", "1,3,32,32", "-o", "out.pth"],
                            cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == (130 if signum == signal.SIGINT else 128 + signum), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted") and "Traceback" not in result.stderr, result.stderr
    assert "out.pth had been written completely" in lines[0] and "nothing was written" not in lines[0]
    assert listing(tmp_path) == ["out.pth"]  # whole, and no staging folder left
    assert set(torch.load(tmp_path / "out.pth", weights_only=True)) == set(_folded_resnet18_keys())


def _folded_resnet18_keys() -> list[str]:
    return list(bnfold.fold(torchvision.models.resnet18().eval(), verify=False).state_dict())


def test_an_interrupt_during_the_commit_lands_after_it_with_the_files_listed_as_written(tmp_path: Path,
                                                                                        monkeypatch: pytest.MonkeyPatch
                                                                                        ) -> None:
    real_replace, before = os.replace, len(files_module.COMMITTED)

    def replace_then_interrupt(source: Any, target: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the default handler raises KeyboardInterrupt, once the commit is done
        real_replace(source, target)

    monkeypatch.setattr(files_module.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with staged_files([tmp_path / "a.data", tmp_path / "a.onnx"]) as (data, graph):
            data.write_bytes(b"data")
            graph.write_bytes(b"graph")
    assert files_module.COMMITTED[before:] == [tmp_path / "a.data", tmp_path / "a.onnx"]
    assert listing(tmp_path) == ["a.data", "a.onnx"] and (tmp_path / "a.onnx").read_bytes() == b"graph"


# ------------------------------------------- 4. ONNX: read back before the rename, graph and data as one unit


def test_onnx_save_reads_the_written_file_back_and_keeps_nothing_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (path, _) = onnx_with_data(tmp_path / "m")
    result = bo.fold(path)
    real_save = onnx.save_model

    def lossy_save(model: onnx.ModelProto, target: str, **kwargs: Any) -> None:  # a writer that damages one weight
        damaged = onnx.ModelProto()
        damaged.CopyFrom(model)
        weight = next(t for t in damaged.graph.initializer if t.name == damaged.graph.node[0].input[1])
        external = onnx.external_data_helper.uses_external_data(weight)
        if not external:  # small tensors stay inline in the graph
            weight.raw_data = np.float32(100.0).tobytes() + weight.raw_data[4:]
        real_save(damaged, target, **kwargs)
        if external:
            info = onnx.external_data_helper.ExternalDataInfo(weight)
            with open(Path(target).parent / info.location, "r+b") as data:
                data.seek(info.offset or 0)
                data.write(np.float32(100.0).tobytes())

    monkeypatch.setattr(onnx, "save_model", lossy_save)
    with pytest.raises(VerificationError, match="written ONNX file does not reproduce"):
        result.save(tmp_path / "out.onnx")
    assert listing(tmp_path) == ["m"]
    monkeypatch.setattr(onnx, "save_model", real_save)
    checked = result.save(tmp_path / "out.onnx")
    assert checked is not None and checked["passed"]
    assert checked["max_relative"] == result.report.verification["max_relative"]  # the file is the folded model
    assert listing(tmp_path) == ["m", "out.onnx", "out.onnx.data"]


def _old_pair(folder: Path) -> dict[Path, str]:
    """A previous OUT with its data file (an unfolded model), to be replaced with --force."""
    graph, data = onnx_with_data(folder, "out.onnx")
    return sha256([graph, data])


@pytest.mark.parametrize("failing_rename", [1, 2], ids=["data rename", "graph rename"])
def test_onnx_pair_failing_half_way_keeps_the_old_pair_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                failing_rename: int) -> None:
    source = onnx_with_data(tmp_path / "m")[0]
    old = _old_pair(tmp_path / "out")
    result = bo.fold(source)
    real_replace, calls = os.replace, []

    def replace(a: Any, b: Any) -> None:
        calls.append(Path(b).name)
        if len(calls) == failing_rename:
            raise OSError(5, "Input/output error")
        real_replace(a, b)

    monkeypatch.setattr(files_module.os, "replace", replace)
    with pytest.raises(InvalidInputError, match=r"out\.onnx could not be written \(Input/output error\)"):
        result.save(tmp_path / "out" / "out.onnx", force=True)
    monkeypatch.setattr(files_module.os, "replace", real_replace)
    assert calls[:2] == ["out.onnx.data", "out.onnx"][:failing_rename]  # data first, graph last
    assert sha256(list(old)) == old and listing(tmp_path / "out") == ["out.onnx", "out.onnx.data"]
    assert bn_count(bo.load(tmp_path / "out" / "out.onnx")) == 1  # the old model, loadable with its old data


@pytest.mark.parametrize("where", ["relative OUT", "OUT in another folder", "absolute OUT"])
def test_onnx_force_works_from_any_working_folder(tmp_path: Path, where: str) -> None:
    inputs = onnx_with_data(tmp_path / "models")
    before = sha256(inputs)
    _old_pair(tmp_path / "out")
    (tmp_path / "elsewhere").mkdir()
    cwd, model, out = {
        "relative OUT": (tmp_path / "out", "../models/model.onnx", "out.onnx"),
        "OUT in another folder": (tmp_path / "elsewhere", "../models/model.onnx", "../out/out.onnx"),
        "absolute OUT": (tmp_path / "elsewhere", str(tmp_path / "models" / "model.onnx"), str(tmp_path / "out" / "out.onnx")),
    }[where]
    result = run_cli("fold", model, "-o", out, "--force", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["written_file_check"]["passed"]
    written = onnx.load_model(str(tmp_path / "out" / "out.onnx"), load_external_data=False)
    locations = {onnx.external_data_helper.ExternalDataInfo(t).location for t in written.graph.initializer
                 if onnx.external_data_helper.uses_external_data(t)}
    assert locations == {"out.onnx.data"}  # relative to OUT, wherever the command ran
    folded = bo.load(tmp_path / "out" / "out.onnx")
    assert bn_count(folded) == 0 and bo.verify(bo.load(inputs[0]), folded, seed=4).passed
    assert listing(tmp_path / "out") == ["out.onnx", "out.onnx.data"] and sha256(inputs) == before


# ----------------------------------------------------------- 5. two runs on one absent OUT: no silent replacement


@pytest.mark.parametrize("mechanism", ["renameat2", "link"])
def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           mechanism: str) -> None:
    if mechanism == "link":
        monkeypatch.setattr(files_module, "_renameat2_function", None)
    elif files_module._renameat2_function is None:
        pytest.skip("no renameat2 here")
    target = tmp_path / "out.pth"
    with pytest.raises(InvalidInputError, match="appeared while bnfold was writing it"):
        with staged(target, replace=False) as temporary:
            temporary.write_bytes(b"ours")
            target.write_bytes(b"theirs")  # the other run finishes first
    assert target.read_bytes() == b"theirs" and listing(tmp_path) == ["out.pth"]
    with staged(target, replace=True) as temporary:  # --force: a plain replace
        temporary.write_bytes(b"ours")
    assert target.read_bytes() == b"ours" and listing(tmp_path) == ["out.pth"]


def test_two_threads_writing_one_absent_file_one_wins(tmp_path: Path) -> None:
    target, barrier, outcomes = tmp_path / "report.json", threading.Barrier(2), {}

    def writer(name: str) -> None:
        def write(handle: Any) -> None:
            handle.write(name)
            barrier.wait(timeout=10)  # both have written everything; now both rename
        try:
            write_atomic(target, write, binary=False, replace=False)
            outcomes[name] = "wrote"
        except InvalidInputError as error:
            outcomes[name] = str(error)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [name for name, outcome in outcomes.items() if outcome == "wrote"]
    assert len(winners) == 1 and target.read_text() == winners[0], outcomes
    loser = next(outcome for outcome in outcomes.values() if outcome != "wrote")
    assert "appeared while bnfold was writing it" in loser and listing(tmp_path) == ["report.json"]


def test_onnx_save_without_force_does_not_replace_a_pair_that_appeared(tmp_path: Path) -> None:
    model = CASES["conv2d"]().model
    out = tmp_path / "out.onnx"

    def another_run_finishes_first(staged_graph: Path) -> None:
        out.write_bytes(b"theirs")
        (tmp_path / "out.onnx.data").write_bytes(b"their data")

    with pytest.raises(InvalidInputError, match="appeared while bnfold was writing it"):
        bo.save(model, out, external_data=True, check=another_run_finishes_first)
    assert out.read_bytes() == b"theirs" and (tmp_path / "out.onnx.data").read_bytes() == b"their data"
    assert listing(tmp_path) == ["out.onnx", "out.onnx.data"]

    def only_the_graph_appears(staged_graph: Path) -> None:
        (tmp_path / "late.onnx").write_bytes(b"theirs")

    with pytest.raises(InvalidInputError, match="appeared while bnfold was writing it"):
        bo.save(model, tmp_path / "late.onnx", external_data=True, check=only_the_graph_appears)
    # our data file went in first and is taken back: their graph is not left beside a data file it does not use
    assert listing(tmp_path) == ["late.onnx", "out.onnx", "out.onnx.data"]


def test_staged_files_are_one_folder_with_distinct_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one folder"):
        with staged_files([tmp_path / "a", tmp_path / "sub" / "b"]):
            pass


# ----------------------------------------------------------------- 6. usual permissions (umask), not mkstemp's 0600


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_respect_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        write_atomic(tmp_path / "report.json", lambda handle: handle.write("{}"), binary=False)
        bo.save(CASES["conv2d"]().model, tmp_path / "m.onnx", external_data=True)
    finally:
        os.umask(previous)
    for name in ("report.json", "m.onnx", "m.onnx.data"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_cli_output_is_0644_under_umask_022(state_dict: Path) -> None:
    result = run_cli("fold", "r18.pth", "--arch", "resnet18", "-o", "out.pth", *SHAPE, cwd=state_dict.parent,
                     preexec_fn=lambda: os.umask(0o022) and None)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((state_dict.parent / "out.pth").stat().st_mode) == 0o644


# --------------------------------------------- 7. one judgement for the fold in memory and for the file written


def test_a_strict_tolerance_judges_the_fold_and_the_written_file_alike(state_dict: Path) -> None:
    # 1e-9 is below float32 rounding (~1e-7 here): only the float64 second opinion can pass the fold, and it must
    # pass the byte-identical file too (it used to pass the fold and then refuse the file: exit 1)
    result = run_cli("fold", "r18.pth", "--arch", "resnet18", "-o", "out.pth", "--tolerance", "1e-9", *SHAPE, "--json",
                     cwd=state_dict.parent)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    in_memory, written = payload["report"]["verification"], payload["written_file_check"]
    assert in_memory["tolerance"] == written["tolerance"] == 1e-9
    assert 1e-9 < in_memory["max_relative"] == written["max_relative"] < 1e-4
    # passed by one judge alike: the noise floor's allowance (or the float64 second opinion)
    assert in_memory["passed"] and written["passed"] and in_memory["judged"] == written["judged"]


def test_the_written_file_is_held_to_the_given_tolerance(state_dict: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    import bnfold.verification
    from bnfold.app.cli import main, saving

    calls: list[tuple[float | None, torch.Tensor]] = []
    judge, state_dict_format = bnfold.verification.judge_fold, saving.FORMATS["state_dict"]

    def spy(original: Any, candidate: Any, examples: list[tuple[torch.Tensor]], tolerance: float | None, what: str,
            *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append((tolerance, examples[0][0]))
        return judge(original, candidate, examples, tolerance, what, *args, **kwargs)

    def drifting(folded: Any, path: Path, example: torch.Tensor) -> None:  # a writer off by 1e-3
        state = {k: v.clone() for k, v in folded.state_dict().items()}
        state["fc.bias"] += 1e-3 * state["fc.bias"].abs().max()
        copy = bnfold.fold(torchvision.models.resnet18().eval(), verify=False)
        copy.load_state_dict(state)
        state_dict_format.write(copy, path, example)

    monkeypatch.setattr(bnfold.verification, "judge_fold", spy)
    monkeypatch.setitem(saving.FORMATS, "state_dict", dataclasses.replace(state_dict_format, write=drifting))
    monkeypatch.chdir(state_dict.parent)
    arguments = ["fold", "r18.pth", "--arch", "resnet18", "-o", "out.pth", *SHAPE]
    assert main([*arguments, "--tolerance", "1e-5"]) == 1  # the fold passes, the file (1e-3 off) does not
    assert "the written state_dict file differs from the original" in capsys.readouterr().err
    assert listing(state_dict.parent) == ["r18.pth"]
    assert [c[0] for c in calls] == [1e-5, 1e-5] and torch.equal(calls[0][1], calls[1][1])
    assert main([*arguments, "--tolerance", "1e-1"]) == 0  # looser than the drift: both pass, with one judge
    assert [c[0] for c in calls[2:]] == [1e-1, 1e-1] and listing(state_dict.parent) == ["out.pth", "r18.pth"]


def test_onnx_read_back_uses_the_folds_tolerance_and_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfold.onnx as backend

    calls: list[dict[str, Any]] = []
    real = backend._verify

    def spy(original: onnx.ModelProto, folded: onnx.ModelProto, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(original, folded, **kwargs)

    monkeypatch.setattr(backend, "_verify", spy)
    path = onnx_with_data(tmp_path / "m")[0]
    inputs = {"x": np.random.default_rng(0).standard_normal((2, 4, 7, 7)).astype(np.float32)}
    result = bo.fold(path, tolerance=1e-6, inputs=inputs, seed=7)
    result.save(tmp_path / "out.onnx")
    assert len(calls) == 2 and calls[0] == calls[1] == {"inputs": inputs, "seed": 7, "tolerance": 1e-6, "input_shape": None}

