"""Strict parsing of `pipelines.yaml` into frozen dataclasses.

Every section of the YAML maps onto a frozen dataclass owned by the package that uses it.
`parse()` is the single place where YAML becomes typed config, so every error message has the same
shape: the dotted key path, what was found, and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A problem in the user's configuration, reported before any work starts."""


@dataclasses.dataclass(frozen=True)
class Resources:
    """Where a Ray Data step runs: set per stage in pipelines.yaml, used at the adapter's call site
    (_sigma.raystage.map_stage). Lives here so every package's config can use it without cycles."""

    batch_size: int = 32
    actors: int = 1  # actor-pool size for model-backed stages (ignored by plain functions)
    num_gpus: float = 0.0  # per actor
    num_cpus: float = 1.0  # per task / actor

    def __post_init__(self):
        if self.batch_size < 1 or self.actors < 1 or self.num_gpus < 0 or self.num_cpus <= 0:
            raise ConfigError("resources: batch_size and actors must be >= 1, num_gpus >= 0, num_cpus > 0")


# The precision of a model-backed stage: `auto` picks per device (_sigma.device.resolve_precision).
Precision = Literal["auto", "fp32", "fp16", "bf16"]


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: got {value!r}, allowed: {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: got {value!r}, allowed: {_type_name(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}, allowed: {_type_name(tp)}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: got {value!r}, allowed: a mapping")
        kt, vt = get_args(tp) or (Any, Any)
        # Stored as a plain dict inside a frozen dataclass; treat as read-only by convention.
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}, allowed: true | false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: got {value!r}, allowed: an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: got {value!r}, allowed: a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: got {value!r}, allowed: a string")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def parse(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a YAML mapping, strictly.

    Unknown keys are errors naming the key and the allowed ones; missing required keys are
    errors; `__post_init__` of `cls` may raise ConfigError for bad values.
    """
    name = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{name}: unknown key {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for fname, f in fields.items():
        key_where = f"{name}.{fname}" if name else fname
        if fname in data:
            kwargs[fname] = _convert(hints[fname], data[fname], key_where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_where}: required key is missing ({_type_name(hints[fname])})")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(name) else f"{name}.{msg}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config dataclass (for saving and fingerprints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def fingerprint(obj: Any) -> str:
    """Short stable hash of a config section; stored with outputs to decide what is done."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one
    silently, so a setting would be ignored without a word). Keys merged in with `<<:` and a key
    overriding a merged one are not duplicates: only the keys written in the mapping itself count."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key] + 1)
                    seen[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    continue
        return super().construct_mapping(node, deep)


def safe_load(text: str, where: str):
    """yaml.safe_load, refusing duplicated keys: ConfigError naming `where`:line and the key."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"{where}:{e.line}: duplicate key {e.key!r} (first at line {e.first}); "
                          "a mapping may set each key once") from None


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = safe_load(p.read_text(), str(p))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping with 'pipelines' (and 'training')")
    return data


def apply_overrides(data: dict, overrides: typing.Iterable[str], where: str = "") -> dict:
    """Apply `section.key=value` overrides (value parsed as YAML) to a nested dict copy."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = safe_load(raw, f"--set {item!r}")
        except yaml.YAMLError:
            value = raw
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {where}{p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def iter_path_fields(obj: Any, prefix: str = ""):
    """Yield (dotted_name, value) of every field marked metadata={'path': True} (a mapping of such
    paths, e.g. eval.rewards, yields each entry)."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        name = f"{prefix}.{f.name}" if prefix else f.name
        if f.metadata.get("path") and isinstance(val, dict):
            yield from ((f"{name}.{k}", v) for k, v in val.items() if v)
        elif f.metadata.get("path") and val:
            yield name, val
        elif dataclasses.is_dataclass(val):
            yield from iter_path_fields(val, name)


def looks_local(value: str) -> bool:
    """Hub ids look like 'org/name'; local paths start with '.', '/', '~', carry a file suffix, or
    have more than one '/' (a relative folder such as `models/tiny/t5`; hub ids are `org/name`)."""
    v = str(value)
    if "://" in v:
        return False
    return v.startswith((".", "/", "~")) or Path(v).suffix in {".pth", ".pt", ".bin", ".safetensors", ".json", ".model"} \
        or v.count("/") >= 2


def check_paths(obj: Any, prefix: str = "", base: Path | None = None) -> None:
    """Raise ConfigError listing every local model path that does not exist and every s3:// / gs://
    model URI that names no object or folder (one listing call each: nothing is downloaded)."""
    from _sigma import fetch

    missing = []
    for name, val in iter_path_fields(obj, prefix):
        if fetch.is_uri(val):
            try:
                found = fetch.exists(val)
            except OSError as e:  # credentials, endpoint, permissions: say so now, not in a worker
                missing.append(f"{name}: {val} cannot be listed ({str(e).splitlines()[0][:200]})")
                continue
            if not found:
                missing.append(f"{name}: {val} does not exist (no such object, nor objects under it)")
        elif "://" in str(val):
            missing.append(f"{name}: {val}: unsupported scheme; use a local path, a hub name, s3:// or gs://")
        elif looks_local(val) and not resolve_path(val, base).exists():
            missing.append(f"{name}: {val} does not exist")
    if missing:
        hint = " (build the tiny offline models with `make models`)" if any("tiny" in m for m in missing) else ""
        raise ConfigError("missing model paths: " + "; ".join(missing) + hint)


def resolve_path(value: str, base: Path | None = None) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() or base is None else base / p


REDACTED = "<redacted>"


def redact(obj: Any, key: str = "") -> Any:
    """Plain data with the values of every environment-variable mapping (keys named `env`,
    `*_env`, `env_vars` or `*_env_vars`) replaced by REDACTED: they carry tokens and passwords."""
    if isinstance(obj, dict):
        if key == "env" or key.endswith(("_env", "env_vars")):
            return {k: REDACTED for k in obj}
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, key) for v in obj]
    return obj


def add_config_args(ap, set_help: str = "override a config key (repeatable)"):
    """--config (the pipelines.yaml file) and --set (-> args.overrides): every CLI that reads it."""
    ap.add_argument("--config", default="pipelines.yaml", help="pipelines.yaml to read (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=set_help)
    return ap


def save_resolved(cfg: Any, output_dir: str | os.PathLike, name: str = "config.resolved.yaml", extra: dict | None = None) -> str:
    """Write the resolved config beside an output (local folder or URI), atomically; returns its path.
    Environment-variable mappings are written with their values redacted (see `redact`)."""
    from _sigma import fs

    doc = {"resolved": redact(to_dict(cfg))}
    if extra:
        doc.update(redact(extra))
    target = fs.join(fs.normalize(output_dir), name)
    fs.write_text(target, yaml.safe_dump(doc, sort_keys=False))
    return target
