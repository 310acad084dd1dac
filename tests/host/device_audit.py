"""What the pack's own code does with tensors during a run, recorded without the hardware.

``PackAudit(device)`` is a torch function mode: every torch call (functions, tensor methods, ``float(t)``,
``bool(t)``) passes through it while the ``with`` block runs. A call is the pack's when the first Python frame
outside torch is in ``guidance_core/`` or ``nodes/`` of this repository, so ComfyUI's own calls (which may use
float64, for instance in its noise schedules) are never counted. For the pack's calls it records:

- ``float64``: calls asked for float64 or returning it (they raise at once with ``forbid_float64``, as on MPS);
- ``factories``: tensors created from nothing (``torch.zeros``, ``arange``, ...) without ``device=`` equal to
  ``device`` (``*_like`` and ``Tensor.new_*`` inherit their tensor's device and need none);
- ``moves``: ``.to()``/``.cpu()``/``.cuda()`` calls to another device;
- ``host_reads``: device-to-host reads (``.item()``, ``.tolist()``, ``float(t)``, ``bool(t)``, ``torch.equal``, ...),
  as ``(file, function)`` of the pack's frame;
- ``off_device``: any tensor a pack call returns on another device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_DIRS = tuple(str(REPO_ROOT / folder) + "/" for folder in ("guidance_core", "nodes"))
_SKIPPED_DIRS = (str(Path(torch.__file__).parent) + "/", __file__)

FACTORIES = frozenset({"zeros", "ones", "full", "empty", "arange", "linspace", "logspace", "tensor", "as_tensor",
                       "randn", "rand", "randint", "randperm", "eye", "scalar_tensor"})
HOST_READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "equal", "allclose",
                        "is_nonzero", "numpy", "cpu"})
MOVES = frozenset({"to", "cpu", "cuda", "type"})


def pack_frame():
    """The first frame outside torch and this module, if it is in the pack's code; else None."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED_DIRS):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PACK_DIRS):
        return None
    return frame


def _where(frame) -> str:
    return f"{Path(frame.f_code.co_filename).relative_to(REPO_ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})"


def _requested_device(func_name: str, args, kwargs):
    """The device a creation or move call asks for, or None where it names none."""
    if "device" in kwargs:
        return kwargs["device"]
    if func_name == "cpu":
        return torch.device("cpu")
    if func_name in MOVES:
        for arg in args[1:]:
            if isinstance(arg, (str, torch.device)):
                return arg
            if isinstance(arg, torch.Tensor):
                return arg.device
    return None


class PackAudit(TorchFunctionMode):
    def __init__(self, device: torch.device, forbid_float64: bool = False):
        super().__init__()
        self.device = torch.device(device)
        self.forbid_float64 = forbid_float64
        self.float64: list[str] = []
        self.factories: list[str] = []
        self.moves: list[str] = []
        self.host_reads: list[tuple[str, str]] = []
        self.off_device: list[str] = []
        self.pack_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        wants_float64 = any(a is torch.float64 for a in args) or kwargs.get("dtype") is torch.float64
        frame = pack_frame() if (wants_float64 or name in FACTORIES | HOST_READS | MOVES) else None
        if frame is not None:
            self._check_call(name, frame, args, kwargs, wants_float64)
        result = func(*args, **kwargs)
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
        if tensors and any(t.dtype == torch.float64 or t.device != self.device for t in tensors):
            frame = frame or pack_frame()
            if frame is not None:
                if any(t.dtype == torch.float64 for t in tensors):
                    self._float64(f"{name} returned float64 at {_where(frame)}")
                if any(t.device != self.device for t in tensors):
                    self.off_device.append(f"{name} at {_where(frame)}")
        return result

    def _check_call(self, name, frame, args, kwargs, wants_float64) -> None:
        self.pack_calls += 1
        if wants_float64:
            self._float64(f"{name}(..., float64) at {_where(frame)}")
        requested = _requested_device(name, args, kwargs)
        if name in FACTORIES and (requested is None or torch.device(requested) != self.device):
            self.factories.append(f"torch.{name}(device={requested}) at {_where(frame)}")
        if name in MOVES and requested is not None and torch.device(requested) != self.device:
            self.moves.append(f".{name}({requested}) at {_where(frame)}")
        if name in HOST_READS:
            path = str(Path(frame.f_code.co_filename).relative_to(REPO_ROOT))
            self.host_reads.append((path, frame.f_code.co_name))

    def _float64(self, what: str) -> None:
        self.float64.append(what)
        if self.forbid_float64:
            raise RuntimeError(f"float64 on a device without it: {what}")
