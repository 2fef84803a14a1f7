"""benchmarks/diff_upstream.py: this repository against itself passes with zero difference, a
planted difference fails on the stage it lives in, a spec-shaped "upstream" tree (hub-bound CLIP,
CUDA-bound DDIM buffers, upstream's DDIM crashes) passes through the shims, and bad input gives a
one-line error with exit status 2.

Each tool run starts two worker processes on the tiny config (seconds each on an idle CPU).
"""
import json
import os
import shutil
import sys
import tempfile
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import diff_upstream  # noqa: E402
import diff_upstream_worker as worker  # noqa: E402


def run_tool(tmp_path, capsys, *argv, plant=None, monkeypatch=None):
    out = tmp_path / "result.json"
    if plant is not None:
        monkeypatch.setenv(worker.PLANT_ENV, plant)
    rc = diff_upstream.main(["--json", str(out), *argv])
    captured = capsys.readouterr()
    result = json.loads(out.read_text()) if out.exists() else None
    return rc, result, captured


def verdicts(result):
    return {row["stage"]: row["verdict"] for row in result["rows"]}


def test_this_repository_against_itself_has_zero_difference(tmp_path, capsys):
    rc, result, captured = run_tool(tmp_path, capsys, "--upstream", REPO, "--mode", "reference",
                                    "fast")
    assert rc == 0, captured.out + captured.err
    rows = {row["stage"]: row for row in result["rows"]}
    assert set(rows) == set(worker.STAGES) | {"canny2image_fast"}
    for stage in worker.STAGES:
        assert rows[stage]["verdict"] == "PASS"
        assert rows[stage]["worst_rel_err"] == 0.0, rows[stage]
        assert rows[stage]["items"] > 0
    assert rows["ddim"]["items"] == 200       # S = 1..100 at two etas
    assert rows["clip"]["items"] == len(diff_upstream.PROMPTS) + 1
    # On CPU fast mode runs fp32 (no fp16, no graphs): close to reference, not necessarily equal.
    assert rows["canny2image_fast"]["verdict"] == "PASS"
    assert any(n.startswith("first-step eps rel. L2 error") for n in
               rows["canny2image_fast"]["notes"]), rows["canny2image_fast"]
    assert result["shims"] == []              # none applies to this repository
    assert "| clip | 8 | 0.00e+00 | PASS |" in captured.out


def test_planted_groupnorm_eps_fails_unet_and_end_to_end_only(tmp_path, capsys, monkeypatch):
    rc, result, captured = run_tool(tmp_path, capsys, "--upstream", REPO, plant="groupnorm_eps",
                                    monkeypatch=monkeypatch)
    assert rc == 1, captured.out + captured.err
    failed = {stage for stage, v in verdicts(result).items() if v == "FAIL"}
    # canny2image runs the UNet, so it sits downstream of the planted difference too.
    assert failed == {"unet", "canny2image"}, captured.out
    assert "planted difference on the upstream side: groupnorm_eps" in captured.out


def test_planted_ddim_shift_fails_the_ddim_stage(tmp_path, capsys, monkeypatch):
    rc, result, captured = run_tool(tmp_path, capsys, "--upstream", REPO, "--stages", "ddim",
                                    "vae", "annotators", plant="ddim_shift",
                                    monkeypatch=monkeypatch)
    assert rc == 1, captured.out + captured.err
    assert verdicts(result) == {"ddim": "FAIL", "vae": "PASS", "annotators": "PASS"}
    ddim = next(r for r in result["rows"] if r["stage"] == "ddim")
    assert any("timesteps differ at S1.eta0" in n for n in ddim["notes"]), ddim


@pytest.mark.parametrize("make", ["missing", "empty", "other_project"])
def test_not_a_checkout_is_a_one_line_error(tmp_path, capsys, make):
    path = tmp_path / "not_controlnet"
    if make != "missing":
        path.mkdir()
    if make == "other_project":
        (path / "ldm").mkdir()
        (path / "ldm" / "util.py").write_text("")
    rc = diff_upstream.main(["--upstream", str(path)])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines
    assert "Traceback" not in captured.err


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    rc = diff_upstream.main(["--upstream", REPO, "--ckpt", str(tmp_path / "none.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no such file" in err[0]


# A stand-in for the worker: draws a progress bar as sampling does, then ends as FAKE_WORKER says.
FAKE_WORKER = '''
import os, signal, sys
sys.stderr.write("DDIM Sampler:  20%|##        | 4/20 [00:10<00:40,  2.5s/it]\\r")
sys.stderr.flush()
how = os.environ["FAKE_WORKER"]
if how in ("KILL", "TERM"):
    os.kill(os.getpid(), getattr(signal, "SIG" + how))
if how == "raise":
    raise RuntimeError("boom in the worker")
sys.exit(3)
'''


@pytest.mark.parametrize("how, reason", [
    ("KILL", "killed by SIGKILL, likely out of memory (a full-size run needs about 11-12 GB of "
             "RAM)"),
    ("TERM", "killed by SIGTERM"),
    ("raise", "exit status 1 after RuntimeError: boom in the worker"),
    ("exit", "exit status 3, no error message"),
])
def test_a_killed_or_crashed_worker_is_reported_as_such(tmp_path, capsys, monkeypatch, how,
                                                        reason):
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    monkeypatch.setattr(diff_upstream, "WORKER", str(fake))
    monkeypatch.setenv("FAKE_WORKER", how)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where the kept log goes
    rc, result, captured = run_tool(tmp_path, capsys, "--upstream", REPO, "--stages", "vae")
    assert rc == 2 and result is None
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"error: the upstream side ({REPO}) could not run: {reason} "
                           f"(full log: "), line
    assert "DDIM" not in line and "%|" not in line           # the progress bar is no reason
    log = line.split("(full log: ")[1].rstrip(")")
    assert "DDIM Sampler:  20%" in open(log).read()          # it stays in the log


def test_help_says_what_a_full_size_cpu_run_costs(capsys):
    with pytest.raises(SystemExit):
        diff_upstream.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "11-12 GB of RAM" in text and "5.7 GB of disk" in text
    assert "tens of minutes" in text and "--full-size --steps 2" in text
    with pytest.raises(SystemExit):                # the default already: the flag is gone
        diff_upstream.main(["--upstream", REPO, "--random-weights"])
    assert "unrecognized arguments: --random-weights" in capsys.readouterr().err


# A FrozenCLIPEmbedder shaped like upstream's (spec §4.7): hub-bound transformers classes, device
# the string "cuda", no size parameters. Written from the spec for this test.
SPEC_CLIP_MODULE = '''
import torch.nn as nn
from transformers import CLIPTokenizer, CLIPTextModel


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class FrozenCLIPEmbedder(AbstractEncoder):
    def __init__(self, version="openai/clip-vit-large-patch14", device="cuda", max_length=77,
                 freeze=True, layer="last", layer_idx=None):
        super().__init__()
        self.tokenizer = CLIPTokenizer.from_pretrained(version)
        self.transformer = CLIPTextModel.from_pretrained(version)
        self.device = device
        self.max_length = max_length
        self.layer = layer
        if freeze:
            self.transformer = self.transformer.eval()
            for param in self.parameters():
                param.requires_grad = False

    def forward(self, text):
        batch = self.tokenizer(text, truncation=True, max_length=self.max_length,
                               return_length=True, return_overflowing_tokens=False,
                               padding="max_length", return_tensors="pt")
        tokens = batch["input_ids"].to(self.device)
        return self.transformer(input_ids=tokens, output_hidden_states=False).last_hidden_state

    def encode(self, text):
        return self(text)
'''

# Upstream's DDIMSampler.register_buffer (spec §4.8): every tensor to "cuda".
SPEC_REGISTER_BUFFER = '''    def register_buffer(self, name, attr):
        if type(attr) == torch.Tensor:
            if attr.device != torch.device("cuda"):
                attr = attr.to(torch.device("cuda"))
        setattr(self, name, attr)
'''


def spec_shaped_upstream(tmp_path):
    """A copy of our model code with upstream's 2023 behaviours put back where the spec names
    them: hub-bound CLIP on today's transformers, CUDA-bound sampler buffers, and the DDIM
    schedule that crashes for S in {3, 9, 27, 36, 37}."""
    tree = tmp_path / "upstream"
    for folder in ("ldm", "cldm", "annotator", "models"):
        shutil.copytree(os.path.join(REPO, folder), tree / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "ldm/modules/encoders/modules.py").write_text(SPEC_CLIP_MODULE)
    ddim = (tree / "cldm/ddim_hacked.py").read_text()
    start = ddim.index("    def register_buffer")
    end = ddim.index("    def make_schedule")
    ddim = ddim[:start] + SPEC_REGISTER_BUFFER + "\n" + ddim[end:]
    fixed = "self.ddim_timesteps = timesteps[timesteps < self.ddpm_num_timesteps]"
    assert fixed in ddim
    ddim = ddim.replace(fixed, "self.ddim_timesteps = timesteps")
    (tree / "cldm/ddim_hacked.py").write_text(ddim)
    return tree


def test_spec_shaped_upstream_passes_through_the_shims(tmp_path, capsys):
    tree = spec_shaped_upstream(tmp_path)
    rc, result, captured = run_tool(tmp_path, capsys, "--upstream", str(tree), "--stages",
                                    "clip", "ddim", "canny2image")
    assert rc == 0, captured.out + captured.err
    assert set(result["shims"]) == {"clip_offline", "clip_sizes", "clip_key_layout",
                                    "clip_device", "ddim_device"}
    rows = {row["stage"]: row for row in result["rows"]}
    # transformers' CLIP text model (eager) vs ours: independent implementations, same weights.
    assert rows["clip"]["verdict"] == "PASS" and rows["clip"]["worst_rel_err"] <= 1e-5
    assert any("upstream crashes at S=3,9,27,36,37" in n for n in rows["ddim"]["notes"]), rows
    assert rows["ddim"]["verdict"] == "PASS"
    assert rows["canny2image"]["verdict"] == "PASS"


def test_upstream_side_failure_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    tree = spec_shaped_upstream(tmp_path)
    (tree / "cldm/cldm.py").write_text("import a_package_nobody_has\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where the kept log goes
    rc, result, captured = run_tool(tmp_path, capsys, "--upstream", str(tree), "--stages", "vae")
    assert rc == 2 and result is None
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "a_package_nobody_has" in lines[0], lines
    log = lines[0].split("(full log: ")[1].rstrip(")")
    assert os.path.dirname(os.path.dirname(log)) == str(tmp_path)
    assert os.listdir(os.path.dirname(log)) == ["worker_upstream.log"]   # no weights left behind


def test_pl_distributed_shim_aliases_rank_zero_only(tmp_path, monkeypatch):
    """PL 2.x without `utilities.distributed`: the alias appears only for a tree that imports it."""
    def rank_zero_only(fn):
        return fn

    modules = {"pytorch_lightning": types.ModuleType("pytorch_lightning"),
               "pytorch_lightning.utilities": types.ModuleType("pytorch_lightning.utilities"),
               "pytorch_lightning.utilities.rank_zero":
                   types.ModuleType("pytorch_lightning.utilities.rank_zero")}
    modules["pytorch_lightning"].__path__ = []
    modules["pytorch_lightning.utilities"].__path__ = []
    modules["pytorch_lightning.utilities.rank_zero"].rank_zero_only = rank_zero_only
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "pytorch_lightning.utilities.distributed", raising=False)
    (tmp_path / "ldm/models/diffusion").mkdir(parents=True)
    ddpm = tmp_path / "ldm/models/diffusion/ddpm.py"
    ddpm.write_text("import torch\n")
    assert worker.shim_pl_distributed(str(tmp_path)) is False
    ddpm.write_text("from pytorch_lightning.utilities.distributed import rank_zero_only\n")
    assert worker.shim_pl_distributed(str(tmp_path)) is True
    from pytorch_lightning.utilities.distributed import rank_zero_only as aliased
    assert aliased is rank_zero_only
    monkeypatch.delitem(sys.modules, "pytorch_lightning.utilities.distributed")


def test_fit_clip_layout_maps_2023_keys_to_transformers_5():
    tensor = torch.zeros(2)
    ckpt = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": tensor,
            "cond_stage_model.transformer.text_model.embeddings.position_ids": tensor,
            "model.diffusion_model.out.2.weight": tensor}
    expected = {"cond_stage_model.transformer.final_layer_norm.weight": tensor,
                "model.diffusion_model.out.2.weight": tensor}
    fitted, changed = worker.fit_clip_layout(ckpt, expected)
    assert changed and set(fitted) == set(expected)
    same, changed = worker.fit_clip_layout(ckpt, ckpt)
    assert not changed and same == ckpt


def test_compare_ddim_records_upstream_crashes_as_data():
    table = {k: torch.arange(3.0) for k in ("ddim_alphas", "ddim_sigmas")}
    table["ddim_timesteps"] = torch.arange(3)
    ours = {"S3.eta0": table, "S4.eta0": table, "S5.eta0": table}
    up = {"S3.eta0": {"error": "IndexError: index 1000 is out of bounds"}, "S4.eta0": table,
          "S5.eta0": dict(table, ddim_sigmas=torch.arange(3.0) * (1 + 1e-3))}
    row = diff_upstream.compare_ddim(ours, up)
    assert not row.ok and row.items == 3 and abs(row.worst - 1e-3) < 1e-5
    assert any("S=3 " in n for n in row.notes)
    up["S5.eta0"] = table
    up["S4.eta0"] = {"error": "IndexError: boom"}        # not a documented crash
    row = diff_upstream.compare_ddim(ours, up)
    assert not row.ok and any("S4.eta0" in n for n in row.notes)
