"""Weight quantization of whole modules (runtime.quantize), through torchao.

torchao replaces each nn.Linear's weight with a quantized tensor subclass and keeps the module itself, so
diffstage's native Linear (which casts its input to `weight.dtype`: the subclass reports the activations'
dtype), our kernels, forward hooks and torch.compile see the same modules as before. Only nn.Linear layers
are quantized; norms, embeddings and convolutions keep the run's dtype.

    int8          int8 weights, dequantized in the matmul (Int8WeightOnlyConfig): ~1/4 of float32's bytes
    int8_dynamic  int8 weights and activations quantized per token at run time (Int8DynamicActivationInt8WeightConfig)
    fp8           float8 weights and activations (Float8DynamicActivationFloat8WeightConfig): CUDA only"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from .errors import DiffstageError, LoadError, did_you_mean, shown

METHODS = ("none", "int8", "int8_dynamic", "fp8")
INSTALL_HINT = "pip install diffstage[quant]"


def quantize_problems(runtime: dict[str, Any]) -> list[str]:
    """The run config's runtime.quantize and runtime.quantize_modules, checked without the model."""
    problems = []
    method = runtime.get("quantize", "none")
    if method not in METHODS:
        problems.append(f"runtime.quantize must be one of {' | '.join(METHODS)}, got {shown(method)}")
    names = runtime.get("quantize_modules")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)):
        problems.append("runtime.quantize_modules must be a list of module names such as [transformer, text_encoder] "
                        f"(or null: the denoiser), got {shown(names)}")
    narrow = runtime.get("matmul_dtype")
    if method in METHODS[1:] and narrow not in (None, "auto"):
        problems.append(f"runtime.matmul_dtype={narrow} and runtime.quantize={method} both choose how the Linear "
                        "weights are stored; set one of them (runtime.matmul_dtype=null or runtime.quantize=none)")
    return problems


def quantize_targets(runtime: dict[str, Any], checked: Any) -> dict[str, str]:
    """Module name -> method for this run (empty for quantize=none). quantize_modules null means the denoiser:
    the module each denoising stage (a stage that takes step caches) runs as its `transformer` argument."""
    method = runtime.get("quantize", "none")
    if method in (None, "none"):
        return {}
    names = runtime.get("quantize_modules")
    if names is None:
        names = checked.denoisers()
        if not names:
            raise DiffstageError(f"runtime.quantize={method}: model '{checked.spec.name}' has no denoising stage, so "
                                 "there is no default module to quantize; name them in runtime.quantize_modules")
    known = list(checked.spec.modules)
    if not known:  # a model that runs whatever modules its checkpoint lists, in the checkpoint's own pipeline
        raise DiffstageError(f"runtime.quantize={method}: model '{checked.spec.name}' lists no modules of its own (they "
                             "come from the checkpoint), so runtime.quantize_modules cannot name them; use a model "
                             "YAML that lists its modules")
    for name in names:
        if name not in known:
            hint = did_you_mean(name, known)
            raise DiffstageError(f"runtime.quantize_modules: model '{checked.spec.name}' has no module '{name}'"
                                 + (f" ({hint})" if hint else "") + f"; its modules: {', '.join(known)}")
    return dict.fromkeys(names, method)


# Log lines torchao's import causes on a machine without its CUDA extensions, wherever it is imported from
# (Diffusers imports it when installed): logger -> the start of the messages that say nothing to our users.
IMPORT_NOISE = {"torchao": "Failed to load ", "torch.utils._pytree": "<enum ",
                "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects"}


class _DropStarting(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start) and not record.getMessage().startswith(self.start)


def silence_import_noise() -> None:
    """Drop IMPORT_NOISE's lines (once per process; other lines of those loggers still show), and torch.compile's
    note that torchao's int8 tensors have no stable hash for its cache (they are compiled all the same)."""
    warnings.filterwarnings("ignore", message=r".* does not implement _stable_hash_for_caching")
    for name, start in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropStarting) for f in logger.filters):
            logger.addFilter(_DropStarting(start))


def torchao_quantization():
    """torchao.quantization, imported quietly (silence_import_noise), or a DiffstageError naming the extra."""
    silence_import_noise()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as quantization
    except ImportError:
        raise DiffstageError(f"runtime.quantize needs torchao, which is not installed: {INSTALL_HINT}") from None
    return quantization


def check_quantize_backend(method: str, device: torch.device) -> None:
    """Refuse, before any weight loads, a method this device cannot run (and a missing torchao)."""
    if method in (None, "none"):
        return
    torchao_quantization()
    if method == "fp8":
        if device.type != "cuda":
            raise DiffstageError(f"runtime.quantize=fp8 needs a CUDA GPU (float8 matmuls), but the run's device is "
                                 f"{device}; use runtime.quantize=int8 or int8_dynamic on the CPU")
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise DiffstageError("runtime.quantize=fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                                 f"{torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}; "
                                 "use runtime.quantize=int8")


def _config(method: str):
    q = torchao_quantization()
    configs = {"int8": q.Int8WeightOnlyConfig, "int8_dynamic": q.Int8DynamicActivationInt8WeightConfig,
               "fp8": q.Float8DynamicActivationFloat8WeightConfig}
    return configs[method]()


def check_quantizable(name: str, cls: type) -> None:
    """Refuse a module class without weights (a tokenizer, a scheduler): the loader asks before any weight loads."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise LoadError(f"runtime.quantize_modules: module '{name}' is a {getattr(cls, '__name__', cls)}, which has no "
                        "weights to quantize; name model modules (a transformer, unet or text encoder)")


def quantize_module(module: Any, method: str, name: str) -> None:
    """Quantize the nn.Linear weights of a loaded module in place (it must not be shared unquantized: the
    loader keys quantized modules apart, see ModuleKey.quantize)."""
    check_quantizable(name, type(module))
    if not any(isinstance(m, torch.nn.Linear) for m in module.modules()):
        raise LoadError(f"runtime.quantize_modules: module '{name}' ({type(module).__name__}) has no nn.Linear "
                        "layers to quantize")
    config = _config(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's deprecation notes about its own internals
        torchao_quantization().quantize_(module, config)
    if all(p.device.type == "cpu" for p in module.parameters()):
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the replaced full-precision weights' memory back to the system. glibc keeps freed heap memory for
    reuse, so without this the process stays as large as before quantizing (measured on the benchmarks' bench-size
    checkpoint: RSS after loading 913 MB without, 622 MB with; float32 852 MB)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
