"""Every patched forward runs under the CUDA device of its input (kernels/platform.py's
on_input_device, applied by kernels.patch to each forward it installs): Triton launches on the
current device, so a model on cuda:1 with the current device at 0 needs the switch.

Checked on CPU with a stand-in tensor that reports cuda:1 and a stub torch.cuda.device."""
import contextlib

import pytest
import torch

import kernels
from kernels import platform
from test_patch import _toy, _toy_inputs


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it lives on cuda:<index> (is_cuda and get_device() are all the guard
    reads)."""
    index = 1

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return self.index


def _on_cuda(index, shape=(2, 3)):
    t = torch.zeros(shape).as_subclass(_OnCuda)
    t.index = index
    return t


class _Entered(Exception):
    pass


@pytest.fixture
def guard_log(monkeypatch):
    """Stub torch.cuda: current device 0; torch.cuda.device(d) records d."""
    log = []

    @contextlib.contextmanager
    def device(d):
        log.append(("enter", torch.device(d)))
        yield
        log.append(("exit", torch.device(d)))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    return log


def test_switches_only_to_another_cuda_device(guard_log):
    seen = []
    fn = platform.on_input_device(lambda *a, **k: seen.append(list(guard_log)) or "out")
    assert fn(_on_cuda(1), 3) == "out"
    assert seen[-1] == [("enter", torch.device("cuda", 1))]          # ran inside the guard
    assert guard_log[-1] == ("exit", torch.device("cuda", 1))
    guard_log.clear()
    fn(_on_cuda(0))                                                 # already current: no switch
    fn(torch.zeros(2))                                              # CPU (interpreter): none
    fn("text", scale=1.0)                                           # no tensor: none
    assert guard_log == []
    fn(None, x=_on_cuda(1))                                         # a keyword tensor counts
    assert guard_log[0] == ("enter", torch.device("cuda", 1))


def test_first_tensor_argument_decides(guard_log):
    fn = platform.on_input_device(lambda *a: None)
    fn(torch.zeros(1), _on_cuda(1))                  # first tensor is on the CPU: left alone
    assert guard_log == []


def test_cpu_calls_never_touch_torch_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.cuda used for a CPU tensor")
    monkeypatch.setattr(torch.cuda, "current_device", boom)
    monkeypatch.setattr(torch.cuda, "device", boom)
    assert platform.on_input_device(lambda x: x + 1)(torch.ones(1)).item() == 2


def test_every_patched_forward_is_guarded(monkeypatch):
    m = _toy()
    with kernels.patched(m) as h:
        assert h.active
        entered = []

        def device(d):
            entered.append(torch.device(d))
            raise _Entered   # stop before any kernel sees the stand-in tensor

        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "device", device)
        guarded = [(mod, name) for mod, name, _, new in h._changes
                   if getattr(new, "__wrapped__", None) is not None]
        identities = [mod for mod, name, _, new in h._changes if not hasattr(new, "__wrapped__")]
        # ff_residual is a variant of add_layer_norm's forward, not a forward of its own
        sites = sum(v["sites"] for k, v in h.counts.items() if k != "ff_residual")
        assert len(guarded) == sites and sites > 0
        assert all(isinstance(mod, torch.nn.SiLU) for mod in identities)  # fused GN+SiLU slot 1
        for mod, name in guarded:
            with pytest.raises(_Entered):
                getattr(mod, name)(_on_cuda(1, (2, 8, 6, 6)))
        assert entered == [torch.device("cuda", 1)] * sites
        monkeypatch.undo()
        # the guard leaves CPU (interpreter) numerics alone: patched output still matches
        args = _toy_inputs()
        with torch.no_grad():
            got = m(*args)
    with torch.no_grad():
        ref = m(*args)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
