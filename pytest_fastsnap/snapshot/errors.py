"""The one exception of the snapshot reader, with a stable machine-readable name.

Names (``FormatError.name``) are part of the API: tests and the C reader compare
them.  See :mod:`pytest_fastsnap.snapshot.format` for when each one is raised.
"""

from __future__ import annotations

ERROR_NAMES: tuple[str, ...] = (
    "OPEN", "NOT_FILE",
    "MAGIC", "VERSION", "CONFIG", "RAM_SECTION", "TOTAL", "BLOCK_ID", "BLOCK_LENGTH",
    "HDR_VERSION", "PAGE_SIZE", "BITMAP_OFFSET", "PAGES_OFFSET", "PAGES_ALIGN", "OVERLAP",
    "TRUNCATED", "FOOTER", "RECORD", "EOF", "VMDESC",
    # libvirt save images (snapshot/libvirt.py)
    "LIBVIRT_PARTIAL", "LIBVIRT_HEADER", "LIBVIRT_VERSION", "LIBVIRT_DATA_LEN", "LIBVIRT_FORMAT",
    "LIBVIRT_COOKIE", "LIBVIRT_XML", "LIBVIRT_NOT_SPARSE",
)


class FormatError(ValueError):
    """A mapped-ram file broke a rule: ``name`` is stable, ``message`` explains.

    ``offset`` is the file offset of the offending bytes when known.
    """

    def __init__(self, name: str, message: str, offset: int | None = None) -> None:
        if name not in ERROR_NAMES:
            raise ValueError(f"unknown FormatError name {name!r}")
        self.name = name
        self.message = message
        self.offset = offset
        where = f" at {offset:#x}" if offset is not None else ""
        super().__init__(f"{name}: {message}{where}")

    def __reduce__(self) -> tuple[type[FormatError], tuple[str, str, int | None]]:
        return (FormatError, (self.name, self.message, self.offset))
