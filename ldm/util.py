"""Config helpers: build objects from `{target, params}` dicts (OmegaConf or plain)."""
import importlib
import logging

logger = logging.getLogger(__name__)


def get_obj_from_str(string, reload=False):
    """Import `package.module.Name` (split at the last dot) and return `Name`."""
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config):
    """`target(**params)`; the two placeholder strings upstream uses stand for "no module"."""
    if "target" not in config:
        if config == "__is_first_stage__" or config == "__is_unconditional__":
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def count_params(model, verbose=False):
    """Number of parameter elements of `model` (logged at INFO when `verbose`)."""
    total_params = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info(
            "%s has %.2f M params.", model.__class__.__name__, total_params * 1.0e-6
        )
    return total_params
