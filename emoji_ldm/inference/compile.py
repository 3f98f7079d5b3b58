"""torch.compile helpers shared by the sampler (serve, bulk, generate) and training (`train/speed.py`)."""

from __future__ import annotations

from emoji_ldm.errors import UserError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes


def compile_kwargs(mode: str, *, static: bool = False) -> dict:
    """`torch.compile` keyword arguments. `static` compiles for fixed shapes (`dynamic=False`): training batches
    have one shape, and a UNet forward that another compile in the same process (or dynamo's saved profile) has
    already seen at other shapes would otherwise be traced with symbolic sizes, which inductor's backward for the
    UNet's convolutions cannot always order (torch 2.13: "cannot determine truth value of Relational")."""
    kwargs = {} if mode == "default" else {"mode": mode}
    return {**kwargs, "dynamic": False} if static else kwargs


def require_compiler(device_type: str) -> None:
    """What inductor builds with, or one clear line now instead of its error from deep in the first step: a C++
    compiler for CPU kernels (`$CXX`, else g++, c++ or clang++), Triton and a C compiler for CUDA kernels."""
    import importlib.util
    import os
    import shutil

    def found(env: str, names: tuple[str, ...]) -> bool:
        chosen = os.environ.get(env)
        return bool(shutil.which(chosen)) if chosen else any(shutil.which(n) for n in names)

    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise UserError("--compile on a GPU needs Triton, which is not installed here: pip install triton (it "
                            "comes with the CUDA wheels of torch), or drop --compile")
        if not found("CC", ("cc", "gcc", "clang")):
            raise UserError("--compile on a GPU needs a C compiler for Triton's launchers: none found ($CC, cc, gcc, "
                            "clang): install one (apt-get install gcc), or drop --compile")
    elif not found("CXX", ("g++", "c++", "clang++")):
        cxx = os.environ.get("CXX")
        raise UserError(f"--compile on CPU needs a C++ compiler for inductor's kernels: "
                        f"{f'CXX={cxx!r} is not on PATH' if cxx else 'no g++, c++ or clang++ on PATH'}; install "
                        "one (apt-get install g++; `make test` does), or drop --compile")
