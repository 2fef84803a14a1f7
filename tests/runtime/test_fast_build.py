"""Fast mode's build path: build_model(host_children=HOST_BUILT) creates the UNet, ControlNet and
VAE in host memory with the same seeded values, and FastNets makes each tensor's fast copy straight
on the device, keeping the host tensors themselves as the fp32 originals (no copy, no fp32 model on
the device). The meta device stands in for a GPU: placement and dtypes without computing."""
import pytest
import torch

from conftest import TINY_CONFIG
from ldm.modules.diffusionmodules.util import GroupNorm32
from runtime.fast import FastOptions
from kernels._torch_sites import resblock_emb_layers
from runtime.fast.nets import HOST_BUILT, UNUSED, FastNets, host_children, host_only
from runtime.weights import build_model

NET_OF = {"unet": "model", "control": "control_model", "vae": "first_stage_model"}


def options():
    # CLIP in fp32: it stays where it was built (here the meta device, which has no values to
    # copy); its conversion (fp16, the default with an fp16 dtype) is tested in test_fast.py
    return FastOptions(dtype=torch.float16, clip_dtype=torch.float32, kernels=False,
                       channels_last=True, cuda_graph=False, two_streams=False)


def test_host_children_only_for_fast_mode_on_an_accelerator():
    assert host_children("fast", "cuda:0") == HOST_BUILT
    assert host_children("fast", "cpu") == ()
    assert host_children("reference", "cuda:0") == ()


def test_host_build_has_the_plain_builds_values_and_placement():
    plain = build_model(TINY_CONFIG, random_weights=True, seed=0).state_dict()
    model = build_model(TINY_CONFIG, random_weights=True, seed=0, device="meta",
                        host_children=HOST_BUILT)
    where = {name: {t.device.type for t in child.parameters()}
             for name, child in model.named_children()}
    assert where == {"model": {"cpu"}, "control_model": {"cpu"}, "first_stage_model": {"cpu"},
                     "cond_stage_model": {"meta"}}
    assert model.device.type == "meta"
    for key, value in model.state_dict().items():
        if key.split(".")[0] in HOST_BUILT:
            assert value.dtype == plain[key].dtype and torch.equal(value, plain[key]), key


def test_fast_copies_made_on_the_device_from_the_host_originals():
    """(Under low-VRAM mode the same per-tensor conversion runs: tests/runtime/test_lowvram.py.)"""
    model = build_model(TINY_CONFIG, random_weights=True, seed=0, device="meta",
                        host_children=HOST_BUILT)
    built = {n: {id(mod): {k: t.data_ptr() for k, t in mod.named_parameters(recurse=False)}
                 for mod in getattr(model, NET_OF[n]).modules()} for n in NET_OF}
    nets = FastNets(model, options(), cross_kv=None)
    assert "clip" not in nets._host          # fp32 where it was: not converted
    for n in NET_OF:
        net = nets.nets[n]
        # the originals are build_model's host tensors themselves (no copy)
        originals = {t.data_ptr() for mod, _, is_param, t in nets._host[n] if is_param}
        assert originals == {p for d in built[n].values() for p in d.values()}, n
        assert all(t.device.type == "cpu" and (t.dtype == torch.float32 or
                                               not t.is_floating_point())
                   for *_, t in nets._host[n])
        # the fast copies: on the device, but for the parts fast mode never runs there (the VAE
        # encoder; the ResBlocks' emb_layers, which precompute tabulates on the host)
        parts = [getattr(net, part) for part in UNUSED.get(n, ())] + resblock_emb_layers(net)
        unused = {id(m) for part in parts for m in part.modules()}
        assert bool(unused) == (n in ("vae", "unet", "control"))
        for mod in net.modules():
            device = "cpu" if id(mod) in unused else "meta"
            for k, p in mod.named_parameters(recurse=False):
                assert p.device.type == device, (n, k)
                want = torch.float32 if isinstance(mod, GroupNorm32) else torch.float16
                assert p.dtype == want, (n, k)
                if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1:   # 3x3 convs: NHWC
                    assert p.is_contiguous(memory_format=torch.channels_last), (n, k)
                    assert not p.is_contiguous(), (n, k)
    nets.close()
    for n in NET_OF:
        assert {p.device.type for p in nets.nets[n].parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_meta_construction_skips_init_and_restores_torch():
    """Inside the meta construction nn.init leaves meta tensors alone (no values to set) and still
    initializes real ones (buffers, modules made on purpose); afterwards torch is as it was."""
    from torch import nn

    from runtime.weights import parameters_on_meta
    originals = (nn.init.normal_, nn.init.kaiming_uniform_, nn.Module.register_parameter)
    with parameters_on_meta():
        assert nn.init.normal_ is not originals[0]
        emb = nn.Embedding(4, 3)
        assert emb.weight.is_meta
        real = torch.zeros(5)
        nn.init.normal_(real, 1.0, 0.1)
        assert real.abs().min() > 0.5
    assert (nn.init.normal_, nn.init.kaiming_uniform_, nn.Module.register_parameter) == originals
    assert not nn.Embedding(4, 3).weight.is_meta


@pytest.mark.gpu
def test_on_a_gpu_the_conversion_never_holds_an_fp32_network():
    """Built in host memory, converted one tensor at a time: during the conversion the GPU holds
    at most the fast copies plus one fp32 tensor in flight, never an fp32 network."""
    model = build_model(TINY_CONFIG, random_weights=True, seed=0, device="cuda",
                        host_children=HOST_BUILT)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()              # CLIP (fp32) and the schedule buffers
    torch.cuda.reset_peak_memory_stats()
    nets = FastNets(model, options(), cross_kv=None)
    torch.cuda.synchronize()
    fast = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    originals = [t for tensors in nets._host.values() for *_, t in tensors]
    fp32 = sum(t.numel() * t.element_size() for t in originals)
    largest = max(t.numel() * t.element_size() for t in originals)
    for name, net in nets.nets.items():   # but the parts fast mode never runs on the device
        off = host_only(name, net, nets.options)
        assert all(p.is_cuda for m in net.modules() if id(m) not in off
                   for p in m.parameters(recurse=False)), name
    copies = sum(t.numel() * t.element_size() for name in nets._host     # the converted ones
                 for t in [*nets.nets[name].parameters(), *nets.nets[name].buffers()])
    assert copies < 0.6 * fp32                      # fp16 (norms stay fp32)
    assert peak <= fast + largest + 512 * len(originals) + 2**20
    nets.close()
