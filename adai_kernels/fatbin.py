"""The CUDA architectures a shared library holds code for, read from its .nv_fatbin section
in plain Python (no CUDA tools): for `python -m adai_kernels` and the build tests."""
from __future__ import annotations

import struct
from pathlib import Path


def elf_section(data: bytes, name: str) -> bytes | None:
    """The contents of section `name` of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # name, type, flags, addr, offset, size, ...
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    strtab = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        start = strtab + h[0]
        if data[start:data.index(b"\0", start)].decode() == name:
            return data[h[4]:h[4] + h[5]]
    return None


def fatbin_entries(blob: bytes) -> set[tuple[str, int]]:
    """(kind, sm) of every entry of the fat binaries in an .nv_fatbin section: kind "elf" for
    a cubin, "ptx" for PTX. Layout (as cuobjdump reads it): containers with magic 0xBA55ED50,
    a 16-byte header (magic, version, header size, payload size), then entries whose header
    holds kind (u16 at 0: 1 PTX, 2 ELF), header size (u32 at 4), payload size (u64 at 8) and
    the sm version (u32 at 28)."""
    out, off = set(), 0
    while off + 16 <= len(blob):
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", blob, off)
        if magic != 0xBA55ED50:
            off += 8
            continue
        entry, end = off + hsize, off + hsize + fsize
        while entry + 32 <= end:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", blob, entry)
            arch, = struct.unpack_from("<I", blob, entry + 28)
            out.add(({1: "ptx", 2: "elf"}.get(kind, str(kind)), arch))
            if ehsize == 0:
                break
            entry += ehsize + psize
        off = end
    return out


def cubin_archs(path: str | Path) -> set[int]:
    """The sm versions of the cubins in the library at `path` (empty: none, or not ELF)."""
    section = elf_section(Path(path).read_bytes(), ".nv_fatbin")
    if section is None:
        return set()
    return {arch for kind, arch in fatbin_entries(section) if kind == "elf"}
