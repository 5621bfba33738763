"""What a Triton-built cubin holds, read with the NVIDIA tools Triton ships (no GPU, no torch): the
path of such a tool, a build's registers and spill memory, and its SASS.

    from benchmarks.cubin_tools import resources, sass
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton


def nvidia_bin(name: str) -> Path:
    """The path of ``name`` (cuobjdump, ptxas, nvdisasm) in Triton's NVIDIA backend."""
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _cuobjdump(cubin: bytes, flag: str) -> str | None:
    """``cuobjdump <flag>`` on ``cubin``: its stdout and stderr, or None where Triton ships no cuobjdump."""
    tool = nvidia_bin("cuobjdump")
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(cubin)
        binary.flush()
        run = subprocess.run([str(tool), flag, binary.name], capture_output=True, text=True)
    return run.stdout + run.stderr


def resources(cubin: bytes) -> str:
    """Registers, stack and local (spill) memory per thread of ``cubin`` ("REG:.. STACK:.. SHARED:..
    LOCAL:.."), or why there is no report."""
    report = _cuobjdump(cubin, "-res-usage")
    if report is None:
        return "no cuobjdump"
    usage = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", report)
    return usage.group(0) if usage else report.strip()[-200:]


def sass(cubin: bytes) -> str:
    """The SASS of ``cubin`` as text ("" where Triton ships no cuobjdump)."""
    return _cuobjdump(cubin, "-sass") or ""
