"""Compile Triton kernels for sm_90 on a CPU (no GPU) and report their PTX and SASS instruction counts,
with a hash of each listing stripped of line info, so a change meant to leave a kernel's code alone can
be checked without a GPU: the same hashes before and after it mean the same machine code.

Usage (run without TRITON_INTERPRET, from the repository root):
    python -m tools.kernel_asm OUT.json [CASES.json]
CASES.json: [[case name, "module:kernel", {constexprs}, {pointer/float argument types}], ...]; arguments
not named are i32. Without it, every case of tests/ops/test_kernels_compile.py (named kernel#index). Constexprs the kernel lacks are dropped (a case list written before a parameter was
added still compiles). Pointers and strides get the 16-byte divisibility a launch finds (as
tests/ops/test_kernels_compile.py compiles them).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"


def compile_case(name: str, consts: dict, types: dict) -> triton.compiler.CompiledKernel:
    module, fn_name = name.split(":")
    fn = getattr(importlib.import_module(module), fn_name)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    # constexprs left out take their defaults, as a launch does
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    constexprs = {(i,): consts[n] for i, n in enumerate(fn.arg_names) if n in consts}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, p in enumerate(fn.params)
        if p.name not in consts
        and not p.do_not_specialize
        and (signature[p.name].startswith("*") or p.name.startswith("stride"))
    }
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32))


def ptx_instructions(ptx: str) -> list[str]:
    """The PTX instruction lines, without .loc/debug directives, labels, comments and declarations."""
    out = []
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        if not line or line.startswith((".", "}", "{", "$", "@$")) and line.endswith(":"):
            continue
        if line.startswith(".") or line in ("{", "}", ")", "(") or line.endswith(":"):
            continue
        out.append(line)
    return out


def sass_instructions(cubin: bytes) -> list[str]:
    """The SASS instructions of the cubin (nvdisasm), addresses and encodings dropped."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(_NVDISASM), "-c", f.name], capture_output=True, text=True, check=True
        ).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            out.append(m.group(1).strip())
    return out


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def main() -> None:
    if len(sys.argv) > 2:
        cases = json.loads(Path(sys.argv[2]).read_text())
    else:
        from tests.ops.test_kernels_compile import KERNELS  # noqa: PLC0415  (a dev tool: tests are there)

        cases = [
            [f"{name.split(':')[1]}#{i}", name, consts, types]
            for i, (name, consts, types) in enumerate(KERNELS)
        ]
    result = {}
    for case, name, consts, types in cases:
        kernel = compile_case(name, consts, types)
        ptx = ptx_instructions(kernel.asm["ptx"])
        sass = sass_instructions(kernel.asm["cubin"])
        result[case] = {
            "ptx": len(ptx),
            "sass": len(sass),
            "ptx_hash": _digest(ptx),
            "sass_hash": _digest(sass),
        }
        print(case, result[case], flush=True)
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
