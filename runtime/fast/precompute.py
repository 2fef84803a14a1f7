"""What stays constant through one generation, computed once: the DDIM schedule's per-step values,
the hint block's output, both time-embedding MLPs for every timestep, every ResBlock's projection
of those embeddings (emb_layers: SiLU + Linear, 64 small kernels a step otherwise), and the K/V of
the text context for every cross-attention (attn2).

The hint block and the time embeddings run in fp32 on small fp32 copies of just those modules
(taken before the networks are converted: ~5 M parameters at full size, 20 MB, against the 1.2 G
of UNet + ControlNet), then are cast to the fast dtype. The text K/V come from the fast networks'
own to_k/to_v, in the fast dtype, and reach the attn2 modules through `CrossKV`, the `cross_kv`
lookup of kernels.patch. The projections are a table made on the host in fp32 from the fp32 time
embeddings and the emb_layers' fast weights (which fast mode keeps in host memory: ~76 MB of fp16
off the device), once per schedule (the timesteps of a step count never change), and reach the
ResBlocks through `EmbOut`, the `emb_out` lookup: the step copies the current timestep's row into
one static buffer.
"""
from __future__ import annotations

import collections
import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels._torch_sites import cross_attentions, resblock_emb_layers, split_kv
from ldm.modules.diffusionmodules.util import timestep_embedding


@dataclasses.dataclass
class Schedule:
    """The reference sampler's DDIM schedule, as tensors on the device."""

    timesteps: list          # python ints, in sampling order (951, 901, ...)
    scalars: torch.Tensor    # [N, 4] float32: a_t, a_prev, sigma, sqrt(1 - a_t)


def ddim_schedule(model, steps, eta, device):
    """The per-step values of cldm.ddim_hacked.DDIMSampler, in its float32 roundings."""
    from cldm.ddim_hacked import DDIMSampler

    s = DDIMSampler(model)
    s.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
    ts = [int(t) for t in np.asarray(s.ddim_timesteps)]
    n = len(ts)
    rows = []
    for i in range(n):
        index = n - 1 - i
        # torch.full with Python floats -> float32, exactly as p_sample_ddim builds them.
        rows.append([float(s.ddim_alphas[index].item()), float(s.ddim_alphas_prev[index]),
                     float(s.ddim_sigmas[index].item()),
                     float(s.ddim_sqrt_one_minus_alphas[index].item())])
    return Schedule(ts[::-1], torch.tensor(rows, dtype=torch.float32, device=device))


class Precompute:
    """The hint block and time embeddings in fp32 (own small copies); results in `dtype`."""

    def __init__(self, model, dtype, channels_last):
        cn, unet = model.control_model, model.model.diffusion_model
        # on the model's device: the networks may still be in host memory (low-VRAM mode)
        device = model.device
        self.hint_block = copy.deepcopy(cn.input_hint_block).float().to(device)
        self.time_embed_unet = copy.deepcopy(unet.time_embed).float().to(device)
        self.time_embed_control = copy.deepcopy(cn.time_embed).float().to(device)
        self.model_channels = unet.model_channels
        self.dtype, self.channels_last = dtype, channels_last

    def fmt(self, t):
        if self.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    @torch.no_grad()
    def guided_hint(self, hint):
        """input_hint_block(hint) in fp32, cast to the fast dtype (and layout)."""
        return self.fmt(self.hint_block(hint.float(), None, None).to(self.dtype))

    @torch.no_grad()
    def time_embeddings(self, timesteps, device, dtype=None):
        """[N, 2, time_embed_dim] in `dtype` (None: the fast dtype): (UNet, ControlNet) time_embed
        of each timestep, computed in fp32."""
        t = torch.tensor(timesteps, dtype=torch.long, device=device)
        temb = timestep_embedding(t, self.model_channels)
        eu, ec = self.time_embed_unet(temb), self.time_embed_control(temb)
        return torch.stack([eu, ec], dim=1).to(self.dtype if dtype is None else dtype)


class Lookup:
    """A kernels.patch lookup by module: `current` is a dict of static buffers set by the step
    for its calls (None: nothing cached)."""

    def __init__(self):
        self.current = None

    def __call__(self, module):
        return None if self.current is None else self.current.get(module)


class CrossKV(Lookup):
    """The cached text K/V of the current model call, by attn2 module: kernels.patch's cross_kv
    lookup."""

    @staticmethod
    @torch.no_grad()
    def compute(net, context):
        """{attn2 module: (K, V)} of `context` ([Bm, L, D] in the fast dtype), [Bm, heads, L, d]."""
        return {m: split_kv(m, context) for m in cross_attentions(net)}


class EmbOut(Lookup):
    """The current step's timestep projection of every ResBlock, by emb_layers module:
    kernels.patch's emb_out lookup ([1, C] views of one static buffer)."""

    CACHED = 4   # tables kept, by schedule (1.2 MB each at 20 steps, full size)

    def __init__(self):
        super().__init__()
        self._tables = collections.OrderedDict()

    @torch.no_grad()
    def table(self, nets, timesteps, embeddings, dtype, device):
        """For `nets` (UNet, ControlNet): ([N, total] in `dtype` on `device`: every ResBlock's
        emb_layers output for each timestep, side by side, a row per timestep; {emb_layers module:
        (offset, C)}). `embeddings(timesteps)` gives their time embeddings [N, 2, D] in fp32."""
        key = (tuple(timesteps), dtype, str(device))
        hit = self._tables.get(key)
        if hit is not None:
            self._tables.move_to_end(key)
            return hit
        emb = embeddings(timesteps).float().cpu()
        cols, where, offset = [], {}, 0
        for j, net in enumerate(nets):
            for m in resblock_emb_layers(net):
                v = _host_fp32(m, emb[:, j])
                where[m] = (offset, v.shape[1])
                offset += v.shape[1]
                cols.append(v)
        hit = self._tables[key] = (torch.cat(cols, dim=1).to(device, dtype), where)
        while len(self._tables) > self.CACHED:
            self._tables.popitem(last=False)
        return hit

    @staticmethod
    def views(buf, where):
        """{emb_layers module: [1, C] view of `buf`} for a static buffer of one table row."""
        return {m: buf[off:off + c].view(1, c) for m, (off, c) in where.items()}


def _host_fp32(layers, x):
    """`layers` (SiLU, Linear) on host fp32 `x`, their Linear weights copied to host fp32. Always
    copies: a weight that is a view of a memory-mapped .safetensors file (fp32 on the CPU, used as
    loaded) sits at an unaligned address, where the CPU GEMV sums in another order than for the
    same values in fresh memory (the images of a checkpoint and of the random weights it holds
    differed by a pixel)."""
    for layer in layers:
        if isinstance(layer, nn.Linear):
            b = None if layer.bias is None else layer.bias.to("cpu", torch.float32, copy=True)
            x = F.linear(x, layer.weight.to("cpu", torch.float32, copy=True), b)
        else:
            x = type(layer).forward(layer, x)
    return x
