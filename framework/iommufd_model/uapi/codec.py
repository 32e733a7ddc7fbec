"""Byte codec for uAPI structs: attrs records that know their exact little-endian layout.

A struct is declared once, as an attrs class whose fields carry their C type; the same
declaration gives ``sizeof``, ``offsetof``, packing and unpacking, so the typed layer and the
raw-bytes dispatcher can never disagree about a layout.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import attrs

_C_TYPES = {
    "u8": "B",
    "u16": "H",
    "u32": "I",
    "s32": "i",
    "u64": "Q",
}


def _field(ctype: str, default: Any = 0) -> Any:
    return attrs.field(default=default, metadata={"ctype": ctype})


def u8(default: int = 0) -> Any:
    return _field("u8", default)


def u16(default: int = 0) -> Any:
    return _field("u16", default)


def u32(default: int = 0) -> Any:
    return _field("u32", default)


def s32(default: int = 0) -> Any:
    return _field("s32", default)


def u64(default: int = 0) -> Any:
    """``__aligned_u64`` (and ``__aligned_le64``): the model is little-endian throughout."""
    return _field("u64", default)


def raw(nbytes: int) -> Any:
    """An opaque byte array (``__u8 x[n]`` reserved tails, vendor words kept verbatim)."""
    return attrs.field(
        default=bytes(nbytes),
        converter=bytes,
        metadata={"ctype": f"{nbytes}s"},
    )


S = TypeVar("S", bound="UStruct")


class UStruct:
    """Base of every uAPI struct; subclasses are ``@ustruct`` attrs classes."""

    _layout: ClassVar[struct.Struct]
    _offsets: ClassVar[dict[str, tuple[int, int]]]
    #: the fields' values in C order, as a tuple (what ``pack`` packs)
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]
    SIZE: ClassVar[int]

    @classmethod
    def offsetof(cls, name: str) -> int:
        return cls._offsets[name][0]

    @classmethod
    def offsetofend(cls, name: str) -> int:
        off, size = cls._offsets[name]
        return off + size

    @classmethod
    def unpack(cls: type[S], data: bytes | bytearray | memoryview) -> S:
        """Decode exactly ``SIZE`` bytes (callers pad or cut before)."""
        values = cls._layout.unpack(bytes(data[: cls.SIZE]))
        return cls(*values)

    @classmethod
    def unpack_from(cls: type[S], data: bytes | bytearray | memoryview) -> S:
        """Decode the first ``SIZE`` bytes of ``data`` (at least that long)."""
        return cls(*cls._layout.unpack_from(data))

    def pack(self) -> bytes:
        return self._layout.pack(*type(self)._values(self))


T = TypeVar("T", bound=type)


def ustruct(cls: T) -> T:
    """Decorate an attrs class (already ``@attrs.define``) as a uAPI struct.

    Field order is C order. Every struct in iommufd.h pads explicitly with ``__reserved``
    fields, so natural alignment never inserts hidden padding; this is asserted here.
    """
    fmt = "<"
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for f in attrs.fields(cls):
        ctype = f.metadata["ctype"]
        code = _C_TYPES.get(ctype, ctype)
        size = struct.calcsize("<" + code)
        align = size if code in ("B", "H", "I", "i", "Q") else 1
        if pos % align:
            raise TypeError(f"{cls.__name__}.{f.name} is not naturally aligned")
        offsets[f.name] = (pos, size)
        fmt += code
        pos += size
    if pos % 8 and any(f.metadata["ctype"] == "u64" for f in attrs.fields(cls)):
        raise TypeError(f"{cls.__name__} needs tail padding to 8 bytes")
    layout = struct.Struct(fmt)
    names = [f.name for f in attrs.fields(cls)]
    # (a staticmethod: a plain function would bind to the instance)
    cls._values = staticmethod(  # type: ignore[attr-defined]
        operator.attrgetter(*names) if len(names) > 1 else lambda obj: (getattr(obj, names[0]),)
    )
    cls._layout = layout  # type: ignore[attr-defined]
    cls._offsets = offsets  # type: ignore[attr-defined]
    cls.SIZE = layout.size  # type: ignore[attr-defined]
    return cls
