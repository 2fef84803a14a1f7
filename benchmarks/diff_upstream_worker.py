"""One side of benchmarks/diff_upstream.py: build a tree's model, run the stages, save outputs.

diff_upstream.py starts this script twice, as a subprocess: once on this repository (side "ours")
and once on the user's upstream ControlNet checkout (side "upstream"). Each run puts only its own
tree on sys.path (an editable install of this repository is unhooked first), builds the model
with the tree's own `cldm.model.create_model(config)` and `cldm.model.load_state_dict(weights)`,
runs the requested stages on the recorded inputs and writes every output to a torch file. The
stages call only the upstream API both trees share (apply_model, control_model, DDIMSampler,
decode_first_stage, get_learned_conditioning, annotator.*), so the same code serves both sides.
Side "ours" runs canny2image through runtime.canny2image.Canny2Image (reference and fast mode);
side "upstream" runs the steps of upstream's gradio process() (spec §4.10) on its modules.

On side "upstream" the SHIMS below are applied at run time, each only where the thing it fixes
exists (upstream's code is not part of this repository, so every shim checks before it acts and
records whether it acted). None changes upstream's numerics.

This module imports nothing from either tree at import time: diff_upstream.py imports it for the
shim list, the plants and the stage names.
"""
import argparse
import importlib
import inspect
import os
import random
import sys
import traceback
import types

STAGES = ("clip", "controlnet", "unet", "ddim", "vae", "annotators", "canny2image")
TREE_PACKAGES = ("ldm", "cldm", "annotator", "runtime", "kernels", "config", "share")

SHIMS = {
    "pl_distributed": "pytorch_lightning.utilities.distributed.rank_zero_only moved to "
                      "pytorch_lightning.utilities.rank_zero in PL 2.x (upstream's ddpm.py imports "
                      "the old path); an alias module is registered.",
    "autocast_gpu_dtype": "upstream's checkpoint() calls torch.get_autocast_gpu_dtype, deprecated; "
                          "defined from torch.get_autocast_dtype('cuda') if this torch lacks it.",
    "no_xformers": "if xformers is installed upstream picks its memory-efficient attention; the "
                   "module flag is set False so upstream's default fp32 softmax path runs.",
    "clip_offline": "FrozenCLIPEmbedder loads CLIPTokenizer/CLIPTextModel from the hub: the "
                    "tokenizer is rebuilt offline from the BPE vocabulary bundled in "
                    "open_clip_torch with the 2023 transformers cleaning (ftfy.fix_text, "
                    "whitespace collapsed, lower-cased; BOS, <= 75 tokens, EOS, EOS padding); the "
                    "text model is transformers' CLIPTextModel from a local CLIPTextConfig (eager "
                    "attention, as in 2023), its weights then come from the checkpoint.",
    "clip_sizes": "tiny config only: upstream's FrozenCLIPEmbedder takes no size parameters, so "
                  "the tiny CLIP sizes are removed from the config and given to the offline "
                  "CLIPTextConfig instead.",
    "clip_device": "FrozenCLIPEmbedder.device is the string 'cuda'; set to the run device.",
    "ddim_device": "DDIMSampler.register_buffer moves every buffer to 'cuda'; on CPU it moves "
                   "them to the model's device instead.",
    "clip_key_layout": "transformers >= 4.31 makes CLIP's position_ids non-persistent and 5.x "
                       "drops the 'text_model.' level: checkpoint keys are renamed to the layout "
                       "the model registers (tensors unchanged), then loaded strictly.",
}

# Test-only: plant a known difference on side "upstream" to show the tool catches it (and where).
PLANT_ENV = "CONTROLNET_DIFF_PLANT"
PLANTS = {
    "groupnorm_eps": "every GroupNorm of the UNet (model.diffusion_model) gets eps 1e-3 "
                     "(caught by: unet, canny2image)",
    "ddim_shift": "DDIM timesteps shifted by one after make_schedule "
                  "(caught by: ddim, canny2image)",
}

CLIP_TEXT_2023 = "cond_stage_model.transformer.text_model."
CLIP_TEXT_TF5 = "cond_stage_model.transformer."
CLIP_SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings")
VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=77)


class WorkerError(RuntimeError):
    """A failure to report in one line (bad tree, missing package, unloadable weights)."""


# --------------------------------------------------------------------------------------------
# Isolation: only `tree` on sys.path


def isolate(tree):
    """Make `import ldm/cldm/annotator` resolve to `tree` only."""
    tree = os.path.realpath(tree)
    here = os.path.dirname(os.path.realpath(__file__))
    # An editable install of this repository adds a meta-path finder that would serve our `ldm`.
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not str(getattr(f, "__module__", "")).startswith("__editable__")]
    sys.path_hooks[:] = [h for h in sys.path_hooks
                         if not str(getattr(h, "__module__", "")).startswith("__editable__")]
    sys.path_importer_cache.clear()
    repo = os.path.dirname(here)
    drop = {here, repo}
    sys.path[:] = [tree] + [p for p in sys.path if p and os.path.realpath(p) not in drop | {tree}]
    for name in list(sys.modules):
        if name.split(".")[0] in TREE_PACKAGES:
            del sys.modules[name]
    os.chdir(tree)
    return tree


def check_origin(tree):
    """Raise WorkerError if a loaded tree package came from somewhere else: one the tree has, from
    anywhere but the tree; one it lacks, from this repository. (A package of the same name that
    neither has is someone else's: the Hub's `kernels`, which transformers imports when it is
    installed, is not this repository's kernels/.)"""
    repo = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        top = name.split(".")[0]
        if top not in TREE_PACKAGES or not path:
            continue
        path = os.path.realpath(path)
        has = any(os.path.exists(os.path.join(tree, top + ext)) for ext in ("", ".py"))
        if (not path.startswith(tree + os.sep)) if has else path.startswith(repo + os.sep):
            raise WorkerError(f"module {name} was imported from {path}, not from {tree}")


# --------------------------------------------------------------------------------------------
# Shims (side "upstream" only)


def _tree_mentions(tree, relpath, text):
    try:
        with open(os.path.join(tree, relpath), encoding="utf-8", errors="replace") as f:
            return text in f.read()
    except OSError:
        return False


def shim_pl_distributed(tree):
    if not _tree_mentions(tree, "ldm/models/diffusion/ddpm.py", "utilities.distributed"):
        return False  # the tree does not import the old path (and may not need PL at all)
    try:
        import pytorch_lightning.utilities as pl_utilities
    except ImportError:
        return False  # no PL at all: upstream's own import error is reported
    try:
        distributed = importlib.import_module("pytorch_lightning.utilities.distributed")
        if hasattr(distributed, "rank_zero_only"):
            return False
    except ImportError:
        distributed = None
    try:
        from pytorch_lightning.utilities.rank_zero import rank_zero_only
    except ImportError:
        return False
    if distributed is None:
        distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
        sys.modules[distributed.__name__] = distributed
        pl_utilities.distributed = distributed
    distributed.rank_zero_only = rank_zero_only
    return True


def shim_autocast_gpu_dtype(torch):
    if hasattr(torch, "get_autocast_gpu_dtype"):
        return False
    torch.get_autocast_gpu_dtype = lambda: torch.get_autocast_dtype("cuda")
    return True


def shim_no_xformers():
    applied = False
    for name in ("ldm.modules.attention", "ldm.modules.diffusionmodules.model"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "XFORMERS_IS_AVAILBLE", False):
            module.XFORMERS_IS_AVAILBLE = False
            applied = True
    return applied


class OfflineCLIPTokenizer:
    """The 2023 transformers CLIPTokenizer call that FrozenCLIPEmbedder makes, offline.

    BPE and vocabulary from open_clip_torch's SimpleTokenizer (the bundled OpenAI file); the text
    cleaning is the one transformers 4.19 applied with ftfy installed (open_clip's own cleaning
    unescapes HTML twice); framing BOS + at most max_length-2 tokens + EOS, padded with EOS.
    """

    def __init__(self):
        import ftfy
        import open_clip.tokenizer
        import regex
        self._bpe = open_clip.tokenizer.SimpleTokenizer()
        whitespace = regex.compile(r"\s+")
        self._bpe.clean_fn = lambda text: whitespace.sub(" ", ftfy.fix_text(text)).strip().lower()
        self.bos_token_id = self._bpe.encoder["<start_of_text>"]
        self.eos_token_id = self.pad_token_id = self._bpe.encoder["<end_of_text>"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def __call__(self, text, truncation=True, max_length=77, padding="max_length",
                 return_tensors="pt", return_length=False, **kwargs):
        import torch
        texts = [text] if isinstance(text, str) else list(text)
        rows = []
        for t in texts:
            ids = self._bpe.encode(t)[:max_length - 2] if truncation else self._bpe.encode(t)
            ids = [self.bos_token_id] + ids + [self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (max_length - len(ids)))
        ids = torch.tensor(rows, dtype=torch.long)
        out = {"input_ids": ids}
        if return_length:
            out["length"] = torch.full((len(rows),), max_length, dtype=torch.long)
        return out


def offline_clip_text_model(sizes):
    """transformers' CLIPTextModel of the given sizes from a local config (no hub)."""
    import transformers
    config = transformers.CLIPTextConfig(
        **sizes, hidden_act="quick_gelu", layer_norm_eps=1e-5, attn_implementation="eager")
    return transformers.CLIPTextModel(config)


def shim_clip_offline(sizes):
    """Swap the hub-bound classes in upstream's encoders module for offline ones."""
    module = sys.modules.get("ldm.modules.encoders.modules")
    text_model = getattr(module, "CLIPTextModel", None)
    if module is None or not str(getattr(text_model, "__module__", "")).startswith("transformers"):
        return False

    class CLIPTextModelOffline:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return offline_clip_text_model(sizes)

    module.CLIPTokenizer = OfflineCLIPTokenizer
    module.CLIPTextModel = CLIPTextModelOffline
    return True


def shim_clip_sizes(config_params):
    """Remove CLIP size parameters the tree's FrozenCLIPEmbedder does not take; return sizes."""
    sizes = dict(VIT_L14_TEXT)
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    accepted = inspect.signature(FrozenCLIPEmbedder.__init__).parameters
    removed = False
    for key in CLIP_SIZE_KEYS:
        if key in config_params and key not in accepted:
            sizes[key] = int(config_params.pop(key))
            removed = True
    return sizes, removed


def shim_clip_device(model, device):
    clip = model.cond_stage_model
    if isinstance(getattr(type(clip), "device", None), property):
        return False
    if isinstance(getattr(clip, "device", None), str) and clip.device != str(device):
        clip.device = str(device)
        return True
    return False


def shim_ddim_device(device):
    from cldm.ddim_hacked import DDIMSampler
    try:
        source = inspect.getsource(DDIMSampler.register_buffer)
    except (OSError, TypeError):
        return False
    if device.type != "cpu" or "cuda" not in source:
        return False

    def register_buffer(self, name, attr):
        import torch
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.model.betas.device)
        setattr(self, name, attr)

    DDIMSampler.register_buffer = register_buffer
    return True


def fit_clip_layout(state_dict, expected):
    """Rename CLIP text keys to the layout `expected` uses; drop/add the position_ids buffer."""
    expected = dict(expected)
    nested = any(k.startswith(CLIP_TEXT_2023) for k in expected)
    out, renamed = {}, False
    for key, value in state_dict.items():
        new = key
        if key not in expected and key.startswith(CLIP_TEXT_TF5):
            if nested and not key.startswith(CLIP_TEXT_2023):
                new = CLIP_TEXT_2023 + key[len(CLIP_TEXT_TF5):]
            elif not nested and key.startswith(CLIP_TEXT_2023):
                new = CLIP_TEXT_TF5 + key[len(CLIP_TEXT_2023):]
        if new not in expected and new.endswith("embeddings.position_ids"):
            renamed = True
            continue  # a non-persistent buffer in newer transformers (always 0..76)
        renamed |= new != key
        out[new] = value
    for key, value in expected.items():
        if key.endswith("embeddings.position_ids") and key not in out:
            out[key] = value
            renamed = True
    return out, renamed


# --------------------------------------------------------------------------------------------
# Plants (side "upstream" only, tests only)


def apply_plant(name, model):
    import torch
    if name == "groupnorm_eps":
        for m in model.model.diffusion_model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.eps = 1e-3
    elif name == "ddim_shift":
        from cldm.ddim_hacked import DDIMSampler
        make_schedule = DDIMSampler.make_schedule

        def shifted(self, *args, **kwargs):
            make_schedule(self, *args, **kwargs)
            self.ddim_timesteps = self.ddim_timesteps + 1

        DDIMSampler.make_schedule = shifted
    else:
        raise WorkerError(f"unknown {PLANT_ENV}={name!r}: use one of {', '.join(PLANTS)}")


# --------------------------------------------------------------------------------------------
# Building the model


def build(tree, side, config_path, weights, device, plant, workdir):
    """Import the tree, apply the shims (upstream), build and load the model."""
    import torch
    from omegaconf import OmegaConf
    applied = {}
    if side == "upstream":
        applied["pl_distributed"] = shim_pl_distributed(tree)
        applied["autocast_gpu_dtype"] = shim_autocast_gpu_dtype(torch)
    try:
        cldm_model = importlib.import_module("cldm.model")
        importlib.import_module("cldm.cldm")
        importlib.import_module("cldm.ddim_hacked")
        importlib.import_module("annotator.util")
        importlib.import_module("annotator.canny")
    except ImportError as e:
        raise WorkerError(f"importing {tree} failed: {type(e).__name__}: {e} "
                          "(install what it names, see the README)") from e
    check_origin(tree)
    config = OmegaConf.load(config_path)
    if side == "upstream":
        applied["no_xformers"] = shim_no_xformers()
        params = config.model.params.cond_stage_config.setdefault("params", {})
        sizes, applied["clip_sizes"] = shim_clip_sizes(params)
        applied["clip_offline"] = shim_clip_offline(sizes)
        applied["ddim_device"] = shim_ddim_device(device)
    run_config = os.path.join(workdir, f"config_{side}.yaml")
    OmegaConf.save(config, run_config)
    model = cldm_model.create_model(run_config)
    state_dict = cldm_model.load_state_dict(weights, location="cpu")
    state_dict, relaid = fit_clip_layout(state_dict, model.state_dict())
    if side == "upstream":
        applied["clip_key_layout"] = relaid
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise WorkerError(
            f"the weights do not fit {tree}'s model ({config_path}): {len(missing)} missing keys "
            f"(e.g. {', '.join(missing[:2]) or '-'}), {len(unexpected)} unexpected (e.g. "
            f"{', '.join(unexpected[:2]) or '-'})")
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device).eval()
    if side == "upstream":
        applied["clip_device"] = shim_clip_device(model, device)
        if plant:
            apply_plant(plant, model)
    check_origin(tree)
    return model, applied


# --------------------------------------------------------------------------------------------
# Stages: each returns {item name: tensor | {"error": str}}


def _cpu(x):
    return x.detach().to("cpu")


def stage_clip(model, inp, device):
    prompts = inp["prompts"]
    out = {f"prompt{i}": _cpu(model.get_learned_conditioning([p])) for i, p in enumerate(prompts)}
    out["batch"] = _cpu(model.get_learned_conditioning(list(prompts)))
    return out


def stage_controlnet(model, inp, device):
    import torch
    x, hint, ctx = (inp[k].to(device) for k in ("x", "hint", "context"))
    out = {}
    for t in inp["timesteps"]:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
        residuals = model.control_model(x=x, hint=hint, timesteps=tt, context=ctx)
        for i, r in enumerate(residuals):
            out[f"t{t}.residual{i}"] = _cpu(r)
    return out


def stage_unet(model, inp, device):
    import torch
    x, hint, ctx = (inp[k].to(device) for k in ("x", "hint", "context"))
    variants = {
        "control": ([hint], [1.0] * 13),
        "no_control": (None, [1.0] * 13),
        "guess_mode": ([hint], [0.825 ** float(12 - i) for i in range(13)]),
    }
    out = {}
    for t in inp["timesteps"]:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
        for name, (c_concat, scales) in variants.items():
            model.control_scales = scales
            eps = model.apply_model(x, tt, {"c_concat": c_concat, "c_crossattn": [ctx]})
            out[f"t{t}.{name}"] = _cpu(eps)
    return out


def stage_ddim(model, inp, device):
    import numpy as np
    import torch
    from cldm.ddim_hacked import DDIMSampler
    out = {}
    for eta in inp["etas"]:
        for steps in inp["ddim_steps"]:
            name = f"S{steps}.eta{eta:g}"
            sampler = DDIMSampler(model)
            try:
                sampler.make_schedule(ddim_num_steps=int(steps), ddim_eta=float(eta),
                                      verbose=False)
            except Exception as e:  # upstream crashes for some S: recorded as data
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            table = {}
            for key in ("ddim_timesteps", "ddim_alphas", "ddim_alphas_prev", "ddim_sigmas",
                        "ddim_sqrt_one_minus_alphas"):
                value = getattr(sampler, key)
                value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
                dtype = np.int64 if key == "ddim_timesteps" else np.float64
                table[key] = torch.from_numpy(np.asarray(value).astype(dtype).reshape(-1))
            out[name] = table
    return out


def stage_vae(model, inp, device):
    return {f"z{i}": _cpu(model.decode_first_stage(z[None].to(device)))
            for i, z in enumerate(inp["z"])}


def stage_annotators(model, inp, device):
    import numpy as np
    import torch
    from annotator.canny import CannyDetector
    from annotator.util import HWC3, resize_image
    image = inp["image"].numpy()
    rgba = inp["rgba"].numpy()
    out = {"HWC3.gray2d": HWC3(image[:, :, 0].copy()), "HWC3.gray1": HWC3(image[:, :, :1].copy()),
           "HWC3.rgb": HWC3(image), "HWC3.rgba": HWC3(rgba)}
    for r in inp["resolutions"]:
        out[f"resize_image.{r}"] = resize_image(image, int(r))
    canny = CannyDetector()
    for low, high in inp["canny_thresholds"]:
        out[f"canny.{low}-{high}"] = canny(image, low, high)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def spec_process(model, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                 ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold,
                 high_threshold):
    """Upstream's gradio_canny2image.process() (spec §4.10), on the tree's own modules."""
    import numpy as np
    import torch
    from annotator.canny import CannyDetector
    from annotator.util import HWC3, resize_image
    from cldm.ddim_hacked import DDIMSampler
    device = model.betas.device
    img = resize_image(HWC3(input_image), image_resolution)
    H, W = img.shape[:2]
    detected_map = HWC3(CannyDetector()(img, low_threshold, high_threshold))
    control = torch.from_numpy(detected_map.copy()).float().to(device) / 255.0
    control = torch.stack([control for _ in range(num_samples)], dim=0)
    control = control.permute(0, 3, 1, 2).clone()
    # pytorch_lightning.seed_everything(seed) makes exactly these draws.
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    text = model.get_learned_conditioning([prompt + ", " + a_prompt] * num_samples)
    cond = {"c_concat": [control], "c_crossattn": [text]}
    un_cond = {"c_concat": None if guess_mode else [control],
               "c_crossattn": [model.get_learned_conditioning([n_prompt] * num_samples)]}
    model.control_scales = ([strength * (0.825 ** float(12 - i)) for i in range(13)]
                            if guess_mode else [strength] * 13)
    samples, _ = DDIMSampler(model).sample(
        ddim_steps, num_samples, (4, H // 8, W // 8), cond, verbose=False, eta=eta,
        unconditional_guidance_scale=scale, unconditional_conditioning=un_cond)
    x = model.decode_first_stage(samples)
    x = (x.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
    return [255 - detected_map] + [x[i] for i in range(num_samples)]


class FirstGuidedEps:
    """Records the guided eps of the first DDIM step (e_u + s * (e_c - e_u), as the sampler forms
    it) from the model's first apply_model calls, for the fast-mode comparison."""

    def __init__(self, model, scale):
        self.model, self.scale, self.calls = model, scale, []

    def __enter__(self):
        self.saved = self.model.__dict__.get("apply_model")
        apply_model = self.model.apply_model

        def recording(x, t, cond, *args, **kwargs):
            out = apply_model(x, t, cond, *args, **kwargs)
            if len(self.calls) < 2:
                self.calls.append((out.detach().float().cpu(), cond))
            return out

        self.model.apply_model = recording
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            del self.model.__dict__["apply_model"]
        else:
            self.model.apply_model = self.saved

    def eps(self):
        if len(self.calls) == 2 and self.calls[0][1] is not self.calls[1][1]:
            (e_c, _), (e_u, _) = self.calls
            return e_u + self.scale * (e_c - e_u)
        return self.calls[0][0]


def run_canny2image(model, inp, side, mode):
    """{case: uint8 gallery}, {case: first guided eps} (eps from fast mode only if its runner
    reports it: `last_info["first_eps"]`, read defensively)."""
    import numpy as np
    import torch
    images, first_eps = {}, {}
    pipe = None
    if side == "ours":
        from runtime.canny2image import Canny2Image
        pipe = Canny2Image(model, mode=mode)  # one per mode: fast mode keeps its graphs
    for i, case in enumerate(inp["cases"]):
        args = dict(case, input_image=inp["image"].numpy())
        if pipe is None:
            with FirstGuidedEps(model, case["scale"]) as recorder:
                result = spec_process(model, **args)
            first_eps[f"case{i}"] = recorder.eps()
        else:
            result = pipe.process(**args)
            info = getattr(getattr(pipe, "fast", None), "last_info", None) or {}
            if isinstance(info.get("first_eps"), torch.Tensor):
                first_eps[f"case{i}"] = info["first_eps"].detach().float().cpu()
        images[f"case{i}"] = torch.from_numpy(np.stack(result))
    return images, first_eps


STAGE_FUNCTIONS = {"clip": stage_clip, "controlnet": stage_controlnet, "unet": stage_unet,
                   "ddim": stage_ddim, "vae": stage_vae, "annotators": stage_annotators}


def run_stages(model, inp, side, stages, modes, device):
    import torch
    results = {}
    with torch.no_grad():
        for stage in stages:
            runs = [(stage, None)]
            if stage == "canny2image":
                runs = ([("canny2image", "reference")] if side == "upstream" else
                        [("canny2image" if m == "reference" else f"canny2image_{m}", m)
                         for m in modes])
            for name, mode in runs:
                try:
                    if stage == "canny2image":
                        results[name], results[name + "_first_eps"] = run_canny2image(
                            model, inp, side, mode)
                    else:
                        results[name] = STAGE_FUNCTIONS[stage](model, inp, device)
                except Exception as e:  # one failing stage is reported, the others still run
                    results[name] = {"__error__": f"{type(e).__name__}: {e}",
                                     "__traceback__": traceback.format_exc()}
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", required=True)
    p.add_argument("--side", choices=("ours", "upstream"), required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stages", nargs="+", default=list(STAGES))
    p.add_argument("--modes", nargs="+", default=["reference"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    for name in ("config", "weights", "inputs", "out"):  # before isolate() changes directory
        setattr(args, name, os.path.abspath(getattr(args, name)))
    tree = isolate(args.tree)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        plant = os.environ.get(PLANT_ENV) if args.side == "upstream" else None
        model, applied = build(tree, args.side, args.config, args.weights, device, plant,
                               os.path.dirname(args.out))
        inp = torch.load(args.inputs, weights_only=True)
        stages = run_stages(model, inp, args.side, args.stages, args.modes, device)
        check_origin(tree)
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the parent shows this one line; the traceback stays in the log
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: building the model failed: {type(e).__name__}: {first}", file=sys.stderr)
        return 2
    meta = {"side": args.side, "tree": tree, "torch": str(torch.__version__),
            "shims": [k for k, v in applied.items() if v], "plant": plant or ""}
    torch.save({"meta": meta, "stages": stages}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
