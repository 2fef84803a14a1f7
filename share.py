"""Imported first by the demo scripts, as upstream's share.py: quiet transformers, and with
`config.save_memory` upstream's sliced attention (runtime/lowvram.py does the rest of low-VRAM
mode: the shifting between CPU and GPU around the diffusion)."""
import config
from cldm.hack import disable_verbosity, enable_sliced_attention

disable_verbosity()
if config.save_memory:
    enable_sliced_attention()
