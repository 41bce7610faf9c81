"""Node parameters from a dataclass: one declaration style for every node of the suite.

Each node describes its parameters as a ``@dataclass`` whose fields carry the defaults and whose
``Attributes:`` docstring section documents them (units included); :func:`declare_params`
declares every field on the node, reads the values back typed and validates them::

    @dataclass
    class MyParams:
        '''Attributes:
            map_path: map directory (required).
            wait_s: longest wait for a message, s.
            encoder: ``encoder.*``: :class:`~vpr_localizer.models.encoder.EncoderConfig`.
        '''
        map_path: str = ""
        wait_s: float = 0.2
        encoder: EncoderConfig = field(default_factory=EncoderConfig)

        def validate(self) -> None:  # optional; called on the values read back
            if not self.map_path:
                raise MapError("parameter map_path is empty")

    p = declare_params(node, MyParams)   # p.wait_s is a float, p.encoder an EncoderConfig

Rules (the same for every node):

* A field whose type is a dataclass is a section: its fields become ``<field>.<name>``
  parameters (``encoder.backbone`` ...; the ROS 2 parameter YAML nests them). Its default comes
  from the field's default instance (e.g. ``field(default_factory=lambda: EncoderConfig(pca_dim=0))``).
* ROS parameters cannot be None: an ``Optional[str]`` field is declared ``""`` ("unset") and
  ``""`` reads back as None.
* ``float`` and ``int`` fields are declared with dynamic typing, so YAML may write ``0`` for a
  float; they read back as ``float`` / ``int`` (an ``int`` field accepts an integral float).
  Anything else (a string, a bool, ``1.5`` for an int) raises :class:`ConfigError`.
* ``bool``, ``str`` and array (``Tuple[int, int]``, ``List[float]`` ...) fields are statically
  typed by their default: a value of another type is rejected by rclpy
  (``ParameterException``), fatal at start-up like a :class:`ConfigError`. A fixed-length tuple
  must have its length (``encoder.image_size: [W, H]``).
* The parameter descriptions (``ros2 param describe``) are the ``Attributes:`` entries.
* The dataclass is built with the values read back (its ``__post_init__`` runs), then its
  ``validate()`` method, when it has one, is called (sections first). ``TypeError`` /
  ``ValueError`` from either become a :class:`ConfigError` naming the section; a
  :class:`~vpr_localizer.errors.VprError` passes through unchanged.
"""
from __future__ import annotations

import re
import types
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar, Union, get_args, get_origin, get_type_hints

from rcl_interfaces.msg import ParameterDescriptor

from vpr_localizer.errors import ConfigError, VprError

T = TypeVar("T")

_ATTR_LINE = re.compile(r"^(\s*)([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_][\w]*)*)\s*:\s*(.*)$")


def field_docs(cls) -> Dict[str, str]:
    """Field name -> its description from the ``Attributes:`` section of ``cls``'s docstring.

    Entries are ``name: text`` (or ``x, y: text`` for several fields), continued on more
    deeply indented lines; fields without an entry are absent.
    """
    doc = (cls.__doc__ or "").expandtabs().splitlines()
    out: Dict[str, str] = {}
    start = next((i for i, ln in enumerate(doc) if ln.strip() == "Attributes:"), None)
    if start is None:
        return out
    section_indent = len(doc[start]) - len(doc[start].lstrip())
    entry_indent: Optional[int] = None
    names: List[str] = []
    for ln in doc[start + 1:]:
        if not ln.strip():
            continue
        indent = len(ln) - len(ln.lstrip())
        if indent <= section_indent:
            break
        m = _ATTR_LINE.match(ln)
        if m and (entry_indent is None or indent == entry_indent):
            entry_indent = indent
            names = [n.strip() for n in m.group(2).split(",")]
            for n in names:
                out[n] = m.group(3).strip()
        elif names and entry_indent is not None and indent > entry_indent:
            for n in names:
                out[n] = f"{out[n]} {ln.strip()}".strip()
    return out


# --- field kinds ------------------------------------------------------------------------------

def _kind(hint: Any, default: Any) -> Tuple[str, Any]:
    """(kind, element types) of a field: bool, int, float, str, optional_str, tuple, list, section."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] is str:
            return "optional_str", None
        raise TypeError(f"unsupported optional parameter type {hint!r} (only Optional[str]: '' = unset)")
    if origin in (tuple, list):
        return ("tuple" if origin is tuple else "list"), get_args(hint)
    if isinstance(hint, type):
        if is_dataclass(hint):
            return "section", None
        for kind in (bool, int, float, str):  # bool before int (bool is an int)
            if issubclass(hint, kind):
                return kind.__name__, None
        if issubclass(hint, (tuple, list)):
            return ("tuple" if issubclass(hint, tuple) else "list"), ()
    if default is None:
        return "optional_str", None
    if hint is Any or hint is None:
        return _kind(type(default), default)
    raise TypeError(f"unsupported parameter type {hint!r}")


def _hints(cls) -> Dict[str, Any]:
    try:
        return get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotation: fall back to the defaults' types
        return {}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _ros_default(kind: str, value: Any) -> Any:
    if kind == "optional_str":
        return "" if value is None else str(value)
    if kind in ("tuple", "list"):
        return list(value)
    if kind == "float":
        return float(value)
    return value


def _element(name: str, elem_type: Any, v: Any) -> Any:
    if elem_type is float:
        return float(v)
    if elem_type is int:
        if isinstance(v, float) and not v.is_integer():
            raise ConfigError(f"parameter {name} must hold integers, got {v!r}")
        return int(v)
    return v


def _coerce(name: str, kind: str, elems: Any, v: Any) -> Any:
    """The value of a declared parameter as the field's type (see module doc)."""
    if kind in ("float", "int"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"parameter {name} must be a number, got {v!r}")
        if kind == "float":
            return float(v)
        if isinstance(v, float) and not v.is_integer():
            raise ConfigError(f"parameter {name} must be an integer, got {v!r}")
        return int(v)
    if kind == "optional_str":
        return v or None
    if kind in ("tuple", "list"):
        seq = list(v)
        if kind == "tuple" and elems and Ellipsis not in elems:
            if len(seq) != len(elems):
                raise ConfigError(f"parameter {name} must have {len(elems)} values, got {len(seq)}")
            return tuple(_element(name, t, e) for t, e in zip(elems, seq))
        t = elems[0] if elems else None
        seq = [_element(name, t, e) for e in seq]
        return tuple(seq) if kind == "tuple" else seq
    return v


# --- declaring and reading ---------------------------------------------------------------------

def declare_params(node, cls: Type[T], prefix: str = "", defaults: Optional[T] = None) -> T:
    """Declare every field of the dataclass ``cls`` as a parameter of ``node``, read them back.

    Values from a params file or ``-p name:=value`` win over the defaults (rclpy's overrides).

    Args:
        node: the rclpy node.
        cls: a dataclass; every field (``init=True``) needs a default (or default factory).
        prefix: section prefix of every parameter name (``"encoder"`` -> ``encoder.backbone``).
        defaults: an instance whose values are the defaults (default ``cls()``).

    Returns:
        An instance of ``cls`` with the parameters' values, validated (see module doc).

    Raises:
        ConfigError: a value of the wrong type, or ``cls`` / its ``validate()`` rejects it.
        VprError: raised by ``validate()`` (e.g. :class:`MapError` for an empty ``map_path``).
        rclpy.exceptions.ParameterException: a value whose type rclpy rejects (static types).
        TypeError: ``cls`` is not a dataclass, or a field has no default or an unsupported type
            (programming errors).
    """
    if not (is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    base = cls() if defaults is None else defaults
    hints, docs = _hints(cls), field_docs(cls)
    values: Dict[str, Any] = {}
    for f in fields(cls):
        if not f.init:
            continue
        if f.default is MISSING and f.default_factory is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} has no default: every node parameter needs one")
        default = getattr(base, f.name)
        name = _join(prefix, f.name)
        kind, elems = _kind(hints.get(f.name, type(default)), default)
        if kind == "section":
            values[f.name] = declare_params(node, type(default), name, default)
            continue
        descriptor = ParameterDescriptor(description=docs.get(f.name, ""),
                                         dynamic_typing=kind in ("int", "float"))
        node.declare_parameter(name, _ros_default(kind, default), descriptor)
        values[f.name] = _coerce(name, kind, elems, node.get_parameter(name).value)
    where = f"{prefix} parameters" if prefix else "parameters"
    try:
        out = cls(**values)
        validate = getattr(out, "validate", None)
        if callable(validate):
            validate()
    except VprError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return out
