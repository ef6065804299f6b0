"""Bounds-checked little-endian reads from the bytes of one file: every model reader refuses a truncated or lying
file with one line naming the file and what did not fit, never with a numpy or struct traceback."""
from __future__ import annotations

import struct

import numpy as np

from utils.cli import InputError


class Blob:
    def __init__(self, data: bytes, where: str):
        self.data, self.where = data, where

    def fail(self, message: str) -> InputError:
        return InputError(f"{self.where}: {message}")

    def _span(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise self.fail(f"truncated or corrupt: {what} needs bytes {offset}..{offset + size} of {len(self.data)}")

    def unpack(self, fmt: str, offset: int, what: str) -> tuple:
        fmt = "<" + fmt
        self._span(offset, struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.data, offset)

    def array(self, dtype, count: int, offset: int, what: str) -> np.ndarray:
        """`count` little-endian elements of `dtype` from `offset`, as a fresh (writable, native-order) array."""
        dtype = np.dtype(dtype).newbyteorder("<")
        self._span(offset, int(count) * dtype.itemsize, what)
        return np.frombuffer(self.data, dtype, int(count), offset).astype(dtype.newbyteorder("="))

    def bytes(self, offset: int, size: int, what: str) -> bytes:
        self._span(offset, size, what)
        return self.data[offset:offset + size]

    def text(self, offset: int, size: int, what: str) -> str:
        """A fixed-size, NUL-padded name field."""
        self._span(offset, size, what)
        return self.data[offset:offset + size].split(b"\0", 1)[0].decode("latin-1").strip()
