"""Where each member of a tar file lies, read from its headers alone (the data between them is skipped).

A tar is a sequence of 512-byte headers, each followed by its member's data padded to 512 bytes, and
ends with zero blocks (POSIX.1-1988 ustar; POSIX.1-2001 pax 'x' headers and GNU 'L' long names carry
names longer than 100 bytes). Indexing a shard reads one block per member, which is what makes a
WebDataset listing cheap: ImageNet's 1.28M samples are about 2.6M members (image + label).
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.data.errors import DataError

BLOCK = 512


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of the member's data in the file
    size: int


def _number(field: bytes) -> int:
    """A header's numeric field: octal text, or GNU's base-256 for values too large for it."""
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    """The records ("LENGTH key=value\\n") of a pax extended header."""
    records, position = {}, 0
    while position < len(data):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        position += length
    return records


def tar_members(file, total: int, where: str, small: set[str] = frozenset()) -> tuple[list[Member], dict[str, bytes]]:
    """The regular-file members of the tar open as `file` (`total` bytes long), in file order, and the
    contents of those whose name ends with one of the extensions in `small` (labels, JSON).

    A header that claims more data than the file holds (a truncated member) or that is not a tar
    header is a DataError naming `where` and the member."""
    members, contents = [], {}
    position, long_name, pax = 0, None, {}
    while position + BLOCK <= total:
        file.seek(position)
        header = file.read(BLOCK)
        if len(header) < BLOCK:
            break
        if header.count(0) == BLOCK:  # the end-of-archive blocks
            return members, contents
        if header[257:262] != b"ustar" and _number(header[148:156]) != _checksum(header):
            raise DataError(f"{where}: not a tar file, or damaged at byte {position} (no tar header there)")
        kind = header[156:157]
        size = _number(header[124:136])
        start = position + BLOCK
        if start + size > total:
            name = long_name or pax.get("path") or _name(header)
            raise DataError(
                f"{where}: member {name!r} is truncated: its header gives {size} bytes, the file ends "
                f"{total - start} bytes after it"
            )
        if kind in (b"x", b"L"):
            file.seek(start)
            data = file.read(size)
            if kind == b"x":
                pax = _pax(data)
            else:
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            name = long_name or pax.get("path") or _name(header)
            size = int(pax.get("size", size))
            members.append(Member(name, start, size))
            if small and name.rsplit(".", 1)[-1].lower() in small:
                file.seek(start)
                contents[name] = file.read(size)
            long_name, pax = None, {}
        else:  # directories, links, global pax headers: nothing to index
            long_name, pax = None, {}
        position = start + (size + BLOCK - 1) // BLOCK * BLOCK
    if position < total or not members:
        raise DataError(
            f"{where}: the tar ends without its end-of-archive blocks (truncated)"
            if members
            else f"{where}: not a tar file, or an empty one"
        )
    return members, contents


def _name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def _checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:])
