"""Compute devices: pick the best available one, describe them, and decide on bf16.

torch is imported inside the functions, never at module import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


@dataclass(frozen=True)
class DeviceInfo:
    """What the device picker and ``cellmae info`` show about one device."""

    name: str  # "cpu", "cuda:0", "mps"
    description: str  # "NVIDIA H100 80GB HBM3", "Intel(R) Xeon(R) … (2 threads)"
    total_memory: int | None  # bytes
    free_memory: int | None  # bytes
    bf16: bool  # fast bf16 matrix multiplication (autocast worth it)

    def label(self) -> str:
        """One line for a picker, e.g. ``cuda:0 — NVIDIA H100 (70.1 of 79.6 GiB free)``."""
        mem = ""
        if self.total_memory:
            gib = 1024**3
            free = f"{self.free_memory / gib:.1f} of " if self.free_memory is not None else ""
            mem = f" ({free}{self.total_memory / gib:.1f} GiB free)"
        return f"{self.name} — {self.description}{mem}"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX) or is Apple
    silicon; there bf16 autocast is several times faster than fp32."""
    import platform

    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return True
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_devices() -> list[DeviceInfo]:
    """Every device torch can use here, best first (cuda devices, mps, then cpu)."""
    import torch

    devices: list[DeviceInfo] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
            except RuntimeError:
                free, total = None, props.total_memory
            devices.append(
                DeviceInfo(f"cuda:{i}", props.name, total, free, torch.cuda.is_bf16_supported())
            )
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(DeviceInfo("mps", "Apple Metal (MPS)", None, None, True))
    mem_total = mem_free = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        mem_total, mem_free = vm.total, vm.available
    except ImportError:  # pragma: no cover - psutil comes with napari
        pass
    devices.append(
        DeviceInfo(
            "cpu",
            f"{_cpu_name()} ({torch.get_num_threads()} threads)",
            mem_total,
            mem_free,
            cpu_has_fast_bf16(),
        )
    )
    return devices


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` → best available (cuda > mps > cpu); otherwise validate the request.

    The environment variable ``CELLMAE_DEVICE`` overrides ``auto``.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    name = (device or os.environ.get("CELLMAE_DEVICE") or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"Unknown device {device!r}: use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"Device {device!r} was requested but torch sees no CUDA GPU here "
            f"(torch {torch.__version__}). Use --device cpu or auto."
        )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError(f"Device {device!r} was requested but MPS is not available here.")
    return dev


def default_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision worth using for inference on ``device``, or None for fp32."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None
