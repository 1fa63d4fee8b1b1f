"""The one path layer every run file goes through: local directories and object stores (gs://, s3://) alike.

A work directory is named by a string: a local path (`runs/a`, `/data/runs/a`) or a URI (`gs://bucket/runs/a`).
The functions here take such strings and return strings, so a `RunDir`'s paths stay plain text that prints, joins
and compares as before. They dispatch once, on `is_local`:

- Local paths use `os` and the builtin `open` exactly as the run directory always has: the same files, the same
  per-process temporary + `os.replace` atomicity, the same OSError (errno, strerror, the real file's name) on a
  read-only or full disk. Nothing of etils is even imported for a local run.
- Any other path goes through `etils.epath` (`as_path`), whose gs:// backend is gcsfs (through fsspec) or
  TensorFlow's gfile when TensorFlow is installed; nothing of it touches `os`, so a `gs://...` work directory is
  never mistaken for a local directory named "gs:".

Object stores differ from a file system in two ways that matter here:

- A single object write is atomic by itself: a reader sees the old object or the new one, never half of one
  (Cloud Storage's strong consistency for a single object). `write_atomic` therefore writes the object directly;
  a temporary + rename would be a copy and a delete, two requests, and no more atomic.
- Objects cannot be appended to. `append_text` on an object store reads the whole object, adds the text and writes
  it back (one object write, so still atomic). That is correct for one writer per file, which is how the project
  writes: each process keeps its own metrics file (`jaxalign.train.loop.process_log_path`) and its own run log.
  It costs a read and a write of the whole file per call. Run logs (`appending`) are therefore staged in a local
  temporary file and written up once, when the run ends (a run killed by SIGKILL loses that session's log).
"""
from __future__ import annotations

import contextlib
import functools
import glob as globlib
import importlib.util
import io
import os
import posixpath
import shutil
import tempfile
from typing import Any, Callable, Iterator

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
    """Whether `path` names the local file system: no `scheme://` prefix (a `file://` URI counts as remote here,
    so that it too goes through epath rather than being joined as text)."""
    return "://" not in os.fspath(path)


# The packages epath can reach each scheme through (any one of them will do).
BACKENDS = {"gs": ("gcsfs", "tensorflow"), "s3": ("s3fs", "tensorflow"), "az": ("adlfs",), "hf": ("huggingface_hub",)}


@functools.lru_cache(maxsize=None)
def _backend_error(scheme: str) -> str | None:
    """Why paths with `scheme` cannot be used here (no backend installed, an unknown scheme), or None."""
    needs = BACKENDS.get(scheme)
    if needs is None:
        return f"unsupported scheme {scheme}://; expected a local path or one of " + \
            ", ".join(f"{s}://" for s in BACKENDS)
    if any(importlib.util.find_spec(name) is not None for name in needs):
        return None
    extra = " (pip install 'jaxalign[gcs]')" if scheme == "gs" else ""
    return f"{scheme}:// paths need {' or '.join(needs)} installed{extra}, and none is"


def as_path(path: PathLike) -> Any:
    """`path` as an `etils.epath.Path` (gs://, s3:// or local), for libraries that take one (orbax). A URI whose
    backend is not installed is one clear ValueError (a refusal, not a traceback from deep inside fsspec)."""
    from etils import epath

    if not is_local(path):
        error = _backend_error(os.fspath(path).split("://", 1)[0])
        if error is not None:
            raise ValueError(f"{os.fspath(path)}: {error}")
    return epath.Path(path)


def absolute_path(path: PathLike) -> Any:
    """`as_path(path)`, made absolute when local. A URI is absolute already; epath's own `absolute()` would prefix
    it with the current directory ("/cwd/gs:/bucket/...")."""
    return as_path(path).absolute() if is_local(path) else as_path(path)


def join(root: PathLike, *names: str) -> str:
    """`root`/`names`: `os.path.join` locally; "/" joins on an object store, whatever the host's separator."""
    root = os.fspath(root)
    return os.path.join(root, *names) if is_local(root) else posixpath.join(root, *names)


def dirname(path: PathLike) -> str:
    path = os.fspath(path)
    return os.path.dirname(path) if is_local(path) else posixpath.dirname(path)


def exists(path: PathLike) -> bool:
    return os.path.exists(path) if is_local(path) else as_path(path).exists()


def isdir(path: PathLike) -> bool:
    return os.path.isdir(path) if is_local(path) else as_path(path).is_dir()


def makedirs(path: PathLike) -> None:
    """Create `path` and its parents if missing. On an object store directories are only name prefixes; epath
    creates them where the backend keeps any (a no-op on Cloud Storage)."""
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: PathLike) -> str:
    if is_local(path):
        with open(path) as f:
            return f.read()
    return as_path(path).read_text()


def read_bytes(path: PathLike) -> bytes:
    if is_local(path):
        with open(path, "rb") as f:
            return f.read()
    return as_path(path).read_bytes()


def readable(path: PathLike) -> Any:
    """What a reader that takes a file name or a binary file object (`np.load`) should open: the local path
    itself (read lazily, as before), else the object's bytes in memory."""
    return path if is_local(path) else io.BytesIO(read_bytes(path))


def write_atomic(path: PathLike, data: str | bytes, temporary_suffix: str = "") -> None:
    """Write `data` to `path` so that no reader ever sees a half-written file (module docstring).

    Locally: to the per-process temporary PATH.tmp-PID (+ `temporary_suffix`, for writers that need the right
    extension) and `os.replace`. On a failure (a full disk) the temporary is removed and the OSError names `path`,
    not the temporary. On an object store: one direct object write, atomic by itself.
    """
    path = os.fspath(path)
    if not is_local(path):
        target = as_path(path)
        if isinstance(data, str):
            target.write_text(data)
        else:
            target.write_bytes(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}{temporary_suffix}"
    try:
        with open(tmp, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror, path) from e


def write_atomic_with(path: PathLike, write: Callable[[Any], None], temporary_suffix: str = "") -> None:
    """`write_atomic` for writers that take a file name or a binary file object (`np.savez`, `savefig`): locally
    `write(temporary_path)` then `os.replace`, so a large file is never held in memory; on an object store
    `write(buffer)` into memory, then one object write."""
    path = os.fspath(path)
    if not is_local(path):
        buffer = io.BytesIO()
        write(buffer)
        as_path(path).write_bytes(buffer.getvalue())
        return
    tmp = f"{path}.tmp-{os.getpid()}{temporary_suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror, path) from e


def append_text(path: PathLike, text: str) -> None:
    """Append `text` to `path` (created if missing). Locally an O_APPEND write, flushed; on an object store a
    read-modify-write of the whole object (module docstring: correct for one writer)."""
    if is_local(path):
        with open(path, "a") as f:
            f.write(text)
            f.flush()
        return
    target = as_path(path)
    before = target.read_text() if target.exists() else ""
    target.write_text(before + text)


@contextlib.contextmanager
def appending(path: PathLike) -> Iterator[Any]:
    """A line-buffered text stream appending to `path` for the duration of the block (a run's log).

    Locally the file itself, opened for append. On an object store a local temporary file, whose text is appended
    to the object once, when the block exits (normally or by an exception), so a long run does not rewrite the
    object at every line."""
    if is_local(path):
        with open(path, "a", buffering=1) as f:
            yield f
        return
    with tempfile.TemporaryFile("w+", buffering=1) as staged:
        try:
            yield staged
        finally:
            staged.seek(0)
            append_text(path, staged.read())


def listdir(path: PathLike) -> list[str]:
    """The names (not paths) of the entries of directory `path`."""
    if is_local(path):
        return os.listdir(path)
    return [p.name for p in as_path(path).iterdir()]


def glob(directory: PathLike, pattern: str) -> list[str]:
    """The paths under `directory` matching `pattern` (e.g. "*.png"), sorted."""
    if is_local(directory):
        return sorted(globlib.glob(os.path.join(directory, pattern)))
    return sorted(str(p) for p in as_path(directory).glob(pattern))


def files_under(directory: PathLike) -> list[str]:
    """The "/"-joined names, relative to `directory`, of every file under it at any depth, sorted (epath's own
    recursive glob refuses gs:// paths, so the tree is walked one listing at a time)."""
    found = []
    for name in sorted(listdir(directory)):
        path = join(directory, name)
        found += [f"{name}/{below}" for below in files_under(path)] if isdir(path) else [name]
    return found


def remove(path: PathLike) -> None:
    """Delete the file `path`; a missing file is not an error."""
    if is_local(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    else:
        as_path(path).unlink(missing_ok=True)


def rmtree(path: PathLike) -> None:
    """Delete the directory `path` and everything under it, ignoring errors (as `shutil.rmtree(...,
    ignore_errors=True)`): it only cleans up after a refused run."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            as_path(path).rmtree(missing_ok=True)


def save_figure(fig: Any, path: PathLike, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure to `path` (any path this module takes), atomically (`write_atomic_with`), in the
    format named by the extension (the temporary file's own name has none)."""
    path = os.fspath(path)
    file_format = os.path.splitext(path)[1].lstrip(".") or None
    write_atomic_with(path, lambda target: fig.savefig(target, format=file_format, **savefig_kwargs))


__all__ = ["absolute_path", "append_text", "appending", "as_path", "dirname", "exists", "files_under", "glob",
           "is_local", "isdir", "join", "listdir", "makedirs", "read_bytes", "read_text", "readable", "remove", "rmtree",
           "save_figure", "write_atomic", "write_atomic_with"]
