"""Compile the Triton kernels for a GPU that is not here: what each kernel costs in registers,
register spills and shared memory on an H100 (sm_90) or A100 (sm_80), measured on any machine.

The Triton interpreter checks what a kernel computes, not whether it compiles for a GPU or how it
uses one. ``CompileOnlyDriver`` stands in for Triton's CUDA driver: every launch goes through the
whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for the chosen architecture,
and nothing runs: output tensors are left as allocated. Triton's autotuner "benchmarks" every
config, so each one is compiled, and the configs whose shared memory does not fit the device are
refused as a real GPU would refuse them. ptxas's register and stack (spill) counts are read from
each cubin with cuobjdump, which ships with Triton, and so is the width of every global memory access
in the machine code (a memory-bound kernel should move 64 or 128 bits per instruction, not 16).

    with CompileOnlyDriver(arch=90) as gpu:
        ...launch the kernels on CPU tensors...
    for k in gpu.compiled: print(k.name, k.registers, k.spill_bytes, k.shared_bytes)

The launchers accept CPU tensors while a ``CompileOnlyDriver`` is active (nothing is read), and
``fastmae.kernels.resolve_kernels`` picks the Triton path, so a whole model step compiles the
exact kernels and configs that step launches on the GPU. It must run without TRITON_INTERPRET=1:
under the interpreter Triton builds interpreted functions, which cannot be compiled.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver as triton_driver

# What Triton asks of the device (CUDA's cudaDeviceProp values): H100 SXM (sm_90), A100 SXM (sm_80).
DEVICE_PROPERTIES = {
    90: {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
         "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120},
    80: {"max_shared_mem": 166912, "multiprocessor_count": 108, "max_num_regs": 65536,
         "warpSize": 32, "sm_clock_rate": 1410000, "mem_clock_rate": 1593000, "mem_bus_width": 5120},
}
MAX_THREADS_PER_BLOCK = 1024
_DEVICE_NUMBERS = itertools.count(1000)  # one per driver: Triton keys its kernel caches by device
# The meta-parameters worth showing of a kernel's constexprs (the rest are shapes and switches).
_TILE_PARAMETER = re.compile(r"^(BLOCK_\w+|ROW_TILES|GROUP_M)$")


@dataclass
class CompiledKernel:
    """One compiled specialisation of a kernel (for autotuned kernels: one config)."""

    name: str
    arch: int
    tiles: dict  # BLOCK_* / ROW_TILES / GROUP_M constexprs
    constants: dict  # every constexpr of the specialisation
    num_warps: int
    num_stages: int
    shared_bytes: int  # dynamic shared memory the launch asks for
    max_shared_bytes: int
    registers: int | None = None  # per thread; None when the launch was refused before loading
    spill_bytes: int | None = None  # ptxas stack frame per thread: register spills (these kernels call nothing)
    # global memory instructions in the machine code by kind (LDG loads, STG stores, LDGSTS async
    # copies to shared memory) and access width in bits: {"LDG": {"128": 16, "32": 128}, ...}
    memory_instructions: dict = field(default_factory=dict)
    fits: bool = True  # shared memory and registers within the device's per-block limits
    refusal: str = ""  # why a GPU would refuse to launch it

    def as_dict(self) -> dict:
        return asdict(self)


def _no_launch(*args, **kwargs) -> None:
    """Triton's launcher slot: called for every launch, which runs nothing here."""


class _Utils:
    """The parts of Triton's CUDA utils that loading a kernel uses."""

    def __init__(self, gpu: "CompileOnlyDriver"):
        self.gpu = gpu

    def get_device_properties(self, device):
        return self.gpu.properties

    def load_binary(self, name, cubin, shared, device):
        record = self.gpu.compiled[-1]  # Triton builds the launcher, then loads the binary
        record.registers, record.spill_bytes, record.memory_instructions = cubin_resources(cubin, name)
        threads = record.num_warps * 32
        if record.registers * threads > self.gpu.properties["max_num_regs"]:
            record.fits = False
            record.refusal = f"{record.registers} registers x {threads} threads exceed the register file"
        return name, name, record.registers, record.spill_bytes, MAX_THREADS_PER_BLOCK

    def unload_module(self, module):
        pass


class CompileOnlyDriver(DriverBase):
    """A Triton driver for a GPU that is not there: launches compile for ``arch`` and do not run.

    Use it as a context manager; it makes itself Triton's active driver and restores the previous
    one on exit. Each instance reports as a device of its own, so Triton's per-device kernel caches
    start empty and every kernel the workload launches is compiled (and recorded) again.
    """

    def __init__(self, arch: int = 90):
        super().__init__()
        if arch not in DEVICE_PROPERTIES:
            raise ValueError(f"arch must be one of {sorted(DEVICE_PROPERTIES)} (sm_90: H100, sm_80: A100), got {arch}")
        self.arch = arch
        self.properties = dict(DEVICE_PROPERTIES[arch])
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(self)
        self.compiled: list[CompiledKernel] = []
        self.device = next(_DEVICE_NUMBERS)
        self._previous = None

    # -- Triton's driver interface --
    @staticmethod
    def is_active():
        return False  # never picked by Triton on its own

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("a compile-only driver builds no launcher code")

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)

    def get_benchmarker(self):
        def compile_once(kernel_call, quantiles=None, **_):
            kernel_call()  # compiles (or is refused: the autotuner then skips the config)
            return [0.0] * len(quantiles) if quantiles else 0.0

        return compile_once

    def get_empty_cache_for_benchmark(self):
        import torch

        return torch.empty(0)

    def clear_cache(self, cache):
        pass

    def launcher_cls(self, src, metadata):
        constants = {_constant_name(src, key): _plain(value) for key, value in getattr(src, "constants", {}).items()}
        record = CompiledKernel(
            name=metadata.name, arch=self.arch,
            tiles={k: v for k, v in constants.items() if _TILE_PARAMETER.match(k)}, constants=constants,
            num_warps=metadata.num_warps, num_stages=metadata.num_stages,
            shared_bytes=metadata.shared, max_shared_bytes=self.properties["max_shared_mem"],
        )
        if metadata.shared > self.properties["max_shared_mem"]:
            record.fits = False
            record.refusal = f"needs {metadata.shared} bytes of shared memory, the device has {record.max_shared_bytes}"
        self.compiled.append(record)
        return _no_launch

    # -- context manager --
    def __enter__(self) -> "CompileOnlyDriver":
        self._previous = getattr(triton_driver, "_active", None)
        triton_driver.set_active(self)
        _forget_tuning()  # every config is compiled for this target, not only a best one chosen before
        return self

    def __exit__(self, *exc) -> None:
        triton_driver._active = self._previous
        _forget_tuning()  # the "winners" here were never timed: a real GPU must tune for itself


def _forget_tuning() -> None:
    """Clear the chosen configs (and cached benchmark function) of fastmae's autotuned kernels."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("fastmae.kernels") or module is None:
            continue
        for value in vars(module).values():
            if isinstance(value, triton.runtime.Autotuner):
                value.cache.clear()
                value.__dict__.pop("do_bench", None)


def active_compile_only_driver() -> CompileOnlyDriver | None:
    """The CompileOnlyDriver that Triton launches into now, if any."""
    active = getattr(triton_driver, "_active", None)
    return active if isinstance(active, CompileOnlyDriver) else None


def _constant_name(src, key) -> str:
    """ASTSource.constants keys are argument paths ((index,) tuples) or names, by Triton version."""
    if isinstance(key, tuple) and len(key) == 1 and isinstance(key[0], int):
        return src.fn.arg_names[key[0]]
    if isinstance(key, int):
        return src.fn.arg_names[key]
    return str(key)


def _plain(value):
    """JSON-friendly constexpr values (tl.constexpr, dtypes)."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


_RESOURCE_LINE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)")
_GLOBAL_ACCESS = re.compile(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)")
_WIDTH_SUFFIX = {"128": "128", "64": "64", "U16": "16", "S16": "16", "U8": "8", "S8": "8"}


def _access_width(modifiers: str) -> str:
    """Bits moved by one LDG/STG/LDGSTS from its modifiers (.E.128, .E.U16, ...; none: 32)."""
    widths = [_WIDTH_SUFFIX[m] for m in modifiers.split(".") if m in _WIDTH_SUFFIX]
    return widths[-1] if widths else "32"


def cubin_resources(cubin: bytes, name: str) -> tuple[int, int, dict]:
    """(registers per thread, stack bytes per thread, global memory instructions by kind and width)
    of kernel ``name`` in ``cubin``, from cuobjdump's resource usage and disassembly."""
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)

        def dump(*flags: str) -> str:
            return subprocess.run([tool, *flags, str(path)], check=True, capture_output=True, text=True).stdout

        usage, sass = dump("--dump-resource-usage"), dump("--dump-sass")
    memory: dict[str, dict[str, int]] = {}
    for kind, modifiers in _GLOBAL_ACCESS.findall(sass):
        widths = memory.setdefault(kind, {})
        width = _access_width(modifiers)
        widths[width] = widths.get(width, 0) + 1
    for function, registers, stack in _RESOURCE_LINE.findall(usage):
        if function == name:
            return int(registers), int(stack), memory
    raise RuntimeError(f"cuobjdump printed no resource usage for {name}:\n{usage}")
