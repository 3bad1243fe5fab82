"""The single table of input formats: every module of this package that defines ``FORMAT`` (a ShardFormat).

Planning (which format a file name implies), reading (which reader a shard needs), the command line's ``--format``
choices and :class:`pipeline.config.JobConfig`'s check all consult this table, so adding a format is adding one
module here. Modules are found on disk rather than listed, for that reason.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from pipeline.sources.base import ShardFormat

# Modules of the package that hold shared machinery, not a format.
_NOT_FORMATS = frozenset({"base", "listing", "ranged", "registry"})


@functools.cache
def formats() -> dict[str, ShardFormat]:
    """``{name: format}`` for every format module, sorted by name."""
    import pipeline.sources as package

    found: dict[str, ShardFormat] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        if module_info.name in _NOT_FORMATS or module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        fmt = getattr(module, "FORMAT", None)
        if isinstance(fmt, ShardFormat):
            if fmt.name in found:
                raise RuntimeError(f"two input format modules claim the name {fmt.name!r}")
            found[fmt.name] = fmt
    return dict(sorted(found.items()))


def format_names() -> tuple[str, ...]:
    return tuple(formats())


def get_format(name: str) -> ShardFormat:
    try:
        return formats()[name]
    except KeyError:
        raise ValueError(f"unknown input format {name!r}; expected one of {', '.join(format_names())}") from None


def format_of_name(name: str) -> str | None:
    """The format a file name implies (``"webdataset"``, ``"parquet"``, ``"images"``), or None."""
    for fmt in formats().values():
        if fmt.claims(name):
            return fmt.name
    return None
