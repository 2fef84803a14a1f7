"""kernels.platform: the stand-in targets and the attention backend decision (CPU, device queries
stubbed)."""

import logging

import pytest
import torch

from kernels import platform


def test_as_target_answers_like_the_gpu_and_restores():
    before = (platform.arch(), platform.is_hip(), platform.warp_size())
    with platform.as_target("gfx1100"):
        assert (platform.arch(), platform.is_hip(), platform.warp_size()) == ("gfx1100", True, 32)
        assert platform.num_sms() == 96 and platform.max_num_warps() == 32
        assert platform.kernel_device_ok(torch.empty(1, device="meta"))
        assert not platform.kernel_device_ok(torch.empty(1))
        assert platform.config("attention", 256)["num_warps"] == 8  # the RDNA3 table
        with platform.as_target("gfx942"):  # nested: CDNA, wave64, its own table
            assert platform.warp_size() == 64 and platform.max_num_warps() == 16
            assert platform.config("attention", 64)["BLOCK_M"] == 128
        assert platform.arch() == "gfx1100"
    with platform.as_target("sm90"):
        assert not platform.is_hip() and platform.arch() == "sm_90"
        assert "waves_per_eu" not in platform.launch_options({"num_warps": 4, "waves_per_eu": 2})
    assert (platform.arch(), platform.is_hip(), platform.warp_size()) == before


def test_overriding_a_config_for_a_block_then_restoring_it():
    with platform.as_target("gfx1100"):
        before = platform.config("geglu_gemm")
        assert before["MAX_K"] == 0          # AMD: no projection takes the kernel
        with pytest.raises(KeyError):
            with platform.overriding("geglu_gemm", MAX_K=1 << 30, BLOCK_M=32):
                got = platform.config("geglu_gemm")
                assert got == dict(before, MAX_K=1 << 30, BLOCK_M=32)
                raise KeyError("the entry is restored on the way out all the same")
        assert platform.config("geglu_gemm") == before
    with platform.as_target("sm90"):   # another target's table is never touched
        assert platform.config("geglu_gemm")["MAX_K"] == 320


def test_no_tf32_and_no_fp32_dots_on_amd():
    import inspect

    from kernels import attention
    assert "tf32" not in inspect.getsource(attention._attn_fwd_kernel.fn
                                           if hasattr(attention._attn_fwd_kernel, "fn")
                                           else attention._attn_fwd_kernel)
    with platform.as_target("gfx1100"):
        assert not platform.fp32_dot_ok()
    with platform.as_target("sm90"):
        assert platform.fp32_dot_ok()


@pytest.fixture
def rocm(monkeypatch):
    """A ROCm build on a gfx1100, with torch's SDPA backend answer set by the test."""
    answer = {"fused": []}
    monkeypatch.setattr(platform, "is_hip", lambda: True)
    monkeypatch.setattr(platform, "arch", lambda: "gfx1100")
    monkeypatch.setattr(platform, "triton_available", lambda: True)
    monkeypatch.setattr(platform, "sdpa_fused_backends", lambda device: list(answer["fused"]))
    monkeypatch.setattr(platform, "_LOGGED", set())
    return answer


def test_rocm_without_fused_sdpa_uses_triton_and_logs_once(rocm, caplog):
    with caplog.at_level(logging.INFO, logger="kernels.platform"):
        name, reason = platform.attention_backend("cuda")
        platform.attention_backend("cuda")
    assert name == "triton" and "no fused SDPA" in reason and "gfx1100" in reason
    assert sum("attention backend" in r.message for r in caplog.records) == 1


def test_rocm_with_fused_sdpa_uses_it(rocm):
    rocm["fused"] = ["mem_efficient"]
    name, reason = platform.attention_backend("cuda", self_attention=False)
    assert name == "sdpa" and "mem_efficient" in reason


def test_cuda_picks_the_measured_faster(monkeypatch):
    monkeypatch.setattr(platform, "is_hip", lambda: False)
    monkeypatch.setattr(platform, "triton_available", lambda: True)
    monkeypatch.setattr(platform, "sdpa_fused_backends", lambda d: pytest.fail("not asked on CUDA"))
    assert platform.attention_backend("cuda", self_attention=True, head_dim=40)[0] == "sdpa"
    assert platform.attention_backend("cuda", self_attention=True, head_dim=160)[0] == "triton"
    assert platform.attention_backend("cuda", self_attention=False, head_dim=80)[0] == "triton"


def test_cpu_device_is_sdpa():
    assert platform.attention_backend("cpu")[0] == "sdpa"


def test_sdpa_probe_on_cpu_reports_no_fused_kernel():
    # torch's own queries, for real: its fused kernels are GPU kernels
    assert platform.sdpa_fused_backends("cpu") == []
