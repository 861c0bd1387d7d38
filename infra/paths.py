"""Workdir paths: the one layer through which infra/ (and the workflows'
workdir files) joins, reads, writes, lists, moves and removes, for a local
directory and for object storage alike (`gs://bucket/...`, or any other
etils.epath scheme: `s3://`, `az://`, `hf://`).

- A local path keeps the behaviour it always had: made absolute (`resolve`),
  written through `<path>.tmp` and a rename (`write_text`: a reader never
  sees half a file), a new file created with O_EXCL (`create_new`).
- An object path goes through etils.epath, the library orbax opens the same
  paths with. A write of an object is atomic on object storage (readers see
  the old object or the new one), so `write_text` writes the object itself;
  a directory is a name prefix (`makedirs` makes nothing, an empty directory
  does not exist); an object cannot be appended to, so `open_log` keeps an
  in-memory copy and writes the whole object at each flush; `create_new` is
  a create-if-absent write, which GCS makes atomic (the `ifGenerationMatch=0`
  precondition, `ATOMIC_CREATE`).

Backend: unless `EPATH_USE_TF` is already set, it is set to "false" here, so
etils sends gs:// through gcsfs rather than TensorFlow's gfile: a training
process never loads TensorFlow for its paths, and gcsfs honours
`STORAGE_EMULATOR_HOST` (the tests' emulator). Credentials are gcsfs's
defaults (on a TPU VM: the VM's service account). Set `EPATH_USE_TF=true`
before start to keep gfile.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import shutil
import tempfile
from typing import Callable

# before etils first looks at the variable (at its first gs:// path)
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402  (after the variable above)

# schemes whose create-if-absent write is atomic: GCS refuses an upload with
# ifGenerationMatch=0 when the object exists (HTTP 412), which gcsfs raises as
# FileExistsError; fsspec's other filesystems may check and then write
ATOMIC_CREATE = ("file", "gs")


def is_remote(path: str) -> bool:
  """Whether `path` names object storage (`<scheme>://...`)."""
  return "://" in os.fspath(path)


def scheme(path: str) -> str:
  """"gs" for gs://..., "file" for a local path."""
  return os.fspath(path).split("://", 1)[0] if is_remote(path) else "file"


def resolve(path: str) -> str:
  """A local path made absolute; an object path as given (less a trailing /)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path: str, *names: str) -> str:
  """`path/name/...`; on object storage always with "/"."""
  path = os.fspath(path)
  if is_remote(path):
    return "/".join([path.rstrip("/"), *names])
  return os.path.join(path, *names)


def parent(path: str) -> str:
  """The directory holding `path` (os.path.dirname when local)."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/").rsplit("/", 1)[0]
  return os.path.dirname(path)


def _object(path: str) -> epath.Path:
  return epath.Path(path)


def exists(path: str) -> bool:
  return _object(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  """Whether `path` is a directory (on object storage: a prefix of objects)."""
  return _object(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """Makes the directory and its parents (nothing to make on object storage,
  where a directory exists once an object is written under it)."""
  if is_remote(path):
    _object(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names in directory `path` (sub-directories included)."""
  if is_remote(path):
    return [child.name for child in _object(path).iterdir()]
  return os.listdir(path)


def remove(path: str) -> None:
  """Removes the file (object) `path`; FileNotFoundError if absent."""
  if is_remote(path):
    _object(path).unlink()
  else:
    os.remove(path)


def move(source: str, destination: str) -> None:
  """Moves a file or a directory tree (on object storage: copied object by
  object, then deleted: not atomic, which no caller needs)."""
  if is_remote(source):
    _object(source).rename(destination)
  else:
    shutil.move(source, destination)


def read_text(path: str) -> str:
  """The file's text; FileNotFoundError if absent."""
  if is_remote(path):
    return _object(path).read_text()
  with builtins.open(path) as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    return _object(path).read_bytes()
  with builtins.open(path, "rb") as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes `text` atomically, making the parent directory: a local file
  through `<path>.tmp` and a rename, an object by one upload."""
  write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
  """`write_text` for bytes."""
  if is_remote(path):
    _object(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with builtins.open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def create_new(path: str, text: str) -> None:
  """Creates `path` holding `text` only if nothing is there; FileExistsError
  otherwise. Atomic for local files (O_EXCL) and on GCS (a create-if-absent
  upload); for other schemes see `ATOMIC_CREATE`."""
  if not is_remote(path):
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return
  # the filesystem instance etils keeps for this scheme (its listing cache
  # then sees the new object); fsspec's create mode, which gcsfs sends as
  # ifGenerationMatch=0 and whose HTTP 412 it raises as FileExistsError
  from etils.epath import backend
  backend.fsspec_backend.fs(path).pipe_file(path, text.encode(), mode="create")


def free_bytes(path: str) -> int | None:
  """Free bytes on the disk holding local directory `path`; None on object
  storage (no such figure)."""
  return None if is_remote(path) else shutil.disk_usage(path).free


def local_file(path: str, make: Callable[[str], object] | None = None) -> str:
  """A local file holding `path`'s content, for libraries that read and
  write only local files (SentencePiece). When `path` does not exist,
  `make(local path)` writes it first (None: FileNotFoundError). A local
  `path` is itself; an object is made in a local temporary directory and
  uploaded, then read from a copy downloaded into the temporary directory."""
  if not is_remote(path):
    if make is not None and not os.path.exists(path):
      make(path)
    return path
  if make is not None and not exists(path):
    with tempfile.TemporaryDirectory() as tmp:
      made = os.path.join(tmp, path.rsplit("/", 1)[-1])
      make(made)
      with builtins.open(made, "rb") as f:
        write_bytes(path, f.read())
  directory = os.path.join(tempfile.gettempdir(), "workdir-copies",
                           hashlib.sha1(path.encode()).hexdigest()[:12])
  os.makedirs(directory, exist_ok=True)
  local = os.path.join(directory, path.rsplit("/", 1)[-1])
  # a temporary name of its own: processes of one host may copy it at once
  with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:
    f.write(read_bytes(path))
  os.replace(f.name, local)
  return local


class _ObjectLog(io.RawIOBase):
  """A binary file that is only appended to, kept as one object: an object
  cannot be appended to, so the content lives here and `flush` writes all of
  it as the object again (a reader sees the content as of the last flush;
  fine for logs of KBs, as metrics and scalar summaries are)."""

  def __init__(self, path: str, content: bytes):
    super().__init__()
    self.path, self._content = path, bytearray(content)
    self._saved = None  # the length last written as the object

  def writable(self) -> bool:
    return True

  def write(self, data) -> int:
    self._content += data
    return len(data)

  def flush(self) -> None:  # close() flushes too: written only if grown
    if not self.closed and self._saved != len(self._content):
      write_bytes(self.path, bytes(self._content))
      self._saved = len(self._content)


def open_log(path: str):
  """A binary file to append to and flush (what a log needs): the local file
  itself opened "ab", or on object storage an `_ObjectLog` holding the
  object's content so far, which each flush writes whole."""
  if not is_remote(path):
    return builtins.open(path, "ab")
  return _ObjectLog(path, read_bytes(path) if exists(path) else b"")
