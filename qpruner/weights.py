"""The pruned model's weights by location, not by value: what trials read their model from.

The driver saves the pruned model once (safetensors, ``results/<job>/pruned/``) and hands trials a
:class:`PrunedWeights` — a path or URI and the pruned model's identity, a few hundred bytes — instead of a
state dict through Ray's object store. A trial opens it with :func:`open_weights` and reads it one tensor at
a time (:class:`SafetensorsDir`), so it never holds the whole full-precision model: each decoder layer is
read, LoftQ-initialised and quantized before the next is read (:mod:`qpruner.build`).

Where the weights live:

* a local or shared path (the run's ``pruned/`` directory, or ``<search.storage_path>/pruned/<key>`` on a
  shared filesystem): read in place; a node that cannot see the path fails with a message that says so;
* a URI (``search.storage_path: s3://...``, ``gs://...``, any pyarrow filesystem): the driver uploads the
  directory once per pruned model (:func:`publish`); each node downloads it once into its local cache
  (``$QPRUNER_CACHE_DIR``, default ``~/.cache/qpruner``) and every trial on that node reads the copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError

logger = logging.getLogger(__name__)

COMPLETE_FILE = "qpruner_weights.complete"   # written last into a published or cached copy
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class PrunedWeights:
    """Where a pruned model's safetensors are (a directory path or a URI) and its identity: the prune key and the
    weights' content digest (:func:`digest`), ``<prune key>-<digest>``."""
    location: str
    key: str

    @property
    def is_uri(self) -> bool:
        return "://" in self.location

    def local_dir(self) -> Path:
        """A directory on this node holding the weights (downloaded into the node cache for a URI)."""
        if self.is_uri:
            return node_copy(self)
        path = Path(self.location)
        if not _has_weights(path):
            raise ModelError(f"the pruned model's weights are not at {path} on this node "
                             f"({os.uname().nodename}): on a multi-node cluster put results_dir on storage every node "
                             "mounts (NFS, EFS, GCS FUSE), or set search.storage_path to a shared path or a URI "
                             "(s3://..., gs://...) so that the driver publishes the weights there")
        return path


def cache_root() -> Path:
    """This node's cache of downloaded weights and LoftQ results (``$QPRUNER_CACHE_DIR``, else ~/.cache/qpruner)."""
    return Path(os.environ.get("QPRUNER_CACHE_DIR") or Path.home() / ".cache" / "qpruner").expanduser()


def _has_weights(path: Path) -> bool:
    return (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()


def _open(path: str):
    """A safetensors file opened to read with ``pread`` (safetensors >= 0.8), else memory-mapped (older versions)."""
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:   # no backend keyword: the memory-mapped reader (pages stay resident while tensors live)
        return safe_open(path, framework="pt")


def digest(directory: str | Path) -> str:
    """Content identity of a pruned model's weights: sha256 over its safetensors files (names and bytes). Caches and
    published copies are named by it, so a pruned model written again (``--force``, another version) never meets an
    entry made from the old one."""
    import hashlib
    h = hashlib.sha256()
    for path in sorted(Path(directory).glob("model*.safetensors")):
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


class SafetensorsDir:
    """Tensors of a ``save_pretrained`` directory (one file or shards), read one at a time.

    Tensors are read with ``pread`` into memory of their own (safetensors' ``pread`` backend), never memory-mapped:
    a mapping would keep every page it touched resident (and counted against the process) for as long as any
    tensor of the file lived, so a process reading a model tensor by tensor would still end up holding all of it."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self._file_of = {name: self.directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (self.directory / SINGLE_FILE).is_file():
            with _open(str(self.directory / SINGLE_FILE)) as fh:
                self._file_of = {name: self.directory / SINGLE_FILE for name in fh.keys()}
        else:
            raise ModelError(f"{self.directory} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")

    def keys(self):
        return self._file_of.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def get(self, name: str, default=None):
        return self[name] if name in self._file_of else default

    def read(self, names) -> dict[str, torch.Tensor]:
        """Several tensors at once (one open per file they are in)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            with _open(str(file)) as fh:
                for name in wanted:
                    out[name] = fh.get_tensor(name)
        return out


def open_weights(weights) -> "SafetensorsDir | dict":
    """A name -> tensor mapping of a trial's weights: a state dict as given (tests, benchmarks), or the pruned
    model's directory read lazily (:class:`PrunedWeights`)."""
    if isinstance(weights, PrunedWeights):
        return SafetensorsDir(weights.local_dir())
    if isinstance(weights, dict):
        return weights
    raise TypeError(f"trial weights must be a state dict or PrunedWeights, not {type(weights).__name__}")


# ----------------------------------------------------------------------------------------------
# publishing to shared storage, and the per-node copy


def published_location(storage_path: str, key: str) -> str:
    """Where the driver publishes a pruned model under ``search.storage_path`` (one folder per pruned model)."""
    return f"{storage_path.rstrip('/')}/pruned/{key}"


def publish(directory: str | Path, storage_path: str, key: str) -> PrunedWeights:
    """Copy the pruned model in ``directory`` to ``search.storage_path`` (a shared path or URI), once per
    pruned model: an existing complete copy is reused. Returns where trials find it."""
    import pyarrow.fs as pafs
    target = published_location(storage_path, key)
    fs, root = _filesystem(target)
    if fs.get_file_info(f"{root}/{COMPLETE_FILE}").type != pafs.FileType.NotFound:
        logger.info("the pruned model is already published at %s", target)
        return PrunedWeights(target, key)
    fs.create_dir(root, recursive=True)
    files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    logger.info("publishing the pruned model (%d files, %.2f GB) to %s", len(files), total / 1e9, target)
    local = pafs.LocalFileSystem()
    for p in files:   # each file under a temporary name, then renamed: a reader never sees half a file
        partial = f"{root}/.{p.name}.partial"
        pafs.copy_files(str(p.resolve()), partial, source_filesystem=local, destination_filesystem=fs)
        fs.move(partial, f"{root}/{p.name}")
    with fs.open_output_stream(f"{root}/{COMPLETE_FILE}") as out:   # last: a half-published copy is never used
        out.write(json.dumps({"key": key, "files": [p.name for p in files], "bytes": total}).encode())
    return PrunedWeights(target, key)


def _filesystem(location: str):
    import pyarrow.fs as pafs
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def node_copy(weights: PrunedWeights) -> Path:
    """This node's copy of published weights: downloaded once (under a lock, so concurrent trials on a node
    download once), into the node cache, complete or not at all."""
    import pyarrow.fs as pafs
    target = cache_root() / "weights" / weights.key
    if (target / COMPLETE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f"{weights.key}.lock"):
        if (target / COMPLETE_FILE).is_file():   # another trial of this node downloaded it meanwhile
            return target
        for stale in target.parent.glob(f".{weights.key}-*"):   # a download killed half-way (ours: under the lock)
            shutil.rmtree(stale, ignore_errors=True)
        fs, root = _filesystem(weights.location)
        if fs.get_file_info(f"{root}/{COMPLETE_FILE}").type == pafs.FileType.NotFound:
            raise ModelError(f"no complete pruned model at {weights.location} (its {COMPLETE_FILE} is missing)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{weights.key}-", dir=target.parent))
        try:
            logger.info("downloading the pruned model from %s to %s", weights.location, target)
            pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            if target.exists():   # an incomplete earlier copy (no COMPLETE_FILE): ours to replace
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
