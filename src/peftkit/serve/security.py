"""Safe by default: bearer keys, adapter folders confined to a root, safetensors-only weights.

Example:
    >>> folder = confined_adapter_dir(Path("/srv/adapters"), "outcome/v2")   # raises on escape
    >>> check_adapter_files(folder)                                          # safetensors, float dtypes
"""

from __future__ import annotations

import hmac
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..adapters import CONFIG_NAME, TRAIN_WROTE, WEIGHTS_NAME
from ..errors import AdapterError

INSIDE_ROOT = "give a folder inside the adapter root (relative to it)"
ADAPTER_DTYPES = {"F16", "BF16", "F32", "F64"}
"""Tensor dtypes an adapter file may hold; they are cast to the adapter layer's dtype on load."""


class AccessError(AdapterError):
    """A request names a path or key it may not use (answered with 403)."""


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Does an `Authorization: Bearer <key>` header carry `api_key`? (constant-time compare)"""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def confined_adapter_dir(root: Path, requested: str) -> Path:
    """The adapter folder `requested` (relative to `root`, or absolute inside it), resolved, symlinks followed.

    Refuses `..` components, and any folder or file whose real path lies outside the root.
    """
    if not requested or "\x00" in requested:
        raise AccessError(f"adapter path is empty or holds a NUL byte; {INSIDE_ROOT}")
    given = Path(requested)
    if ".." in given.parts:
        raise AccessError(f"adapter path {requested!r} contains '..'; {INSIDE_ROOT}")
    real_root = root.resolve(strict=True)
    candidate = given if given.is_absolute() else real_root / given
    try:
        folder = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):
        raise AdapterError(f"adapter path {requested!r}: no such folder under the adapter root") from None
    for path in (folder, folder / CONFIG_NAME, folder / WEIGHTS_NAME):
        if path.exists() and not path.resolve().is_relative_to(real_root):
            raise AccessError(f"adapter path {requested!r} leads outside the adapter root (symlink?); {INSIDE_ROOT}")
    if not folder.is_dir():
        raise AdapterError(f"adapter path {requested!r} is not a folder")
    return folder


def check_adapter_files(folder: Path) -> None:
    """The folder must hold adapter_model.safetensors (never a pickle) with floating-point tensors only."""
    weights = folder / WEIGHTS_NAME
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterError(f"{folder.name}: not an adapter folder (no {CONFIG_NAME}); {TRAIN_WROTE}")
    if not weights.is_file():
        raise AdapterError(f"{folder.name}: no {WEIGHTS_NAME}; the server loads safetensors only, never pickles")
    try:
        with safe_open(str(weights), framework="pt") as f:
            bad = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{folder.name}/{WEIGHTS_NAME}: unreadable safetensors file ({exc}); copy or save it again") from None
    bad = {key: dtype for key, dtype in bad.items() if dtype not in ADAPTER_DTYPES}
    if bad:
        key, dtype = next(iter(bad.items()))
        raise AdapterError(f"{folder.name}: tensor {key} has dtype {dtype}; adapters hold {sorted(ADAPTER_DTYPES)} only")
