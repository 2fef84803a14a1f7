"""Upstream's global switches. save_memory False: no sliced attention, no low-VRAM shifting."""
save_memory = False
