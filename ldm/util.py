"""Config helpers: build objects from `{target, params}` dicts (OmegaConf or plain).

Configs are data: `instantiate_from_config` builds only classes of this project's model code
(`ldm.`, `cldm.`) and torch's modules (`torch.nn.`, which upstream's configs use for the VAE's
`lossconfig: torch.nn.Identity`). Any other target (`os.system`, a class of another package) is
refused with ConfigError before its module is even imported, unless the caller opts in with
`allow_any_target=True` (nested configs built inside that call inherit it) or the environment
variable CONTROLNET_ALLOW_ANY_TARGET=1. Upstream instantiates any target; its own configs only
name the classes allowed here.

`special_file(path)` names what a path is when it is not a regular file, without opening it (the
checkpoint and image readers use it: a FIFO would block them, a device never ends);
`host_memory_available()` is what the checkpoint reader and runtime/memory.py compare a need with.
"""
import contextvars
import errno
import importlib
import inspect
import logging
import os
import stat

logger = logging.getLogger(__name__)

ALLOWED_TARGET_PREFIXES = ("ldm.", "cldm.", "torch.nn.")
ALLOW_ANY_TARGET_ENV = "CONTROLNET_ALLOW_ANY_TARGET"
_allow_any = contextvars.ContextVar("allow_any_target", default=False)


class ConfigError(ValueError):
    """A model config that cannot be used (a target outside the allowed packages, or a file that
    is not a plain config)."""


def get_obj_from_str(string, reload=False):
    """Import `package.module.Name` (split at the last dot) and return `Name`."""
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def _allowed_class(target):
    """The class `target` names, or ConfigError unless it is a class of ALLOWED_TARGET_PREFIXES
    (checked on the name before anything is imported, then on the class found)."""
    name = target if isinstance(target, str) else repr(target)
    refusal = (f"config target {name!r} is refused: configs may only build classes from "
               f"{', '.join(p + '*' for p in ALLOWED_TARGET_PREFIXES)} (a config is data, not "
               f"code). If you trust this config, pass allow_any_target=True (to create_model or "
               f"instantiate_from_config) or set {ALLOW_ANY_TARGET_ENV}=1")
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
        raise ConfigError(refusal)
    try:
        obj = get_obj_from_str(target)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"config target {target!r} does not exist ({e})") from None
    module = getattr(obj, "__module__", "") or ""
    if not inspect.isclass(obj) or not (module + ".").startswith(ALLOWED_TARGET_PREFIXES):
        raise ConfigError(refusal)
    return obj


def instantiate_from_config(config, allow_any_target=False):
    """`target(**params)`; the two placeholder strings upstream uses stand for "no module".

    `target` must be a class of ldm., cldm. or torch.nn. (ConfigError otherwise) unless
    `allow_any_target` (or the environment variable CONTROLNET_ALLOW_ANY_TARGET=1) allows any;
    configs instantiated while building this one inherit the permission."""
    if "target" not in config:
        if config == "__is_first_stage__" or config == "__is_unconditional__":
            return None
        raise KeyError("Expected key `target` to instantiate.")
    allow = (allow_any_target or _allow_any.get()
             or os.environ.get(ALLOW_ANY_TARGET_ENV, "") not in ("", "0"))
    params = config.get("params", dict())
    if not allow:
        return _allowed_class(config["target"])(**params)
    token = _allow_any.set(True)
    try:
        return get_obj_from_str(config["target"])(**params)
    finally:
        _allow_any.reset(token)


def special_file(path):
    """What `path` is when it is not a regular file ("a directory", "a FIFO (named pipe)", "a
    symbolic link loop", ...), or None for a regular file. Never opens it. Raises os.stat's
    FileNotFoundError / PermissionError / OSError for a missing or unreachable path."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        raise
    for test, kind in ((stat.S_ISREG, None), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def host_memory_available():
    """Bytes of host memory available to a new allocation without swapping (Linux's
    MemAvailable), or None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def count_params(model, verbose=False):
    """Number of parameter elements of `model` (logged at INFO when `verbose`)."""
    total_params = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info(
            "%s has %.2f M params.", model.__class__.__name__, total_params * 1.0e-6
        )
    return total_params
