"""Writing files safely: a file bnfold writes is either complete or absent, and never replaces one by accident.

Every writer (reports, charts, folded models, ONNX graphs with their external data, the CLI) goes through
:func:`staged_files` (or its one-file forms :func:`staged`, :func:`write_atomic` and :func:`write_png`):

* **Complete or absent.** The content is written into a hidden staging folder beside the target
  (``.NAME.XXXX.staging/NAME``) and renamed into place only once the writer (and any check of the written
  file) has succeeded. An exception, Ctrl-C, or a SIGTERM / SIGHUP that the CLI turns into an exception,
  deletes the staging folder: the old target (if any) is untouched.
* **Usual permissions.** Files are created by a plain ``open()`` inside the staging folder, so they get
  ``0666 & ~umask``, as any other program's output, not ``mkstemp``'s ``0600``.
* **No clobbering.** Without ``replace=True`` the final rename refuses to replace a file that appeared while the
  content was being written (:func:`rename_no_replace`: no window between a check and the rename).
* **Write failures are named.** An ``OSError`` (read-only folder, full disk, file size limit, permissions)
  becomes an :class:`~bnfold.errors.InvalidInputError` that names the target and the cause: it is the
  environment, not a bug.
* **Never over an input.** :func:`check_output_path` / :func:`refuse_inputs` compare an output with every file
  the run reads by resolved path *and* by inode (symbolic and hard links), whatever ``--force`` says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

_HINTS = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space (disk quota exceeded) or write elsewhere",
    errno.EFBIG: "the file size limit (ulimit -f) is too small for it; raise it or write a smaller format",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
}


def describe_os_error(error: OSError, path: str | os.PathLike[str] | None = None, *, doing: str | None = None) -> str:
    """One line for an ``OSError``: ``"PATH: cause; what to do"``, or ``"PATH could not be DOING (cause); ..."``.

    ``path`` is the file the user named (default: the error's own file name), not a hidden staged file.
    """
    where = path if path is not None else error.filename
    cause = error.strerror or str(error) or type(error).__name__
    hint = _HINTS.get(error.errno or 0)
    if where is None:
        text = cause
    elif doing is not None:
        text = f"{where} could not be {doing} ({cause})"
    else:
        text = f"{where}: {cause}"
    return f"{text}; {hint}" if hint else text


def _write_failed(error: OSError, path: Path) -> InvalidInputError:
    return InvalidInputError(describe_os_error(error, path, doing="written") + "; nothing was written")


def write_atomic(
    target: str | os.PathLike[str], write: Callable[[Any], None], *, binary: bool = True, replace: bool = True
) -> Path:
    """Call ``write(handle)`` on a staged file, then rename it to ``target`` (see the module docstring).

    ``replace=False`` refuses to replace an existing ``target`` (checked atomically at the rename).
    """
    with staged(target, replace=replace) as temporary, temporary.open("wb" if binary else "w") as handle:
        write(handle)
    return Path(target)


def write_png(target: str | os.PathLike[str], figure: Any) -> Path:
    """Write a matplotlib ``figure`` to ``target`` as a PNG, atomically; the figure is closed whatever happens."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(target, lambda handle: figure.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(figure)


@contextmanager
def staged(target: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """A staged path for ``target``; renamed to ``target`` if the block succeeds, deleted if it raises.

    For writers that want a path rather than a handle (``torch.onnx.export``), and for checking a written file
    (loading it back) before it replaces anything. The staged file has ``target``'s name (some loaders, such as
    ``torch.export.load``, go by the extension).
    """
    with staged_files([target], replace=replace) as (path,):
        yield path


#: Every file this process has written through :func:`staged_files`, in order. A Ctrl-C that lands after a
#: commit (held during it, or while a command prints its report) is then reported truthfully: the command line
#: names what its run wrote instead of saying that nothing was.
COMMITTED: list[Path] = []


@contextmanager
def staged_files(targets: Sequence[str | os.PathLike[str]], *, replace: bool = True) -> Iterator[list[Path]]:
    """Staged paths for several files of one folder, committed as one unit once the block succeeds.

    The block writes (and checks) every staged path; a staged path it does not create is not committed. The commit
    renames the files into place in the order given, so list the file others refer to *last* (an ONNX graph after
    its external data file). What is guaranteed:

    * an exception or signal in the block: no target is touched, the staging folder is deleted;
    * an exception during the commit (a rename that fails, a file that appeared meanwhile without ``replace``):
      the files already renamed are rolled back (a target that existed is restored from a hard-link backup, one
      that did not is removed), so every target is as before. Signals are held during the commit and the clean-up,
      so a Ctrl-C or SIGTERM cannot cut the commit or its rollback in half (it takes effect right after, and
      :data:`COMMITTED` already lists the targets);
    * only a hard kill (SIGKILL, power loss) between two renames of the commit, a window of a few system calls,
      can leave new and old files side by side.

    Raises:
        InvalidInputError: a target exists and ``replace`` is false, or the file system refused a write (the
            message names the target and the cause: read-only, full, too large for ``ulimit -f``, ...).
    """
    paths = [Path(t) for t in targets]
    if not paths:
        raise ValueError("staged_files() needs at least one target")
    folder = paths[0].parent
    if any(p.parent != folder for p in paths) or len({p.name for p in paths}) != len(paths):
        raise ValueError("staged_files() stages files of one folder, with distinct names")
    main = paths[-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)  # library writers (charts, reports) may name a new folder
        staging = Path(tempfile.mkdtemp(prefix=f".{main.name}.", suffix=".staging", dir=folder))
    except OSError as error:
        raise _write_failed(error, main) from error
    try:
        staged_paths = [staging / p.name for p in paths]
        try:
            yield staged_paths
        except OSError as error:
            raise _write_failed(error, main) from error
        with _signals_held():
            COMMITTED.extend(_commit(list(zip(staged_paths, paths, strict=True)), staging, replace))
    finally:
        with _signals_held():
            shutil.rmtree(staging, ignore_errors=True)


def _commit(moves: list[tuple[Path, Path]], staging: Path, replace: bool) -> list[Path]:
    """Rename the staged files that exist into place, all or none; returns the targets written."""
    done: list[tuple[Path, Path | None]] = []  # (target, backup of what it replaced, or None if it was new)
    try:
        for number, (source, target) in enumerate(moves):
            if not source.exists():
                continue
            if replace:
                backup = _backup(target, staging / f".backup-{number}")
                os.replace(source, target)
                done.append((target, backup))
            else:
                rename_no_replace(source, target)
                done.append((target, None))
        return [target for target, _ in done]
    except BaseException as error:
        for target, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink(missing_ok=True)
            except OSError:
                pass  # the rollback is best effort; the original error is the one to report
        if isinstance(error, FileExistsError):
            raise InvalidInputError(
                f"{error.filename2 or moves[-1][1]} appeared while bnfold was writing it (another run?); nothing was "
                "replaced: pass --force to replace it, or choose another path"
            ) from error
        if isinstance(error, OSError):
            raise _write_failed(error, moves[-1][1]) from error
        raise


def _backup(target: Path, backup: Path) -> Path | None:
    """A hard link to ``target`` (to restore it if the commit fails half-way), or None if there is nothing to keep."""
    if not target.exists() or target.is_dir():
        return None
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError:
        return None  # a file system without hard links: the commit still replaces, without a way back
    return backup


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2_function = _renameat2()


def rename_no_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename ``source`` to ``target`` atomically, failing with ``FileExistsError`` if ``target`` exists.

    ``renameat2(RENAME_NOREPLACE)`` where available (Linux); otherwise, or where the file system does not support
    it, ``os.link`` (which fails with EEXIST) and then removing ``source``. Never a check followed by a rename.
    """
    source_bytes, target_bytes = os.fsencode(source), os.fsencode(target)
    if _renameat2_function is not None:
        if _renameat2_function(_AT_FDCWD, source_bytes, _AT_FDCWD, target_bytes, _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), os.fspath(source), None, os.fspath(target))
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError as error:
        raise FileExistsError(error.errno, error.strerror, os.fspath(source), None, os.fspath(target)) from None
    os.unlink(source)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT / SIGTERM / SIGHUP to the end of the block, so they cannot cut a commit in half.

    Deferred in Python, not masked: ``pthread_sigmask`` masks the calling thread only, and the kernel hands a
    signal sent to the process to any thread that does not mask it (PyTorch's worker threads), whose C handler
    then has the main thread run the Python handler at once, in the middle of the block. Here each signal is
    recorded and raised again, in order, once the previous handlers are back. Only the main thread runs Python
    signal handlers; in other threads the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not None:  # None: a handler Python cannot restore
            previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in received:
            signal.raise_signal(number)


# ------------------------------------------------------------------------------------ outputs are never inputs


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file: the same resolved path, or the same inode (hard links)."""
    first, second = Path(a), Path(b)
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet): it cannot be a hard link of the other
        return False


def refuse_inputs(outputs: Iterable[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Raise if any output is one of the files the run reads (or lies inside a folder it reads), ``--force`` or not.

    Compared by resolved path and by inode, so a symbolic or hard link to an input is refused too.
    """
    sources = [Path(s) for s in inputs]
    for output in (Path(o) for o in outputs):
        for source in sources:
            if same_file(output, source):
                link = "" if os.path.abspath(output) == os.path.abspath(source) else " (a link to it)"
                raise InvalidInputError(
                    f"{output} is the input file {source}{link}; bnfold never writes over a file it reads, even "
                    "with --force: write to another path"
                )
            if source.is_dir() and output.resolve().is_relative_to(source.resolve()):
                raise InvalidInputError(f"{output} lies inside {source}, which this run reads; write to another path")


def check_output_path(
    output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], *, force: bool,
    companions: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuse to write over an input file (ever) or over an existing file (unless ``force``).

    ``companions`` are the other files written with ``output`` (an ONNX graph's external data file): they are held
    to the same rules.
    """
    path = Path(output)
    refuse_inputs([path, *companions], inputs)
    if path.is_dir():
        raise InvalidInputError(f"{path} is a directory; give a file name for the folded model")
    if not force:
        for existing in (p for p in (path, *map(Path, companions)) if p.exists() or p.is_symlink()):
            raise InvalidInputError(f"{existing} exists; pass --force to replace it, or choose another path")
    if not path.parent.exists():
        raise InvalidInputError(f"{path.parent} does not exist; create it first or choose another path")
    return path
