"""Imported first by the demo scripts, as upstream's share.py."""
import config  # noqa: F401
from cldm.hack import disable_verbosity

disable_verbosity()
