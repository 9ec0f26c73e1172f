"""LoRA on a model adapter's denoiser: add, enable / disable, save and load in diffusers' format, and
fold into the base weights. Shared by preference training and serving.

Works for denoisers with diffusers' ``PeftAdapterMixin`` (UNets, SD3) through their stock methods,
and for those without it (PixArt's transformer) through peft directly, from the same file format.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name


def stock_pipeline(pipe):
    """The diffusers pipeline behind an adapter (``raypref.models`` adapters wrap it as ``.pipe``; a
    bare pipeline is its own)."""
    inner = getattr(pipe, "pipe", None)
    return inner if inner is not None and hasattr(inner, "components") else pipe


def denoiser_attr(pipe) -> str:
    """Name of the stock pipeline's attribute holding the denoiser ("transformer" or "unet")."""
    stock = stock_pipeline(pipe)
    for name in ("transformer", "unet"):
        if getattr(stock, name, None) is pipe.denoiser:
            return name
    raise ValueError(f"{type(pipe).__name__}: denoiser is neither .transformer nor .unet")


@contextlib.contextmanager
def use_denoiser(pipe, module: torch.nn.Module):
    """Temporarily make ``module`` the pipeline's denoiser (the full fine-tuning reference)."""
    name, stock = denoiser_attr(pipe), stock_pipeline(pipe)
    saved = getattr(stock, name)
    object.__setattr__(stock, name, module)  # bypass DiffusionPipeline's config bookkeeping
    try:
        yield
    finally:
        object.__setattr__(stock, name, saved)


def _lora_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(denoiser: torch.nn.Module, lora_config, adapter_name: str = "default") -> None:
    """diffusers' ``add_adapter`` where the model has it (PeftAdapterMixin: SD3, UNets); peft's
    ``inject_adapter_in_model`` otherwise (PixArt's transformer has no PeftAdapterMixin)."""
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(lora_config, adapter_name=adapter_name)
        if adapter_name != "default":
            denoiser.set_adapter("default")
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora_config, denoiser, adapter_name)
        set_active_adapter(denoiser, "default")


def set_active_adapter(denoiser: torch.nn.Module, name: str) -> None:
    for layer in _lora_layers(denoiser):
        layer.set_adapter(name)


def set_adapters_enabled(denoiser: torch.nn.Module, enabled: bool) -> None:
    """``enable_adapters()`` / ``disable_adapters()`` of diffusers, or the same loop for plain peft."""
    if hasattr(denoiser, "disable_adapters") and getattr(denoiser, "_hf_peft_config_loaded", False):
        denoiser.enable_adapters() if enabled else denoiser.disable_adapters()
        return
    for layer in _lora_layers(denoiser):
        layer.enable_adapters(enabled)


def lora_state_dict(denoiser: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, adapter_name=adapter_name)


def save_lora(pipe, lora_config, directory: str) -> None:
    """The policy adapter in diffusers' LoRA format (``pytorch_lora_weights.safetensors`` with the
    LoraConfig as metadata), loadable by the stock pipeline's ``load_lora_weights``. Written by the
    pipeline-independent writer of every diffusers LoRA loader (PixArt pipelines have no
    ``save_lora_weights`` of their own)."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    attr = denoiser_attr(pipe)
    layers = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(pipe.denoiser).items()}
    LoraBaseMixin._save_lora_weights(directory, {attr: layers}, {attr: lora_config.to_dict()},
                                     weight_name=LORA_WEIGHTS)


def load_lora(pipe, directory: str) -> None:
    """Load a :func:`save_lora` directory into the denoiser as adapter "default".

    Denoisers with diffusers' PeftAdapterMixin (UNets, SD3) use its stock ``load_lora_adapter``,
    the transformer/unet half of the pipeline's ``load_lora_weights`` (which also works on the stock
    SD/SDXL/SD3 pipelines). PixArt's transformer has no PeftAdapterMixin and its pipelines no LoRA
    loader: the adapter is injected with peft from the same file (weights and LoraConfig metadata).
    """
    attr, den = denoiser_attr(pipe), pipe.denoiser
    if hasattr(den, "load_lora_adapter"):
        den.load_lora_adapter(directory, prefix=attr, adapter_name="default", weight_name=LORA_WEIGHTS)
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(os.path.join(directory, LORA_WEIGHTS), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    state = {k[len(attr) + 1:]: v for k, v in state.items() if k.startswith(attr + ".")}
    meta = {k[len(attr) + 1:]: v for k, v in (meta or {}).items() if k.startswith(attr + ".")}
    inject_adapter_in_model(LoraConfig(**meta), pipe.denoiser, "default")
    set_peft_model_state_dict(pipe.denoiser, state, adapter_name="default")


@torch.no_grad()
def fold_lora(denoiser: torch.nn.Module) -> int:
    """Merge every LoRA layer into its base weight and put the plain base layer back (peft's
    ``merge_and_unload`` for any denoiser, with or without diffusers' PeftAdapterMixin). Returns the
    number of layers folded; afterwards the module holds no adapter and saves as a plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    folded = 0
    for name, module in list(denoiser.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(denoiser.get_submodule(parent_name) if parent_name else denoiser, child, module.get_base_layer())
            folded += 1
    if hasattr(denoiser, "peft_config"):
        del denoiser.peft_config
    if getattr(denoiser, "_hf_peft_config_loaded", False):
        denoiser._hf_peft_config_loaded = False
    return folded


def merge_lora_checkpoint(model_path: str, lora_dir: str, out_dir: str) -> None:
    """Save ``model_path`` with the :func:`save_lora` adapter in ``lora_dir`` folded into its weights,
    as a full diffusers pipeline: what the next stage loads as a plain generator."""
    from raypref.checkpoints import load_model

    pipe = load_model(model_path)
    load_lora(pipe, lora_dir)
    if fold_lora(pipe.denoiser) == 0:
        raise ValueError(f"{lora_dir} holds no LoRA layer for the denoiser of {model_path}")
    pipe.save_pretrained(out_dir)


