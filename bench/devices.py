"""The benchmarks' device choice (--device) and GPU utilization sampling, shared by the overhead and scaling parts."""

from __future__ import annotations

import statistics
import subprocess
import threading
from collections import defaultdict
from collections.abc import Callable

import torch


def device_overrides(device: str) -> list[str]:
    """The trainer settings of a device: the GPU runs bf16 mixed precision, the CPU fp32."""
    if device == "cuda":
        return ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]
    return ["trainer.accelerator=cpu", "trainer.precision=32-true"]


def pick_device(requested: str, cuda_available: bool | None = None) -> str:
    """--device auto|cpu|cuda -> cpu or cuda; cuda asked for without a GPU is an error."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "cuda" and not cuda:
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA GPU")
    return "cuda" if requested in ("auto", "cuda") and cuda else "cpu"


# --- GPU utilization -------------------------------------------------------------------------------------------

def gpu_utilization_reader() -> Callable[[], float] | None:
    """A function returning the GPU's current utilization in percent: torch's (needs pynvml), else nvidia-smi."""
    try:
        torch.cuda.utilization(0)
        return lambda: float(torch.cuda.utilization(0))
    except Exception:  # no pynvml: ask nvidia-smi
        pass

    def smi() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return float(out.split()[0])

    try:
        smi()
        return smi
    except Exception:
        return None


class UtilizationSampler:
    """Samples a utilization reader every `interval` seconds in a thread while a way runs; mean per way."""

    def __init__(self, reader: Callable[[], float] | None, interval: float = 0.1) -> None:
        self.reader, self.interval = reader, interval
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._way: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, way: str) -> None:
        if self.reader is None:
            return
        self._way, self._stop = way, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples[self._way].append(self.reader())
            except Exception:
                return
            self._stop.wait(self.interval)

    def mean(self, way: str) -> float | None:
        values = self.samples.get(way)
        return statistics.fmean(values) if values else None
