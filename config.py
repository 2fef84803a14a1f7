"""Upstream's global switches. save_memory (upstream's docs/low_vram.md): sliced attention plus
ControlLDM.low_vram_shift around the diffusion; set it before the model is built
(runtime.lowvram.enable() does, for the --low-vram flags)."""
save_memory = False
