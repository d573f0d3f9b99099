"""Rebuild a Hugging Face model from the ``config.json`` its checkpoint carries — as data, not code.

A Hugging Face checkpoint (``save_pretrained``, the ``Trainer``'s ``checkpoint-N`` folders) holds a
``config.json``: the ``model_type``, the class that was trained (``architectures[0]``) and its
sizes. :func:`model_from_config` turns that description back into an untrained model of the same
architecture, for the checkpoint's weights to be loaded into. It is one of tracin-tasks' own
builders (:data:`~tracin_tasks.integrations.model_factory.BUILTIN_FACTORIES`), so a checkpoint
layout may name it with a run's ``config.json`` as its arguments; since whoever can write to the
tracking server writes that file, the builder trusts nothing in it:

* the class is looked up only among ``transformers``' own classes (an attribute of the
  ``transformers`` package, a ``PreTrainedModel`` subclass or an ``AutoModel…`` class defined in
  ``transformers``); any other name is refused;
* a config with ``auto_map`` (code from the Hub or the checkpoint folder) is refused, and
  ``trust_remote_code`` is never set; nothing is downloaded (``use_pretrained_backbone`` is
  switched off: the weights come from the checkpoint);
* the model is built in float32 whatever ``dtype``/``torch_dtype`` the config names (TracIn's
  gradients want full precision; the weights are cast when loaded), with the attention the config
  names when it is ``eager`` or ``sdpa`` and ``eager`` otherwise (the same math, no kernel to fetch);
* it builds under ``with torch.device("meta")``, where an audit first checks the model's size.

Example:
    >>> import json
    >>> model = model_from_config(**json.load(open("checkpoint-30/config.json")))
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from tracin_tasks.exceptions import ModelFactoryError, UntrustedModelFactoryError, require_extra

logger = logging.getLogger(__name__)

#: this module's builder, as a layout names it in a ModelSpec
FACTORY = "tracin_tasks.integrations.huggingface:model_from_config"
#: attention implementations built as the config says; any other is built as "eager" (same math)
ATTENTION = ("eager", "sdpa")
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]{0,199}")
_OWN_CODE = (
    "An audit never runs code a run supplies. Pass your own builder instead: --model-factory "
    "pkg.module:function with --model-kwargs JSON (the caller's choice is trusted)."
)


def _remote_code(value: Any, where: str = "") -> str | None:
    """Where an ``auto_map`` (custom code) hides in a config, nested configs included."""
    if isinstance(value, dict):
        for key, inner in value.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "auto_map":
                return here
            found = _remote_code(inner, here)
            if found:
                return found
    return None


def architecture_class(name: Any) -> type:
    """The ``transformers`` class a config's ``architectures[0]`` names, looked up only there.

    Raises:
        UntrustedModelFactoryError: not a public class name, or not a model class of ``transformers``.
        MissingExtraError: ``transformers`` is not installed.
    """
    transformers = require_extra("transformers", "frameworks")
    if not isinstance(name, str) or not _CLASS_NAME.fullmatch(name):
        raise UntrustedModelFactoryError(
            f"The checkpoint's config.json names the architecture {str(name)[:100]!r}, which is not a class name of "
            f"the transformers package. {_OWN_CODE}")
    try:
        cls = getattr(transformers, name)
    except Exception:  # transformers' lazy module raises AttributeError, or an import error of the model
        cls = None
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    defined_in = getattr(cls, "__module__", "") or ""
    is_model = isinstance(cls, type) and (issubclass(cls, PreTrainedModel) or issubclass(cls, _BaseAutoModelClass))
    base = name.endswith("PreTrainedModel")  # the shared base classes of a family: no head, no forward
    if not is_model or base or not defined_in.startswith("transformers."):
        raise UntrustedModelFactoryError(
            f"The checkpoint's config.json names the architecture {name!r}, which is not a model class of the "
            f"installed transformers {transformers.__version__} (custom model code, or a newer transformers). "
            f"{_OWN_CODE}")
    return cls


#: config keys that count modules (layers, blocks, experts): building a module is a Python object even on
#: ``meta``, so a count like 10**9 would exhaust memory before the size check; real models stay far below
_COUNT_KEY = re.compile(r"(?:^|_)(?:layers?|blocks?|experts?|depth)$")
MAX_MODULE_COUNT = 4096


def _check_counts(value: Any, where: str = "") -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            here = f"{where}.{key}" if where else str(key)
            if (_COUNT_KEY.search(str(key)) and isinstance(inner, int) and not isinstance(inner, bool)
                    and inner > MAX_MODULE_COUNT):
                raise ModelFactoryError(
                    f"The checkpoint's config.json asks for {here}={inner:,}; real models have at most a few hundred, "
                    f"and the audit builds no more than {MAX_MODULE_COUNT:,} (each is built before any size check). "
                    "The file is damaged or crafted; pass --model-factory pkg.module:function with --model-kwargs "
                    "JSON to build the model yourself.")
            _check_counts(inner, here)


def model_from_config(**config: Any) -> nn.Module:
    """An untrained model of the architecture a Hugging Face ``config.json`` describes, in float32.

    Args:
        **config: the keys of ``config.json`` (``model_type``, ``architectures``, sizes, labels...).

    Raises:
        UntrustedModelFactoryError: the config asks for custom code (``auto_map``) or names a class that
            is not one of ``transformers``' own.
        ModelFactoryError: no or an unknown ``model_type``, no ``architectures``, or a config the class
            cannot be built from.
        MissingExtraError: ``transformers`` is not installed (``pip install 'tracin-tasks[frameworks]'``).

    Example:
        >>> model = model_from_config(model_type="bert", architectures=["BertForSequenceClassification"],
        ...                           hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3)
    """
    transformers = require_extra("transformers", "frameworks")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = dict(config)
    hidden = _remote_code(config)
    if hidden:
        raise UntrustedModelFactoryError(
            f"The checkpoint's config.json asks for custom model code ({hidden}), which would be imported from the Hub "
            f"or the checkpoint folder. {_OWN_CODE}")
    if "quantization_config" in config:
        raise ModelFactoryError(
            "The checkpoint's config.json describes a quantized model (quantization_config); an audit needs the "
            "full-precision weights TracIn differentiates. Audit a run that saved unquantized checkpoints, or pass "
            "--model-factory pkg.module:function for a model that loads these weights.")
    model_type = config.pop("model_type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelFactoryError(
            f"The checkpoint's config.json has model_type {str(model_type)[:100]!r}, which the installed transformers "
            f"{transformers.__version__} does not know; expected one of its model types (e.g. 'bert'). Install the "
            "transformers release that wrote the checkpoint, or pass --model-factory pkg.module:function with "
            "--model-kwargs JSON.")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise ModelFactoryError(
            "The checkpoint's config.json names no architecture (an 'architectures' list, e.g. "
            "[\"BertForSequenceClassification\"]), so the audit cannot tell which head was trained. Save the model "
            "with save_pretrained (the Trainer does), or pass --model-factory pkg.module:function with --model-kwargs.")
    cls = architecture_class(architectures[0])
    asked = config.get("_attn_implementation") or config.get("attn_implementation")
    # private keys, the dtype and the kernel choices are settings of one process, not the architecture
    # (a kernel may name a Hub repository: code); the audit sets its own
    for key in [k for k in config if k.startswith("_")] + ["dtype", "torch_dtype", "trust_remote_code",
                                                           "attn_implementation", "experts_implementation"]:
        config.pop(key, None)
    _check_counts(config)
    attention = asked if asked in ATTENTION else "eager"
    if asked and asked != attention:
        logger.info("building %s with eager attention instead of %r (the same math, nothing to fetch)",
                    architectures[0], asked)
    if "use_pretrained_backbone" in config:  # the weights come from the checkpoint; never fetch a backbone's
        config["use_pretrained_backbone"] = False
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
        config_class = getattr(cls, "config_class", None)
        if isinstance(config_class, type) and not isinstance(hf_config, config_class):
            raise ModelFactoryError(
                f"The checkpoint's config.json says model_type {model_type!r} but architecture {architectures[0]!r}, "
                f"which takes a {config_class.__name__}; the file is inconsistent. Pass --model-factory "
                "pkg.module:function with --model-kwargs JSON.")
        if hasattr(cls, "_from_config"):
            model = cls._from_config(hf_config, dtype=torch.float32, attn_implementation=attention)
        else:  # an AutoModel… class
            model = cls.from_config(hf_config, dtype=torch.float32, attn_implementation=attention)
    except ModelFactoryError:
        raise
    except Exception as exc:
        raise ModelFactoryError(
            f"Building {architectures[0]} from the checkpoint's config.json failed: {type(exc).__name__}: "
            f"{str(exc)[:300]}. Pass --model-factory pkg.module:function with --model-kwargs JSON to build it "
            "yourself.") from None
    return model
