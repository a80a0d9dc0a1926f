"""Typed records for everything that crosses a socket: a dataclass with to_wire / from_wire.

protocol.py frames and validates; these records say what a message holds. ``to_wire()`` gives
the plain map protocol.py packs (nested records become maps, None stays None), and
``from_wire(map)`` builds a record from a decoded map, keeping only the fields it declares
(a newer peer may send more: minor versions add fields). Records are not validated here: client
requests are checked by protocol.py's field tables before they become records, and the worker
and the broker trust each other's records.
"""
import dataclasses
import functools
import typing


@functools.lru_cache(maxsize=None)
def _nested(cls):
    """{field name: (record class, is_list or is_dict)} for the fields that hold records."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Union:                      # Optional[X]
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        if isinstance(hint, type) and issubclass(hint, Record):
            out[name] = (hint, None)
        elif origin is list and args and isinstance(args[0], type) and \
                issubclass(args[0], Record):
            out[name] = (args[0], "list")
        elif origin is dict and len(args) == 2 and isinstance(args[1], type) and \
                issubclass(args[1], Record):
            out[name] = (args[1], "dict")
    return out


@functools.lru_cache(maxsize=None)
def _names(cls):
    return tuple(f.name for f in dataclasses.fields(cls))


def _out(value):
    if isinstance(value, Record):
        return value.to_wire()
    if isinstance(value, (list, tuple)):
        return [_out(v) for v in value]
    if isinstance(value, dict):
        return {k: _out(v) for k, v in value.items()}
    return value


class Record:
    """Base of every typed message record (subclasses are dataclasses)."""

    def to_wire(self):
        """The record as a plain map (what protocol.py packs)."""
        return {name: _out(getattr(self, name)) for name in _names(type(self))}

    @classmethod
    def from_wire(cls, data):
        """A record from a decoded map: declared fields only, nested records rebuilt."""
        nested = _nested(cls)
        kw = {}
        for name in _names(cls):
            if name not in data:
                continue
            value = data[name]
            if name in nested and value is not None:
                sub, kind = nested[name]
                if kind == "list":
                    value = [sub.from_wire(v) for v in value]
                elif kind == "dict":
                    value = {k: sub.from_wire(v) for k, v in value.items()}
                else:
                    value = sub.from_wire(value)
            kw[name] = value
        return cls(**kw)

    def replace(self, **changes):
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
