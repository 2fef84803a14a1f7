"""Imported first by the demo scripts, as upstream's share.py."""
import config
from cldm.hack import disable_verbosity

disable_verbosity()
if config.save_memory:
    raise NotImplementedError("config.save_memory (sliced attention, low-VRAM shifting) is not part of this port")
