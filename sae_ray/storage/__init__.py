"""Where things are kept: files on a local disk or in a bucket (`files`, whose functions are
this package's API: `storage.join`, `storage.read_bytes`, ...), the content-addressed
artifact store that trials share (`artifacts`), and the leases that let trials on different
nodes take turns computing one artifact in a bucket (`leases`). Imports nothing above it."""

from sae_ray.storage.files import (
    FETCHED,
    REMOTE_SCHEMES,
    adopt,
    cache_dir,
    cache_root,
    check,
    filesystem,
    is_dir,
    is_file,
    is_remote,
    join,
    listdir,
    local_copy,
    read_bytes,
    remove,
    resolve,
    sha256,
    size,
    upload,
    write_bytes,
)

__all__ = [
    "FETCHED",
    "REMOTE_SCHEMES",
    "adopt",
    "cache_dir",
    "cache_root",
    "check",
    "filesystem",
    "is_dir",
    "is_file",
    "is_remote",
    "join",
    "listdir",
    "local_copy",
    "read_bytes",
    "remove",
    "resolve",
    "sha256",
    "size",
    "upload",
    "write_bytes",
]
