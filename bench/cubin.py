"""What the compiled CUDA kernels of a module are made of, read from its cubins with the
toolkit's tools (no GPU, no compiling): registers, stack, local and shared memory per kernel
and architecture, and the SASS of a kernel.

The tools are looked up in $CUDA_HOME/bin, then on PATH; cuobjdump also in Triton's NVIDIA
backend, which ships one. Kernel names are demangled with cu++filt, or with binutils'
c++filt (nvcc mangles device names the Itanium way).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


def find_tool(name: str) -> str | None:
    """The path of a CUDA tool (cuobjdump, ptxas, cu++filt, ...), or None."""
    homes = [h for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
    candidates = [os.path.join(h, "bin", name) for h in homes] + [shutil.which(name)]
    spec = importlib.util.find_spec("triton")  # found without importing triton
    if spec is not None and spec.submodule_search_locations:
        candidates.append(os.path.join(spec.submodule_search_locations[0], "backends",
                                       "nvidia", "bin", name))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _cuobjdump() -> str:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump is not in $CUDA_HOME/bin, on PATH or in triton")
    return tool


def demangler() -> str | None:
    return find_tool("cu++filt") or shutil.which("c++filt")


def tool_version(path: str) -> str:
    """A CUDA tool's release, as "release 13.0, V13.0.88"."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V[\d.]+", out)
    return m.group(0) if m else out.strip().splitlines()[-1]


def built_with(path: str | Path) -> list[str]:
    """The ptxas releases that made the cubins of `path` ("release 13.0, V13.0.88"), from
    their .note.nv.tkinfo."""
    out = subprocess.run([_cuobjdump(), "-elf", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return sorted(set(re.findall(r"Tool Version: .*?(release [\d.]+, V[\d.]+)", out)))


def demangle(names: list[str]) -> list[str]:
    tool = demangler()
    if tool is None or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def short_name(demangled: str) -> str:
    """'void adai::cuda::(anonymous namespace)::update_kernel<c10::BFloat16>(...)' ->
    'update_kernel<c10::BFloat16>': the kernel and its template arguments."""
    name = demangled.removeprefix("void ")
    depth = 0
    for i in range(len(name) - 1, -1, -1):  # drop the parameter list, the last (...)
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            name = name[:i]
            break
    base, sep, args = name.partition("<")
    return base.rsplit("::", 1)[-1] + sep + args


@dataclass
class Usage:
    arch: int          # 80 for sm_80
    mangled: str
    name: str          # short_name of the demangled name
    registers: int
    stack: int         # bytes per thread: the stack frame, where spills go
    local: int         # bytes per thread of local memory
    shared: int        # bytes per block of static shared memory (sm_90 cubins count
                       # the 1 KB per block the system reserves)


_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")


def resource_usage(path: str | Path) -> list[Usage]:
    """Every kernel of every cubin in `path` (a module, an object file or a cubin), from
    `cuobjdump --dump-resource-usage`."""
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(path)],
                         capture_output=True, text=True, check=True).stdout
    rows, arch, fn = [], None, None
    for line in out.splitlines():
        m = re.match(r"^arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = _FUNCTION.match(line)
        if m:
            fn = m.group(1)
            continue
        if fn is not None and "REG:" in line:
            f = dict(re.findall(r"(\w+):(\d+)", line))
            rows.append(Usage(arch, fn, "", int(f["REG"]), int(f["STACK"]), int(f["LOCAL"]),
                              int(f["SHARED"])))
            fn = None
    for row, full in zip(rows, demangle([r.mangled for r in rows])):
        row.name = short_name(full)
    return rows


def sass(path: str | Path, arch: int, mangled: str) -> str:
    """The SASS of kernel `mangled` in the sm_`arch` cubin of `path`."""
    return subprocess.run([_cuobjdump(), "-sass", "-arch", f"sm_{arch}", "-fun", mangled,
                           str(path)], capture_output=True, text=True, check=True).stdout


def global_accesses(sass_text: str) -> Counter:
    """Count of each global load / store mnemonic (LDG.E.128.STRONG.SM, STG.E.U16, ...)."""
    return Counter(re.findall(r"\b(?:LDG|STG)(?:\.[A-Z0-9_]+)*", sass_text))


def width(mnemonic: str) -> int:
    """Bits one thread moves with a global access: LDG.E.128.CONSTANT -> 128, STG.E.U16 ->
    16, LDG.E -> 32."""
    for part in mnemonic.split(".")[1:]:
        m = re.fullmatch(r"[US]?(8|16|32|64|128|256)", part)
        if m:
            return int(m.group(1))
    return 32
