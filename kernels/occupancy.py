"""Occupancy of a compiled kernel from documented per-architecture limits (for compile_report).

AMD: waves per SIMD, limited by VGPRs, LDS and the hardware wave slots; NVIDIA: warps per SM,
limited by registers, shared memory, warp and block slots. Where each limit comes from:

* gfx1100 (RDNA3, Navi31): 1536 VGPRs per SIMD in wave32, allocated in granules of 24, and 16
  wave slots per SIMD: LLVM AMDGPU `getTotalNumVGPRs` / `getVGPRAllocGranule` (gfx11 "full
  VGPRs": 1536 / 24 in wave32) and `getMaxWavesPerEU` (16 for gfx10.3+), in
  llvm/lib/Target/AMDGPU/Utils/AMDGPUBaseInfo.cpp (the feature came with LLVM commit
  "FeatureGFX11FullVGPRs", 2022-09). LDS: 128 KB per WGP (2 CUs, 4 SIMDs), at most 64 KB per
  workgroup (AMD "RDNA3 Instruction Set Architecture" reference guide, LDS chapter).
* gfx942 (CDNA3, MI300): 512 unified VGPR+AGPR registers per lane per SIMD, granule 8, 8 wave
  slots per SIMD (same LLVM functions, gfx90a-class branch); the kernel metadata's .vgpr_count
  is the unified total, AGPRs included (LLVM AMDGPUUsage, code object metadata). LDS: 64 KB per CU and per
  workgroup (AMD Instinct MI300 ISA reference guide; CDNA3 white paper).
* sm_90 (Hopper): 65536 32-bit registers per SM, allocated per warp in units of 256, at most 255
  per thread; 64 resident warps and 32 resident blocks per SM; 228 KB shared memory per SM, 227 KB
  per block, 1 KB reserved per block (CUDA C++ Programming Guide, "Compute Capabilities" table
  for 9.0; CUDA Occupancy Calculator's allocation rules).
"""

from __future__ import annotations

LIMITS = {
    "gfx1100": dict(vgprs_per_simd=1536, vgpr_granule=24, max_waves_per_simd=16,
                    simds_per_lds_unit=4, lds_per_unit=128 * 1024, lds_per_workgroup=64 * 1024),
    "gfx942": dict(vgprs_per_simd=512, vgpr_granule=8, max_waves_per_simd=8,
                   simds_per_lds_unit=4, lds_per_unit=64 * 1024, lds_per_workgroup=64 * 1024),
    "sm90": dict(regs_per_sm=65536, reg_unit_per_warp=256, max_warps=64, max_blocks=32,
                 smem_per_sm=228 * 1024, smem_per_block=227 * 1024, smem_reserved_per_block=1024),
}


def _round_up(x, m):
    return -(-x // m) * m


def lds_limit(target: str) -> int:
    """Largest LDS / shared memory one workgroup may use on `target` (bytes)."""
    lim = LIMITS[target]
    return lim.get("lds_per_workgroup") or lim["smem_per_block"]


def estimate(target: str, row: dict) -> dict:
    """{"occupancy": waves per SIMD (AMD) or warps per SM (NVIDIA), "limited_by": ...}."""
    lim = LIMITS[target]
    warps = int(row["num_warps"])
    lds = int(row.get("lds", 0))
    if target in ("gfx1100", "gfx942"):
        regs = row["vgpr"]  # on gfx90a+ .vgpr_count already counts the AGPRs (unified file)
        per_wave = _round_up(max(regs, 1), lim["vgpr_granule"])
        by = {"registers": lim["vgprs_per_simd"] // per_wave, "slots": lim["max_waves_per_simd"]}
        if lds:
            # workgroups sharing one LDS unit, their waves spread over its SIMDs
            groups = lim["lds_per_unit"] // lds
            by["lds"] = groups * warps // lim["simds_per_lds_unit"]
    else:
        per_warp = _round_up(max(row["regs"], 1) * 32, lim["reg_unit_per_warp"])
        blocks = {"registers": lim["regs_per_sm"] // (per_warp * warps),
                  "slots": min(lim["max_blocks"], lim["max_warps"] // warps)}
        if lds:
            blocks["lds"] = lim["smem_per_sm"] // (lds + lim["smem_reserved_per_block"])
        by = {k: v * warps for k, v in blocks.items()}
    limited_by = min(by, key=by.get)
    return {"occupancy": by[limited_by], "limited_by": limited_by}
