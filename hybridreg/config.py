"""Typed configs: strict conversion between nested dataclasses and YAML/dicts.

Unknown keys, wrong types and invalid values raise ``ValueError`` naming the offending
key path (e.g. ``config.objective.w_reg``), so a typo in a YAML file is never ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import json
import math
import os
import re
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any, Iterator, Type, TypeVar

import yaml

__all__ = ["from_dict", "to_dict", "existing_file", "apply_overrides", "load_yaml", "read_yaml", "dump_yaml", "atomic_output", "atomic_write_text", "bounded",
           "check_bounds", "bounds_table"]

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-6`` (an exponent without a dot) is the
    number, not the string that PyYAML's YAML 1.1 rules make of it, so ``--set
    objective.lncc_eps=1e-6`` and ``lncc_eps: 1e-6`` read as written."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{where} must have {len(args)} items, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: Type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; missing keys keep defaults.

    Raises:
        ValueError: ``data`` is not a mapping, has unknown keys, or a value has the wrong
            type or is rejected by the dataclass's own validation. The message names the
            key path starting at ``where``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    missing = sorted(f.name for f in fields.values() if f.init and f.name not in kwargs
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:  # cls(**kwargs) would raise a TypeError naming no file or key
        raise ValueError(f"{where}: missing key(s) {missing}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def bounded(default: Any, low: float, high: float, *, factory: bool = False) -> Any:
    """A dataclass field whose number (or every number of its tuple) must lie in
    ``[low, high]``: the documented range of a setting, checked by :func:`check_bounds`
    before any work so that no value can take the machine's time or memory.
    ``factory``: ``default`` is a zero-argument callable (for tuple defaults)."""
    meta = {"range": (low, high)}
    return dataclasses.field(default_factory=default, metadata=meta) if factory else \
        dataclasses.field(default=default, metadata=meta)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_bounds(obj: Any) -> None:
    """Check every :func:`bounded` field of dataclass instance ``obj``; a list given for a
    field whose default is a tuple (``dataclasses.replace(cfg, iterations=[30, 20])`` in Python,
    as ``--set iterations=[30,20]`` gives on the command line) is stored as that tuple.

    Raises:
        ValueError: ``ClassName: `field` must be in [low, high], got value`` for a number
            out of range or NaN.
    """
    for f in dataclasses.fields(obj):
        if "range" not in f.metadata:
            continue
        low, high = f.metadata["range"]
        value = getattr(obj, f.name)
        if isinstance(value, list) and f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), tuple):
            value = tuple(value)
            object.__setattr__(obj, f.name, value)  # frozen dataclasses too
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise ValueError(f"{type(obj).__name__}: `{f.name}` must be in [{_num(low)}, {_num(high)}], got {value!r}")


def bounds_table(*classes: type) -> str:
    """A Markdown table of every bounded setting of ``classes`` (default, range), for the docs."""
    rows = ["| setting | default | range |", "|---|---|---|"]
    for cls in classes:
        for f in dataclasses.fields(cls):
            if "range" in f.metadata:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append(f"| `{cls.__name__}.{f.name}` | {to_dict(default)} | [{_num(f.metadata['range'][0])}, {_num(f.metadata['range'][1])}] |")
    return "\n".join(rows)


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) → plain dict/list structure suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):  # a copy: the caller may edit it (apply_overrides) without touching ``obj``
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def mapping_key(node: dict, part: str) -> Any:
    """The key of ``node`` that one part of a dotted config key names: the integer ``part``
    spells when ``node`` is a label mapping (its keys all integers, or none yet: a label → λ
    mapping such as ``region_lambda.17``; a config's fields are never integers), else ``part``
    itself. The one reading of dotted keys, for ``--set`` and the tuner's search spaces."""
    label = part.isascii() and part.isdigit() and all(isinstance(k, int) for k in node)
    return int(part) if label else part


def apply_overrides(obj: T, overrides: typing.Sequence[str], *, arg: str = "--set") -> T:
    """``obj`` (a config dataclass) with ``KEY=VALUE`` overrides applied, e.g.
    ``objective.w_reg=2.5`` or ``iterations=[100,50,20,1]``: the one override syntax of every
    config key (``--set`` on the CLI). ``KEY`` is a dotted path of field names; ``VALUE`` is read
    as YAML (numbers, ``true``, ``[a, b]``, strings), then the whole config is converted and
    validated again as if read from a file. A label of a mapping field is an integer part
    (``region_lambda.17=0.3``, :func:`mapping_key`), and may be new.

    Raises:
        ValueError: no ``=``, an unknown key (the message lists the valid ones), or a value of
            the wrong type or out of its range; the message names ``arg`` and the key.
    """
    data = to_dict(obj)
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"`{arg}` takes KEY=VALUE (e.g. objective.w_reg=2.5), got {item!r}")
        try:
            value = _load(text)
        except yaml.YAMLError:
            raise ValueError(f"`{arg} {key}`: cannot read the value {text!r}") from None
        node, parts = data, key.split(".")
        for i, part in enumerate(parts):
            k = mapping_key(node, part) if isinstance(node, dict) else part
            last = i == len(parts) - 1
            if not isinstance(node, dict) or (k not in node and not (last and isinstance(k, int))):
                where = ".".join(parts[:i]) or "the config"
                valid = sorted(node, key=str) if isinstance(node, dict) else []
                raise ValueError(f"`{arg} {key}`: {where} has no key {part!r}; valid keys are {valid}")
            if last:
                node[k] = value
            else:
                node = node[k]
    return from_dict(type(obj), data, where=arg)  # the dataclasses check their own ranges


def load_yaml(path: str | os.PathLike, cls: Type[T], *, arg: str = "config") -> T:
    """Read YAML file ``path`` into dataclass ``cls``.

    Raises:
        FileNotFoundError: the file does not exist (message names ``arg``).
        ValueError: the file is not valid YAML or does not fit ``cls``.
    """
    return from_dict(cls, read_yaml(path, arg=arg), where=arg)


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
"""The example configs shipped with hybridreg (in the wheel; the repository's ``configs/`` links here)."""


def shipped_config(path: str | os.PathLike) -> Path | None:
    """The shipped copy of a config that ``path`` names but that is not there, else ``None``.

    A relative ``NAME.yaml`` or ``configs/NAME.yaml`` that does not exist, where ``NAME.yaml`` is
    one of :data:`SHIPPED_CONFIGS`, names that copy: the README's and the docs' commands
    (``--config configs/instance_map.yaml``) then run the same from any folder after a ``pip``
    install, where no ``configs/`` folder is at hand. A path that exists is always the user's file.
    """
    p = Path(path)
    if p.is_absolute() or p.parent not in (Path("."), Path("configs")) or p.suffix not in (".yaml", ".yml"):
        return None
    try:
        if p.exists():
            return None
    except OSError:  # a name too long, a folder that cannot be read: the reader reports it
        return None
    copy = SHIPPED_CONFIGS / p.name
    return copy if copy.is_file() else None


def among_outputs(path: str | os.PathLike, folder: str | os.PathLike, names: typing.Iterable[str]) -> bool:
    """Whether ``path`` is one of the files ``names`` (``fnmatch`` patterns, e.g.
    ``checkpoint_*.pt``) that a run writes in ``folder``: by its own name there, or by the file it
    links to (a run would replace the link, or write through it)."""
    p, folder = Path(path), Path(folder).resolve()
    names = tuple(names)

    def named(q: Path) -> bool:
        return q.parent == folder and any(fnmatch.fnmatchcase(q.name, n) for n in names)

    return named(p.absolute().parent.resolve() / p.name) or named(p.resolve())


def existing_file(path: str | os.PathLike, arg: str, what: str = "file") -> Path:
    """``path`` as a ``Path`` if it is a file (or a link to one).

    Raises:
        FileNotFoundError: nothing there. ValueError: a folder or another non-file. Both name
            ``arg`` and say what was expected (``what``: "file", "manifest", ...).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"`{arg}`: {what} not found: {p}")
    if not p.is_file():
        raise ValueError(f"`{arg}`: {p} is {'a folder' if p.is_dir() else 'not a regular file'}, not a {what}")
    return p


def read_yaml(path: str | os.PathLike, *, arg: str = "config") -> Any:
    """Parse YAML file ``path``.

    Raises:
        FileNotFoundError: the file does not exist. ValueError: not UTF-8 text or not valid
            YAML (one line). Messages name ``arg``.
    """
    p = existing_file(path, arg, "YAML file")
    try:
        return _load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"`{arg}`: {p} is not a UTF-8 text file (a YAML config was expected)") from None
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"`{arg}`: {p} is not valid YAML: {msg}") from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes, so writers that pick the
    format from the name still work); on success it is renamed onto ``path``, on any error
    it is removed. Every file the toolkit writes goes through here (an image with a detached
    header, ``.mhd``/``.nhdr``, through a hidden folder: :func:`hybridreg.io.write_image`), so a
    failed or killed run never leaves a half-written file under the final name.

    Raises:
        OSError: ``ENOSPC`` naming ``path`` where the disk is full, whatever the writer raised
            (HDF5 and ``torch.save`` raise ``RuntimeError``); the writer's own error otherwise.
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name.split('.')[0]}.", suffix="".join(p.suffixes) or ".tmp")
    os.close(fd)
    try:
        with full_disk_named(p):  # judged while the cut file still holds the space that is missing
            yield Path(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
            os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_BELOW_BYTES = 1 << 20


@contextlib.contextmanager
def full_disk_named(path: str | os.PathLike) -> Iterator[None]:
    """Turn an error raised while writing ``path`` into ``OSError`` ENOSPC naming ``path`` where
    the disk is full: the error's own errno says so (ENOSPC, EDQUOT: a quota), or the file system
    has under 1 MiB left for unprivileged users (HDF5 and ``torch.save`` raise ``RuntimeError``
    there). Other errors pass unchanged.

    Raises:
        OSError: ``ENOSPC``, from the writer's error.
    """
    try:
        yield
    except Exception as e:
        if getattr(e, "errno", None) in _DISK_FULL or disk_full(Path(path).parent):
            raise OSError(errno.ENOSPC, f"no space left on the device: cannot write {path}") from e
        raise


def disk_full(folder: str | os.PathLike) -> bool:
    """Whether the file system of ``folder`` has under 1 MiB left for unprivileged users
    (``shutil.disk_usage().free``; a per-user quota is recognised by its errno instead,
    :func:`full_disk_named`)."""
    try:
        return shutil.disk_usage(folder).free < _FULL_BELOW_BYTES
    except OSError:
        return False


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # not the locale's: Windows' cp1252 and a C locale cannot hold λ


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON ``null``): a metric that
    cannot be computed (e.g. HD95 of a structure missing after warping) is never a NaN number."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (a non-finite number as ``null``: :func:`json_safe`), indented,
    atomically (:func:`atomic_output`): the one writer of the result files (``metrics.json``,
    ``summary.json``, ``history.json``, ``pareto.json``). Raises ``OSError`` if ``path``'s folder
    cannot be written, ``TypeError`` for an object JSON cannot hold."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False))


def dump_yaml(obj: Any, path: str | os.PathLike, header: str = "") -> None:
    """Write a dataclass (nested dataclasses become YAML mappings and tuples lists:
    :func:`to_dict`) or a plain structure to ``path`` as YAML, atomically (:func:`atomic_output`:
    a reader never sees a half-written file), after ``header``'s lines as YAML comments. Raises
    ``OSError`` if ``path``'s folder cannot be written."""
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    atomic_write_text(path, comments + yaml.safe_dump(to_dict(obj), sort_keys=False))
