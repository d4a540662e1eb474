"""A quiet terminal: what libraries print goes to a log file, our own output stays on the terminal.

The libraries' own switches come first, set when a capture starts (inherited by the processes they
start): VLLM_LOGGING_STREAM=ext://sys.__stdout__ (vLLM's handler writes to fd 1, the log, not to the
terminal stream sys.stdout is inside a capture), HF_HUB_DISABLE_PROGRESS_BARS (huggingface_hub's and
transformers' loading bars), HF_DATASETS_DISABLE_PROGRESS_BARS. What has no switch is handled below:
C/C++ code and child processes print to fds 1/2 (redirected); transformers, datasets and DeepSpeed
bind their handler to the current sys.stderr/stdout when first used, with no stream setting (moved
to the log as they are added); vLLM's weight-loading bar in an in-process engine has no switch
either (library bars go to the log). `eopd-pipe run` also sends its stages' own output to the log
(pipeline/progress.py), leaving one progress line on the terminal.

While a capture is active (`with capture_logs(RUN_DIR / "logs" / "rollout.log"):`):

- file descriptors 1 and 2 point at the log file (dup2), so lines written by C/C++ code (torch's
  "NUMA binding", vLLM's kernels) and by child processes (vLLM's engine core, torchrun's ranks) land
  there;
- sys.stdout and sys.stderr are streams on duplicates of the terminal's descriptors, so our
  progress bars, summary lines and tables (click.echo, tqdm) still reach the terminal;
- every logging handler a library binds to the terminal (vLLM's, transformers', datasets',
  DeepSpeed's, torch's), now or later in the capture, is re-pointed at the log; loggers that
  propagate reach a root handler writing to the log; `warnings` are routed into logging;
- records of level ERROR and above are also shown on the terminal, with the log file's path;
- progress bars that libraries create (vLLM's weight loading, transformers') go to the log; ours stay.

Captures nest (the innermost one's log is active), so one process can give each stage its own log
(`eopd-pipe run` with persistent engines). A stage started as a child process (`eopd-pipe run`
spawning `eopd-pipe rollout`) inherits the parent's log on 1 and 2 and finds the terminal through
EOPD_TERMINAL_STDOUT / EOPD_TERMINAL_STDERR (/proc/PID/fd/N, with the file's identity to check), then
captures into its own log.

`-v/--verbose` (EOPD_VERBOSE=1) turns capturing off: everything goes to the terminal as before.

A log is appended to, one header line per call. A call refused with a UserError takes its lines back
out (a refused call leaves the run directory as it was; its message says everything). When the
log's directory must not be created yet (a run directory a refused call must not leave behind), the
capture writes to a temporary file and moves it into place as soon as that directory exists.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

VERBOSE_ENV = "EOPD_VERBOSE"
TERMINAL_ENV = ("EOPD_TERMINAL_STDOUT", "EOPD_TERMINAL_STDERR")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
POLL_SECONDS = 0.5  # how often a temporary log checks whether its run directory exists yet


def capturing() -> bool:
    """Whether a capture is active in this process (library output goes to a log now)."""
    return bool(_STACK)


def current_log() -> Path | None:
    """Where this process's library output goes now (None outside a capture)."""
    return _STACK[-1].path if _STACK else None


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(verbose: bool) -> None:
    """-v: this process and the stage processes it starts show library output on the terminal."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


# ----------------------------------------------------------------------------- the terminal


@dataclass
class _Terminal:
    out: TextIO
    err: TextIO
    own_streams: bool  # False: sys.stdout/err were already not fd 1/2 (click's CliRunner, pytest): kept


_TERMINAL: _Terminal | None = None
_LOCK = threading.RLock()


def _fd_of(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None


def _terminal_fd(which: int) -> int:
    """A descriptor on the terminal: the one a parent process handed down, else a duplicate of ours."""
    handed = os.environ.get(TERMINAL_ENV[which - 1], "")
    path, _, identity = handed.partition("|")
    if path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            st = os.fstat(fd)
            if f"{st.st_dev}:{st.st_ino}" == identity:
                return fd
            os.close(fd)  # the pid was reused by another process: not our terminal
        except OSError:
            pass  # the parent is gone or /proc is not readable: our own descriptor is the best we have
    fd = os.dup(which)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            # `cmd > file`: children reopen it through /proc with O_APPEND; so must we, or our writes
            # at our own offset would overwrite theirs.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    except OSError:
        pass
    return fd


def _text_stream(fd: int, like: TextIO | None) -> TextIO:
    encoding = getattr(like, "encoding", None) or "utf-8"
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(raw, encoding=encoding, errors="backslashreplace", line_buffering=True,
                            write_through=True)


def _terminal() -> _Terminal:
    """Made once per process and never closed: handlers and tqdm bars may keep a reference."""
    global _TERMINAL
    if _TERMINAL is None:
        if _fd_of(sys.stdout) == 1 and _fd_of(sys.stderr) == 2:
            out_fd, err_fd = _terminal_fd(1), _terminal_fd(2)
            _TERMINAL = _Terminal(_text_stream(out_fd, sys.stdout), _text_stream(err_fd, sys.stderr), True)
            # Stage processes started from here write their own output to our terminal.
            for name, fd in zip(TERMINAL_ENV, (out_fd, err_fd)):
                st = os.fstat(fd)
                os.environ[name] = f"/proc/{os.getpid()}/fd/{fd}|{st.st_dev}:{st.st_ino}"
        else:
            _TERMINAL = _Terminal(sys.stdout, sys.stderr, False)
    return _TERMINAL


def terminal_stderr() -> TextIO:
    """Where a message for the user goes, inside a capture or after it (in a stage process started by
    `run`, sys.stderr outside a capture is the parent's log)."""
    return _TERMINAL.err if _TERMINAL is not None and _TERMINAL.own_streams else sys.stderr


def terminal_stdout() -> TextIO:
    return _TERMINAL.out if _TERMINAL is not None and _TERMINAL.own_streams else sys.stdout


# ----------------------------------------------------------------------------- logging routing


class _ErrorsToTerminal(logging.Filter):
    """A library's ERROR record also reaches the terminal, once, naming the log with the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and _STACK and not getattr(record, "_eopd_shown", False):
            record._eopd_shown = True
            try:
                first = record.getMessage().splitlines()[0] if record.getMessage() else ""
            except Exception:  # a bad format string is the library's problem, not a reason to fail
                first = str(record.msg)
            # tqdm.write clears and redraws a progress bar on that stream (`run`'s): no line lands on it.
            from tqdm import tqdm

            tqdm.write(f"{record.levelname.lower()} ({record.name}): {first}  [full log: {_STACK[-1].path}]",
                       file=_TERMINAL.err)
        return True


_ERRORS_TO_TERMINAL = _ErrorsToTerminal()
_ROOT_HANDLER: logging.Handler | None = None
_SAVED_ROOT_LEVEL: int | None = None
_ORIGINAL_ADD_HANDLER = logging.Logger.addHandler


class _FormatToLog(logging.Filter):
    """For a handler whose stream cannot be set (logging._StderrHandler: always the current sys.stderr):
    writes the record to the log itself and stops the handler."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if not _STACK:
            return True
        try:
            sys.__stderr__.write(self.handler.format(record) + "\n")
            sys.__stderr__.flush()
        except Exception:
            pass
        return False


def _reroute(handler: logging.Handler) -> None:
    """A stream handler that writes to the terminal or to fd 1/2 writes to the (current) log instead."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return
    term = _TERMINAL
    stream = getattr(handler, "stream", None)
    try:
        if term is not None and term.own_streams and stream in (term.out, term.err):
            target = sys.__stdout__ if stream is term.out else sys.__stderr__
            try:
                handler.setStream(target)
            except AttributeError:  # a read-only stream property
                if not any(isinstance(f, _FormatToLog) for f in handler.filters):
                    handler.addFilter(_FormatToLog(handler))
        elif stream not in (sys.__stdout__, sys.__stderr__):
            return  # a file or a test's buffer: not ours to move
        if _ERRORS_TO_TERMINAL not in handler.filters:
            handler.filters.insert(0, _ERRORS_TO_TERMINAL)  # before a _FormatToLog that stops the record
    except Exception:  # never break a library's logging setup
        pass


def _add_handler(self: logging.Logger, handler: logging.Handler) -> None:
    # Libraries configure their loggers lazily (vLLM at import, transformers at first use), while
    # sys.stderr is the terminal: their handlers are moved to the log as they are added.
    if _STACK:
        _reroute(handler)
    _ORIGINAL_ADD_HANDLER(self, handler)


OWN_PACKAGES = ("pipeline", "stages", "eopd", "bench", "__main__")  # whose progress bars stay on the terminal
LIBRARY_BARS_SHOWN = ("Processed prompts",)  # vLLM's LLM.generate bar: eval's progress while it samples
_ORIGINAL_TQDM_INIT = None


def _creator_is_ours() -> bool:
    """Whether the code creating a tqdm bar (the first frame outside tqdm) belongs to eopd-pipe."""
    frame = sys._getframe(2)
    while frame is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] == "tqdm":
        frame = frame.f_back
    name = str(frame.f_globals.get("__name__", "")) if frame is not None else ""
    return name.split(".")[0] in OWN_PACKAGES


def _patch_tqdm() -> None:
    """Library progress bars (vLLM's weight loading, transformers' shards) go to the log; ours, and any
    bar given an explicit `file`, stay where they are."""
    global _ORIGINAL_TQDM_INIT
    try:
        import tqdm.std
    except ImportError:
        return
    original = _ORIGINAL_TQDM_INIT = tqdm.std.tqdm.__init__

    def __init__(self, *args, **kwargs):
        desc = kwargs.get("desc", args[1] if len(args) > 1 else None)
        if (_STACK and kwargs.get("file") is None and len(args) < 5 and desc not in LIBRARY_BARS_SHOWN
                and not _creator_is_ours()):
            kwargs["file"] = sys.__stderr__
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = __init__


def _unpatch_tqdm() -> None:
    global _ORIGINAL_TQDM_INIT
    if _ORIGINAL_TQDM_INIT is not None:
        import tqdm.std

        tqdm.std.tqdm.__init__ = _ORIGINAL_TQDM_INIT
        _ORIGINAL_TQDM_INIT = None


def _start_routing() -> None:
    global _ROOT_HANDLER, _SAVED_ROOT_LEVEL
    logging.Logger.addHandler = _add_handler
    for logger in [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                           if isinstance(l, logging.Logger)]:
        for h in list(logger.handlers):
            _reroute(h)
    root = logging.getLogger()
    _ROOT_HANDLER = logging.StreamHandler(sys.__stderr__)
    _ROOT_HANDLER.setFormatter(logging.Formatter(LOG_FORMAT))
    _ROOT_HANDLER.addFilter(_ERRORS_TO_TERMINAL)
    _ORIGINAL_ADD_HANDLER(root, _ROOT_HANDLER)
    _SAVED_ROOT_LEVEL = root.level
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    _patch_tqdm()


def _stop_routing() -> None:
    global _ROOT_HANDLER
    logging.Logger.addHandler = _ORIGINAL_ADD_HANDLER
    root = logging.getLogger()
    if _ROOT_HANDLER is not None:
        root.removeHandler(_ROOT_HANDLER)
        _ROOT_HANDLER = None
    if _SAVED_ROOT_LEVEL is not None:
        root.setLevel(_SAVED_ROOT_LEVEL)
    logging.captureWarnings(False)
    _unpatch_tqdm()


# ----------------------------------------------------------------------------- captures


def _flush_all() -> None:
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if s is not None:
                s.flush()
        except (ValueError, OSError):
            pass


class _Capture:
    def __init__(self, path: Path, only_inside: Path | None) -> None:
        self.final = Path(path)
        self.only_inside = Path(only_inside) if only_inside is not None else None
        self.created = False  # this call created the final log file
        self.start = 0  # the final log's size before this call wrote to it
        self.fd = -1
        self.temp: Path | None = None
        self.poller: threading.Thread | None = None
        self.stop = threading.Event()

    @property
    def path(self) -> Path:
        """Where the log is now (temporary until its directory may be created)."""
        return self.temp if self.temp is not None else self.final

    def open(self, header: str) -> None:
        if self.only_inside is None or self.only_inside.is_dir():
            self.fd = self._open_final()
        else:
            fd, name = tempfile.mkstemp(prefix=f"eopd-pipe-{self.final.stem}-", suffix=".log")
            self.fd, self.temp = fd, Path(name)
            self.poller = threading.Thread(target=self._poll, name="eopd-log-adopt", daemon=True)
        os.write(self.fd, header.encode())
        if self.temp is None:
            self.start = os.lseek(self.fd, 0, os.SEEK_CUR) - len(header.encode())
        if self.poller is not None:
            self.poller.start()

    def _open_final(self) -> int:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.created = not self.final.exists()
        fd = os.open(self.final, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.start = os.fstat(fd).st_size  # where this call's part begins (a refusal cuts it off again)
        return fd

    def _poll(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            if self.only_inside.is_dir():
                self.adopt()
                return

    def adopt(self) -> None:
        """Move the temporary log into its place: copy what it holds, point fds 1/2 at the final file."""
        with _LOCK:
            if self.temp is None or self.fd < 0:
                return
            _flush_all()
            fd = self._open_final()
            with open(self.temp, "rb") as f:
                with os.fdopen(os.dup(fd), "wb") as out:
                    shutil.copyfileobj(f, out)
                old, self.fd = self.fd, fd
                if _STACK and _STACK[-1] is self:
                    self.activate()
                rest = f.read()  # written between the copy and the switch
            if rest:
                os.write(fd, rest)
            os.close(old)
            self.temp.unlink(missing_ok=True)
            self.temp = None

    def activate(self) -> None:
        _flush_all()
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)

    def close(self, refused: bool, failed: bool) -> Path | None:
        """Returns where the log stays, or None when it was removed. A temporary log whose directory
        never came to be is kept (and named) only when the call failed."""
        self.stop.set()
        if self.poller is not None:
            self.poller.join()
        if self.temp is not None and self.only_inside is not None and self.only_inside.is_dir() and not refused:
            self.adopt()
        with _LOCK:
            if refused and self.temp is None and not self.created:
                # Cut this call's lines off again, unless another process appended after them.
                if os.fstat(self.fd).st_size == os.lseek(self.fd, 0, os.SEEK_CUR):
                    os.ftruncate(self.fd, self.start)
            os.close(self.fd)
            self.fd = -1
            if self.temp is not None:
                if failed:
                    return self.temp  # no run directory to keep it in: left in the temp dir
                self.temp.unlink(missing_ok=True)
                return None
            if refused and self.created:
                self.final.unlink(missing_ok=True)
                try:
                    self.final.parent.rmdir()  # only if empty: the logs dir this call made
                except OSError:
                    pass
                return None
            return self.final


_STACK: list[_Capture] = []
_ORIGINAL_FDS: tuple[int, int] | None = None  # fds 1/2 before the outermost capture
_SAVED_STREAMS: list[tuple[TextIO, TextIO]] = []


@dataclass
class LogCapture:
    """What `capture_logs` yields. `path`: where the log is now (temporary until its directory
    exists); after the block, `kept`: where it stays (None: verbose, or removed after a refusal)."""
    _capture: _Capture | None
    kept: Path | None = None

    @property
    def path(self) -> Path | None:
        return self._capture.path if self._capture is not None else None


def _enter(cap: _Capture) -> None:
    global _ORIGINAL_FDS
    with _LOCK:
        term = _terminal()
        _flush_all()
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        prog = "eopd-pipe" if prog in ("eopd-pipe", "cli.py") else prog
        cap.open(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join([prog] + sys.argv[1:])}\n")
        if not _STACK:
            _ORIGINAL_FDS = (os.dup(1), os.dup(2))
        _STACK.append(cap)
        cap.activate()
        _SAVED_STREAMS.append((sys.stdout, sys.stderr))
        if term.own_streams:
            sys.stdout, sys.stderr = term.out, term.err
        if len(_STACK) == 1:
            _start_routing()


def _exit(cap: _Capture) -> None:
    global _ORIGINAL_FDS
    with _LOCK:
        _flush_all()
        _STACK.remove(cap)
        sys.stdout, sys.stderr = _SAVED_STREAMS.pop()
        if _STACK:
            _STACK[-1].activate()
        else:
            _stop_routing()
            os.dup2(_ORIGINAL_FDS[0], 1)
            os.dup2(_ORIGINAL_FDS[1], 2)
            os.close(_ORIGINAL_FDS[0])
            os.close(_ORIGINAL_FDS[1])
            _ORIGINAL_FDS = None


@contextmanager
def capture_logs(path: str | Path, only_inside: str | Path | None = None,
                 verbose: bool | None = None) -> Iterator[LogCapture]:
    """Send library output to the log file `path` for the duration (see the module docstring).

    only_inside: a directory that this call must not create just for the log (the run directory: a
    refused call leaves nothing behind); until it exists the log is a temporary file, moved to `path`
    as soon as it does. verbose (default: EOPD_VERBOSE): capture nothing.

    A UserError leaving the block removes a log this call created (the message says everything).
    """
    if is_verbose() if verbose is None else verbose:
        yield LogCapture(None)
        return
    if _fd_of(sys.__stdout__) != 1 or _fd_of(sys.__stderr__) != 2:
        yield LogCapture(None)  # no standard descriptors to redirect (embedded interpreter)
        return
    from pipeline.errors import Preempted, UserError

    # The libraries' own switches first (read at their import; inherited by the processes they start):
    # vLLM's log handler writes to sys.__stdout__, i.e. fd 1, the log (its default, sys.stdout, is the
    # terminal stream inside a capture); huggingface_hub's and transformers' loading bars, datasets' bars off.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.__stdout__")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    cap = _Capture(Path(path), Path(only_inside) if only_inside is not None else None)
    _enter(cap)
    result = LogCapture(cap)
    refused, failure = False, None
    try:
        yield result
    except UserError:
        refused = True
        raise
    except GeneratorExit:
        raise
    except BaseException as e:
        failure = e
        raise
    finally:
        _exit(cap)
        result.kept = cap.close(refused, failure is not None)
        # A library's failure: its traceback (printed later, to the terminal) ends with where its log is.
        if (isinstance(failure, Exception) and not isinstance(failure, Preempted) and result.kept is not None
                and hasattr(failure, "add_note") and not getattr(failure, "_eopd_noted", False)):
            failure.add_note(f"(what the libraries printed during this command: {result.kept})")
            failure._eopd_noted = True


def log_path(root, name: str):
    """The log of command or stage `name` in a run directory: RUN_DIR/logs/NAME.log (a local path,
    or a bucket location as it is: `Path()` would make "s3://b/x" the folder "s3:/b/x")."""
    return (Path(root) if isinstance(root, str) else root) / "logs" / f"{name}.log"


def print_exception_to_terminal(exc: BaseException) -> None:
    """A traceback for the user's terminal even inside a capture (sys.stderr may be a stage log)."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=terminal_stderr())
