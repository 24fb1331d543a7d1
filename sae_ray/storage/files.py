"""Where a sweep's files live: a local directory or an object store, through `pyarrow.fs`.

A location is a plain string, either a local path or a URI (`s3://bucket/prefix`,
`gs://bucket/prefix`), so it can be handed to Ray Train and Tune (which take the same
strings) and to workers on other nodes. Credentials and endpoints come from the usual
environment (`AWS_*`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, instance roles):
nothing here invents its own.

Code that needs files on disk (Hugging Face loaders, safetensors, SQLite) asks for
`local_copy(location)`: the location itself when it is local, else a copy in this node's
cache, fetched once per node and shared by the processes on it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs
from filelock import FileLock

REMOTE_SCHEMES = ("s3", "gs", "gcs")
FETCHED = ".fetched"


def is_remote(location: str) -> bool:
    return urlparse(str(location)).scheme in REMOTE_SCHEMES


def check(location: str) -> str:
    """The location as stored in a config: a URI with a supported scheme, or a local path."""
    scheme = urlparse(location).scheme
    if scheme in REMOTE_SCHEMES:
        if not urlparse(location).netloc:
            raise ValueError(f"{location!r} names no bucket")
        return location.rstrip("/")
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ValueError(f"unsupported scheme {scheme!r} (use a local path, s3:// or gs://)")
    return location


def resolve(location: str) -> str:
    """A local location made absolute (relative paths mean the launching directory)."""
    if is_remote(location):
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    if is_remote(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location).joinpath(*parts))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), resolve(location)


def is_file(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def size(location: str) -> int | None:
    fs, path = filesystem(location)
    return fs.get_file_info(path).size


def listdir(location: str) -> list[str]:
    """Names directly under a directory location ([] if there is none)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_bytes(location: str, data: bytes) -> None:
    """Whole or not at all: an object PUT is atomic; a local file is renamed into place."""
    if is_remote(location):
        fs, path = filesystem(location)
        with fs.open_output_stream(path) as fh:
            fh.write(data)
        return
    path = Path(resolve(location))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def upload(local: Path, location: str) -> None:
    """Copy a local file or directory tree to a location (overwriting what is there)."""
    if local.is_file():
        write_bytes(location, local.read_bytes())
        return
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


def remove(location: str) -> None:
    """Delete a directory tree or file; a missing one is not an error."""
    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def sha256(path: Path) -> str:
    """A local file's digest, read in 1 MiB pieces (shards and weights can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("SAE_RAY_CACHE", "~/.cache/sae-ray")).expanduser()


def cache_dir(location: str) -> Path:
    digest = hashlib.sha256(location.encode()).hexdigest()[:20]
    return cache_root() / "remote" / digest


def local_copy(location: str) -> Path:
    """A directory location on this node's disk: itself if local, else a cached download.

    Only complete downloads are kept under their name, so a killed download is refetched.
    Callers must only pass locations that are no longer written (finished artifacts)."""
    if not is_remote(location):
        return Path(resolve(location))
    target = cache_dir(location)
    if (target / FETCHED).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / FETCHED).is_file():
            return target
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            fs, path = filesystem(location)
            if fs.get_file_info(path).type != pafs.FileType.Directory:
                raise FileNotFoundError(f"{location}: not found")
            tmp.mkdir()
            pafs.copy_files(path, str(tmp), source_filesystem=fs)
            (tmp / FETCHED).write_text(location)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def adopt(local: Path, location: str) -> Path:
    """Make a directory just uploaded to `location` its cached copy (no download back)."""
    target = cache_dir(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / FETCHED).is_file():
            shutil.rmtree(local, ignore_errors=True)
            return target
        (local / FETCHED).write_text(location)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(local), target)
    return target
