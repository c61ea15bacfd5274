"""Lint of compiled Triton kernels for Hopper (sm_90): reads the PTX, the cubin's resource usage
and the launch metadata of one compiled variant and names what would waste the GPU.

Checks (each a string in the returned list when it fails):

- ``wgmma``: a kernel with a 16-bit or TF32 ``tl.dot`` must issue ``wgmma.mma_async`` (else it
  runs on the Ampere ``mma.sync`` path or FMA units: 2x or worse below the tensor-core roof).
- ``spill``: no stack frame and no local memory (ptxas spills go to local memory, ~500 cycles per
  miss instead of a register read). A stack frame that no instruction touches (no ``STL``/``LDL``
  in the SASS) is not a spill: the NVPTX backend sometimes leaves a dead ``__local_depot`` in the
  PTX (2 bytes, never addressed, in the stride-2 dgrad), which ptxas turns into an 8 B frame.
- ``sync-load``: no dot operand loaded outside the asynchronous pipeline. Inside the main loop, a
  value that a plain ``ld.global`` returns and that reaches a ``st.shared`` or a ``wgmma`` operand
  through data movement only (mov, cvt, prmt, selp, bit packing) is a synchronous copy from global
  memory into the MMA's operand: the loop waits for DRAM latency every iteration instead of
  ``cp.async``/TMA filling stages ahead. Values that go through arithmetic first (the BN prologue's
  per-channel scale and shift: ``fma``) are not operands and are not flagged.
- ``wait0``: no ``wgmma.wait_group 0`` inside a main loop: waiting for every MMA in flight before
  issuing the next serialises loads and MMAs (the pipeline then overlaps nothing).
- ``occupancy``: registers and shared memory allow the CTAs per SM the config intends:
  ``regs * 32 * num_warps * ctas <= 65536`` and ``(smem + 1 KiB) * ctas <= 228 KiB`` (sm_90: 64 Ki
  registers and 228 KiB shared memory per SM, 1 KiB of it reserved per CTA).

Finding the loops in PTX: LLVM lays a loop out as a contiguous run of basic blocks, from its
header label to the block that branches back to it. So every branch ``bra $L__BBx_y`` whose label
is defined *above* the branch is a back edge, and the lines between the label and the branch are
that loop's body (nested loops give nested intervals). A *main loop* is a loop whose body issues an
MMA (``wgmma.mma_async`` or ``mma.sync``); the epilogue's final ``wait_group 0`` lies after the
last back edge and is therefore outside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SM90_REGS = 65536
SM90_SMEM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024

_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;")
_REG = re.compile(r"%[a-z]+[0-9]+")
_PRED = re.compile(r"^@!?%p[0-9]+\s+")
_MMA = ("wgmma.mma_async", "mma.sync")
# Opcodes that move bits without computing on them: a synchronous load reaching shared memory or
# an MMA through these is the operand itself.
_MOVES = ("mov", "cvt", "prmt", "selp", "and", "or", "shl", "shr", "bfe", "bfi")


@dataclass
class Resources:
    regs: int
    stack: int  # bytes of stack frame
    local: int  # bytes of local memory (spills)
    smem: int  # bytes of shared memory (dynamic, from the launch metadata)
    num_warps: int
    local_ops: int | None = None  # STL/LDL instructions in the SASS; None: not disassembled


def _strip(line: str) -> str:
    return line.split("//", 1)[0].strip()


def loops(ptx: str) -> list[tuple[int, int]]:
    """(first, last) line indices of every loop body: a back edge is a branch to a label defined
    on an earlier line."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
    out = []
    for i, line in enumerate(lines):
        m = _BRANCH.search(_strip(line))
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            out.append((labels[m.group(1)], i))
    return out


def main_loops(ptx: str) -> list[tuple[int, int]]:
    lines = ptx.splitlines()
    return [(a, b) for a, b in loops(ptx)
            if any(op in lines[j] for j in range(a, b + 1) for op in _MMA)]


def _split_operands(rest: str) -> list[str]:
    ops, depth, cur = [], 0, ""
    for ch in rest:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            ops.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        ops.append(cur)
    return ops


def _instr(line: str):
    """(opcode, dest registers, source registers) of one PTX instruction, or None."""
    s = _PRED.sub("", _strip(line)).rstrip(";").strip()
    if not s or s.endswith(":") or s.startswith((".", "{", "}")):
        return None
    parts = s.split(None, 1)
    opcode, rest = parts[0], parts[1] if len(parts) > 1 else ""
    ops = _split_operands(rest)
    if opcode.startswith(("st.", "wgmma", "mma", "bra", "ret", "bar", "cp.", "fence")):
        return opcode, [], _REG.findall(rest)
    if not ops:
        return opcode, [], []
    return opcode, _REG.findall(ops[0]), [r for o in ops[1:] for r in _REG.findall(o)]


def sync_operand_loads(ptx: str) -> list[str]:
    """Plain ld.global results that reach st.shared or an MMA operand by data movement alone,
    inside a main loop: one description per offending sink instruction."""
    lines = ptx.splitlines()
    found = []
    for a, b in main_loops(ptx):
        body = [(j, _instr(lines[j])) for j in range(a, b + 1)]
        body = [(j, ins) for j, ins in body if ins is not None]
        tainted: set[str] = set()
        for _ in range(3):  # loop-carried moves: iterate to a fixed point (3 passes suffice here)
            before = len(tainted)
            for _j, (op, dst, src) in body:
                if op.startswith("ld.global"):
                    tainted.update(dst)
                elif op.split(".")[0] in _MOVES and any(r in tainted for r in src):
                    tainted.update(dst)
            if len(tainted) == before:
                break
        for j, (op, _dst, src) in body:
            if (op.startswith("st.shared") or op.startswith(_MMA)) and any(
                    r in tainted for r in src):
                found.append(f"line {j + 1}: {op} of an ld.global value")
    return found


def lint_ptx(ptx: str, expect_wgmma: bool) -> list[str]:
    """The PTX checks: wgmma, sync-load, wait0."""
    problems = []
    if expect_wgmma and "wgmma.mma_async" not in ptx:
        problems.append("wgmma: the dot does not lower to wgmma.mma_async")
    sync = sync_operand_loads(ptx)
    if sync:
        problems.append(f"sync-load: {len(sync)} dot-operand stores from plain ld.global in the "
                        f"main loop ({sync[0]})")
    lines = ptx.splitlines()
    waits = sorted({j for a, b in main_loops(ptx) for j in range(a, b + 1)
                    if re.search(r"wgmma\.wait_group(?:\.sync\.aligned)?\s+0\s*;",
                                 _strip(lines[j]))})
    if waits:
        problems.append(f"wait0: {len(waits)} wgmma.wait_group 0 inside the main loop (line "
                        f"{waits[0] + 1})")
    return problems


def lint_resources(res: Resources, ctas_per_sm: int) -> list[str]:
    problems = []
    dead_frame = res.stack and not res.local and res.local_ops == 0
    if (res.stack or res.local) and not dead_frame:
        ops = "" if res.local_ops is None else f", {res.local_ops} local loads/stores"
        problems.append(f"spill: stack {res.stack} B, local {res.local} B{ops}")
    regs_per_cta = ((res.regs + 7) // 8 * 8) * 32 * res.num_warps  # allocated 8 per thread
    if regs_per_cta * ctas_per_sm > SM90_REGS:
        problems.append(f"occupancy: {res.regs} registers x {32 * res.num_warps} threads allow "
                        f"{SM90_REGS // regs_per_cta} CTAs/SM, the config intends {ctas_per_sm}")
    if (res.smem + SMEM_RESERVED_PER_CTA) * ctas_per_sm > SM90_SMEM:
        problems.append(f"occupancy: {res.smem} B of shared memory allow "
                        f"{SM90_SMEM // (res.smem + SMEM_RESERVED_PER_CTA)} CTAs/SM, the config "
                        f"intends {ctas_per_sm}")
    return problems


_LOCAL_OP = re.compile(r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\s")


def local_memory_ops(sass: str) -> int:
    """Instructions that load or store local memory (spill traffic) in cuobjdump -sass output."""
    return sum(1 for line in sass.splitlines() if _LOCAL_OP.search(line))


def parse_res_usage(text: str) -> dict[str, int]:
    """cuobjdump -res-usage's 'REG:168 STACK:0 SHARED:0 LOCAL:0 ...' line as a dict."""
    for line in text.splitlines():
        if "REG:" in line:
            return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}
    return {}
