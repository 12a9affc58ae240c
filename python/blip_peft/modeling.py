"""`BlipForConditionalGeneration`: the BLIP captioning model, computed by the Rust core.

It mirrors transformers' class of the same name: `from_pretrained`, calling the model with
`pixel_values` / `input_ids` / `attention_mask` / `labels`, `parameters()` that a `torch.optim`
optimizer updates in place, `to`, `train`/`eval`, `save_pretrained` and `print(model)`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Self

import torch

from blip_peft import _blip_peft
from blip_peft._convert import device_name, dtype_name, fspath
from blip_peft.configuration import BlipConfig
from blip_peft.generation import GENERATION_CONFIG_NAME, GenerationConfig


class ModelOutput(OrderedDict):  # type: ignore[type-arg]
    """transformers' `ModelOutput`: a dataclass that is also an ordered mapping of its non-None fields.

    `out.logits`, `out["logits"]`, `out[0]` (the first non-None field), `out.keys()`, iteration over the keys,
    `out.to_tuple()`, and `dict(out)` all behave as in transformers.
    """

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                super().__setitem__(f.name, value)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __delitem__(self, key: Any) -> None:
        raise RuntimeError(f"You cannot use ``__delitem__`` on a {type(self).__name__} instance.")

    def setdefault(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"You cannot use ``setdefault`` on a {type(self).__name__} instance.")

    def pop(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"You cannot use ``pop`` on a {type(self).__name__} instance.")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"You cannot use ``update`` on a {type(self).__name__} instance.")

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-None fields in declaration order (what `return_dict=False` returns)."""
        return tuple(self[k] for k in self.keys())

    def __reduce__(self) -> Any:
        return type(self), tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]


@dataclass(eq=False)
class BlipForConditionalGenerationModelOutput(ModelOutput):
    """What a forward pass returns, with transformers' fields: `loss` (with labels), `logits`, `image_embeds`
    (= `last_hidden_state`, the vision tower's output), and with `output_hidden_states` / `output_attentions`
    the vision tower's `hidden_states` (embeddings' output, then every layer's) and `attentions` (per layer,
    `[batch, heads, patches + 1, patches + 1]`)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


_LOADING_KEYWORDS = {"low_cpu_mem_usage", "trust_remote_code", "local_files_only", "use_safetensors", "revision"}
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class BlipPreTrainedModel(torch.nn.Module):
    """What every BLIP head shares (transformers' `BlipPreTrainedModel`): loading, the module tree over the
    core's tensors, parameters, device / dtype / mode, saving. A head names its native handle
    (`_native_class`) and adds its forward (and generate).

    Load a transformers checkpoint folder with :meth:`from_pretrained`, call the model like a torch
    module, and train it with any torch optimizer over :meth:`parameters`.

    It is a `torch.nn.Module` whose module tree has transformers' names and classes (`modules()`,
    `named_modules()`, `get_submodule`, `state_dict()`, `load_state_dict()`), each holding the very tensors the
    Rust core computes with. The forward runs in the core, so hooks registered on the model itself fire, while
    hooks on modules inside the tree never do (the core does not call them).
    """

    main_input_name = "pixel_values"
    #: The core's handle type of this head (`from_pretrained` / `from_config` build one).
    _native_class: Any = _blip_peft._BlipModel
    #: The towers read through the tree (`model.text_decoder`), rebuilt first when adapters changed it.
    _towers: tuple[str, ...] = ("vision_model", "text_decoder")
    #: The word-embedding tables (their `padding_idx` is the config's pad token); the first is the input one.
    _word_embeddings: tuple[str, ...] = ("text_decoder.bert.embeddings.word_embeddings",)
    base_model_prefix = "blip"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BlipEncoderLayer", "BlipTextEmbeddings"]
    _tied_weights_keys = {
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
        "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    }

    def __init__(self, native: Any) -> None:
        if not isinstance(native, self._native_class):
            name = type(self).__name__
            raise TypeError(f"{name} is created with {name}.from_pretrained(path) or .from_config(config)")
        object.__setattr__(self, "_native", native)
        mode = native.training
        super().__init__()  # sets `training`, which is the core's flag: keep the mode the core has
        native.set_training(mode)
        self._attn_implementation = "sdpa"
        self._gradient_checkpointing = False
        self._input_require_grads = False
        self._tree_key: tuple[str, ...] = ()
        self.generation_config = GenerationConfig.from_model_config(self.config)
        self._sync_tree()

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str] | None,
        *model_args: Any,
        config: Any = None,
        dtype: Any = None,
        device: Any = "cpu",
        torch_dtype: Any = None,
        device_map: Any = None,
        attn_implementation: str | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        output_loading_info: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Loads a transformers checkpoint folder (`config.json` + `model.safetensors` or its shards), and its
        `generation_config.json` when present.

        Args:
            pretrained_model_name_or_path: the folder (None when `config` and `state_dict` give everything).
            config: a configuration to use instead of the folder's `config.json` (ours, transformers'
                `BlipConfig`, or a dict).
            dtype: `None` (the stored precision), "float32", "bfloat16", "float16" or a `torch.dtype`.
            device: "cpu", "cuda", "cuda:N" or a `torch.device`.
            torch_dtype: the older name of `dtype`, accepted as transformers accepts it.
            device_map: a single device (e.g. "cuda", 0, `torch.device("cpu")` or `{"": "cuda:0"}`), a synonym
                of `device`.
            attn_implementation: "sdpa" (the default: fused attention) or "eager" (attention written out, as
                transformers' BLIP computes it).
            state_dict: weights to use instead of the folder's files (transformers' names, tied copies
                allowed).
            output_loading_info: also return `{"missing_keys", "unexpected_keys", "mismatched_keys",
                "error_msgs"}` (empty: a checkpoint that does not fit is an error here).

        Returns:
            The model, in evaluation mode. A folder holding a PEFT adapter (`adapter_config.json`) loads the
            base model it names and returns a `PeftModel`.
        """
        if model_args:
            raise TypeError("from_pretrained() takes the folder as its only positional argument")
        unknown = set(kwargs) - _LOADING_KEYWORDS
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass either dtype or torch_dtype (its older name), not both")
        if attn_implementation is not None and attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {', '.join(_ATTN_IMPLEMENTATIONS)} (or None), "
                f"got {attn_implementation!r}"
            )
        if device_map is not None:
            device = _single_device(device_map)
        dtype_arg = dtype_name(dtype if dtype is not None else torch_dtype)
        device_arg = device_name(device) or "cpu"
        config_json = None if config is None else json.dumps(_config_dict(config))
        path = None
        if pretrained_model_name_or_path is not None:
            path = fspath(pretrained_model_name_or_path, "pretrained_model_name_or_path")
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"model folder not found: {path!r}. blip_peft reads local checkpoint folders (config.json + "
                    "model.safetensors), e.g. a downloaded Salesforce/blip-image-captioning-base."
                )
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                from blip_peft import peft_model  # noqa: PLC0415  (only when an adapter folder is given)

                return peft_model.load_adapter_folder(path, dtype=dtype_arg, device=device_arg, head=cls)
        if state_dict is not None:
            if config_json is None:
                if path is None:
                    raise ValueError("from_pretrained(None, state_dict=...) needs config=")
                config_json = json.dumps(BlipConfig.from_json_file(os.path.join(path, "config.json")).to_dict())
            if dtype_arg is None:
                floats = [t.dtype for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point()]
                dtype_arg = str(floats[0]).removeprefix("torch.") if floats else None
            native = cls._native_class.from_config(config_json, 0, dtype_arg, device_arg)
            model = cls(native)
            state = dict(state_dict)
            if native.lm_head_tied:  # transformers' tied keys may be left out (as its safetensors files do)
                for alias, source in cls._tied_weights_keys.items():
                    if alias not in state and source in state:
                        state[alias] = state[source]
            model.load_state_dict(state, strict=True)
        elif path is None:
            raise ValueError("from_pretrained() needs a folder, or config= and state_dict=")
        else:
            native = cls._native_class.from_pretrained(path, dtype_arg, device_arg, config_json)
            model = cls(native)
            gen_path = os.path.join(path, GENERATION_CONFIG_NAME)
            if os.path.isfile(gen_path):
                model.generation_config = GenerationConfig.from_pretrained(path)
        for message in native.config_warnings():
            warnings.warn(message, stacklevel=2)
        model._attn_implementation = attn_implementation or "sdpa"
        model.eval()
        if output_loading_info:
            info: dict[str, Any] = {
                "missing_keys": set(),
                "unexpected_keys": set(),
                "mismatched_keys": set(),
                "error_msgs": [],
            }
            return model, info
        return model

    @classmethod
    def from_config(
        cls, config: Any, *, seed: int = 0, dtype: Any = None, device: Any = "cpu", attn_implementation: Any = None
    ) -> Self:
        """A randomly initialised model (transformers' initialisation) for a configuration (ours, transformers'
        `BlipConfig` or a dict)."""
        if attn_implementation is not None and attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {', '.join(_ATTN_IMPLEMENTATIONS)} (or None)")
        native = cls._native_class.from_config(
            json.dumps(_config_dict(config)), seed, dtype_name(dtype), device_name(device) or "cpu"
        )
        model = cls(native)
        model._attn_implementation = attn_implementation or "sdpa"
        return model

    @classmethod
    def can_generate(cls) -> bool:
        """Whether `generate` works (it does: transformers' `GenerationMixin` question)."""
        return True

    @property
    def base_model(self) -> Self:
        """transformers' `getattr(self, base_model_prefix, self)`: BLIP has no `blip` submodule, so the model."""
        return self

    # ------------------------------------------------------------------------------------- module tree
    def _sync_tree(self) -> None:
        """(Re)builds the module tree when the core's parameters changed (adapters added or removed)."""
        if self.__dict__.get("_syncing"):
            return
        named = self._native.named_parameters()
        key = tuple(name for name, _ in named)
        if key == self._tree_key and self._modules:
            return
        self.__dict__["_syncing"] = True
        try:
            self._build_tree(named)
        finally:
            self.__dict__["_syncing"] = False
        self._tree_key = key

    def _build_tree(self, named: list[tuple[str, torch.Tensor]]) -> None:
        types = dict(self._native.module_tree())
        self._modules.clear()
        nodes: dict[str, torch.nn.Module] = {"": self}
        for path in [p for p, _ in self._native.module_tree() if p]:
            parent, _, leaf = path.rpartition(".")
            module = _shell(types[path])
            nodes[parent].add_module(leaf, module)
            nodes[path] = module
        for name, tensor in named:
            parent, _, leaf = name.rpartition(".")
            owner = nodes.get(parent)
            if owner is None:  # a module the printout folds away: make its path
                owner = self
                for part in parent.split("."):
                    if part not in owner._modules:
                        owner.add_module(part, _shell("Module"))
                    owner = _child(owner, part)
                nodes[parent] = owner
            _params(owner)[leaf] = tensor  # the core's own tensor (not a copy), as torch.nn.Parameter would be
        if self._native.lm_head_tied:
            # torch registers a Linear's weight before its bias
            for alias, source in sorted(self._tied_weights_keys.items(), key=lambda kv: not kv[0].endswith("weight")):
                parent, _, leaf = alias.rpartition(".")
                src_parent, _, src_leaf = source.rpartition(".")
                if parent in nodes and src_parent in nodes and src_leaf in nodes[src_parent]._parameters:
                    _params(nodes[parent])[leaf] = nodes[src_parent]._parameters[src_leaf]
        tables = [nodes.get(path) for path in self._word_embeddings]
        pad = self.config.text_config.pad_token_id
        for words in tables:
            if isinstance(words, torch.nn.Embedding) and "weight" in words._parameters:
                _fill_attributes(words)
                words.padding_idx = pad if isinstance(pad, int) and 0 <= pad < words.num_embeddings else None
        for _, module in torch.nn.Module.named_modules(self):
            if module is not self and not any(module is words for words in tables):
                object.__setattr__(module, "training", self.training)
                _fill_attributes(module)

    def named_modules(self, memo: Any = None, prefix: str = "", remove_duplicate: bool = True) -> Any:
        self._sync_tree()
        return super().named_modules(memo, prefix, remove_duplicate)

    def children(self) -> Iterator[torch.nn.Module]:
        self._sync_tree()
        return super().children()

    def named_children(self) -> Iterator[tuple[str, torch.nn.Module]]:
        self._sync_tree()
        return super().named_children()

    def get_submodule(self, target: str) -> torch.nn.Module:
        self._sync_tree()
        return super().get_submodule(target)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' state dict: every parameter by name (the tied LM-head copies too), detached."""
        self._sync_tree()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Copies `state_dict` into the model's tensors in place (torch's semantics: `strict` reports
        missing and unexpected keys); `assign=True` is refused (the core keeps its tensors)."""
        if assign:
            raise ValueError("load_state_dict(assign=True) is not supported: the core's tensors are updated in place")
        self._sync_tree()
        state = dict(state_dict)
        for path in self._word_embeddings:  # a buffer older checkpoints keep
            state.pop(path.removesuffix("word_embeddings") + "position_ids", None)
        return super().load_state_dict(state, strict=strict)

    def __getattr__(self, name: str) -> Any:
        # The two towers read through the tree: rebuilt first when adapters changed it (not while building).
        if name in self._towers and "_tree_key" in self.__dict__ and not self.__dict__.get("_syncing"):
            self._sync_tree()
        return super().__getattr__(name)

    # -------------------------------------------------------------------------------------- parameters
    # The core's tensors are plain tensors, not Parameters (hence the override ignores).
    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """`(name, parameter)` pairs with transformers' names, in its order (tied weights once)."""
        for name, param in self._native.named_parameters():
            yield (f"{prefix}.{name}" if prefix else name), param

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:  # type: ignore[override]
        """The model's parameters: the tensors themselves, so an optimizer updates the model in place."""
        for _, param in self.named_parameters():
            yield param

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of (unique) parameters, as transformers counts them."""
        total = 0
        for name, p in self.named_parameters():
            if only_trainable and not p.requires_grad:
                continue
            if exclude_embeddings and (
                name.endswith("word_embeddings.weight") or name.endswith("position_embeddings.weight")
            ):
                continue
            total += p.numel()
        return total

    def requires_grad_(self, requires_grad: bool = True) -> Self:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # -------------------------------------------------------------------------------------- embeddings
    def get_input_embeddings(self) -> torch.nn.Module:
        """The word embeddings (`text_decoder.bert.embeddings.word_embeddings`): a `torch.nn.Embedding` over
        the core's own table."""
        return self.get_submodule(self._word_embeddings[0])

    def get_output_embeddings(self) -> None:
        """None, as transformers' `BlipForConditionalGeneration` returns (its LM head sits in `text_decoder`:
        `model.get_submodule("text_decoder.cls.predictions.decoder")`)."""
        return None

    def tie_weights(self, missing_keys: Any = None, recompute_mapping: bool = True) -> None:
        """Ties the LM head to the word embeddings when the config says so. The core ties them when the model
        is built (and keeps them tied through `resize_token_embeddings`), so there is nothing left to do."""

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> torch.nn.Module:
        """Resizes the vocabulary as transformers does: kept rows are copied, new rows are drawn from a normal
        distribution with the old embeddings' mean and (1e-9 times) their covariance (`mean_resizing`), or
        from N(0, initializer_range) otherwise; the LM head's bias grows with zeros when tied. An untied head is
        resized too (transformers leaves it at the old size, which breaks its forward). `text_config.vocab_size`
        follows. Returns the input embeddings."""
        if new_num_tokens is None and pad_to_multiple_of is None:
            return self.get_input_embeddings()
        old = _tensor(self.get_input_embeddings(), "weight")
        new = old.shape[0] if new_num_tokens is None else new_num_tokens
        if isinstance(new, bool) or not isinstance(new, int) or new < 1:
            raise ValueError(f"new_num_tokens must be a positive int, got {new_num_tokens!r}")
        if pad_to_multiple_of is not None:
            if (
                isinstance(pad_to_multiple_of, bool)
                or not isinstance(pad_to_multiple_of, int)
                or pad_to_multiple_of < 1
            ):
                raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
            new = -(-new // pad_to_multiple_of) * pad_to_multiple_of
        std = self.config.text_config.initializer_range
        with torch.no_grad():
            # Every word-embedding table (the input embeddings first), drawn as transformers draws it.
            tables = [
                _resized_rows(_tensor(self.get_submodule(path), "weight"), new, mean_resizing, std)
                for path in self._word_embeddings
            ]
            self._native.resize_vocab(*tables, *self._resized_lm_head(new, mean_resizing, std))
        self._tree_key = ()
        self._sync_tree()
        return self.get_input_embeddings()

    def _resized_lm_head(self, new: int, mean_resizing: bool, std: float) -> tuple[torch.Tensor, ...]:
        """The LM head's resized tensors for `new` tokens, after the tables (`resize_vocab`'s arguments):
        its bias (padded with zeros when tied, as transformers does) and an untied decoder's weight and bias."""
        bias_param = _tensor(self.get_submodule("text_decoder.cls.predictions"), "bias")
        if self._native.lm_head_tied:
            return (torch.nn.functional.pad(bias_param.detach(), (0, max(0, new - bias_param.shape[0])))[:new],)
        head = self.get_submodule("text_decoder.cls.predictions.decoder")
        head = getattr(head, "base_layer", head)  # a LoRA layer's: the core then refuses the resize by name
        return (
            _resized_bias(bias_param, new, mean_resizing),
            _resized_rows(_tensor(head, "weight"), new, mean_resizing, std),
            _resized_bias(_tensor(head, "bias"), new, mean_resizing),
        )

    def enable_input_require_grads(self) -> None:
        """transformers' switch that makes the input embeddings' output require grad, so reentrant gradient
        checkpointing over frozen embeddings (LoRA) gets gradients. Our checkpointing needs no such help; the
        switch is kept (and reported by `_input_require_grads`) for code that calls it."""
        self._input_require_grads = True

    def disable_input_require_grads(self) -> None:
        self._input_require_grads = False

    # --------------------------------------------------------------------------- gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Turns gradient checkpointing on: `bp.train` then recomputes each transformer layer in the backward,
        and a plain torch loop (`model(...)` in training mode, then `loss.backward()`) keeps no activations
        of the forward and recomputes it in the backward. `gradient_checkpointing_kwargs` may only ask for
        `use_reentrant` (either value: the recomputation is the same here)."""
        extra = set(gradient_checkpointing_kwargs or {}) - {"use_reentrant"}
        if extra:
            raise ValueError(
                f"gradient_checkpointing_kwargs accepts use_reentrant only, got {', '.join(sorted(extra))}"
            )
        self._gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    def _checkpointed(self, run: Callable[..., Any], *args: Any) -> Any:
        """`run(*args)` (a native forward), under torch's checkpoint when gradient checkpointing is on in a
        plain torch loop (training mode, grad enabled): the forward keeps no activations and the backward runs
        it again (the same dropout and negative draws: torch restores its generator state) to take the
        gradients. The head's every forward goes through here."""
        if not (self._gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return run(*args)
        from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop  # noqa: PLC0415

        # No early stop: torch ends a recomputation early by raising inside its hooks, which the core cannot
        # pass through; the forward is rerun whole.
        with set_checkpoint_early_stop(False):
            return checkpoint(run, *args, use_reentrant=False)

    # ------------------------------------------------------------------------------ device, dtype, mode
    def to(self, *args: Any, **kwargs: Any) -> Self:  # type: ignore[override]
        """Moves and/or casts the parameters in place, as `nn.Module.to` does: `to("cuda")`,
        `to(torch.bfloat16)`, `to("cuda", torch.float16)`, `to(device=..., dtype=...)`."""
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        kwargs.pop("non_blocking", None)
        if kwargs:
            raise TypeError(f"to() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device, int)) and not isinstance(arg, bool):
                if isinstance(arg, str) and arg.removeprefix("torch.") in (
                    "float32",
                    "float16",
                    "bfloat16",
                    "half",
                    "float",
                ):
                    dtype = arg
                else:
                    device = arg
            else:
                raise TypeError(f"to() expects a device and/or dtype, got {type(arg).__name__}")
        self._native.to(device_name(device), dtype_name(dtype))
        return self

    def cuda(self, device: Any = None) -> Self:  # type: ignore[override]
        return self.to(f"cuda:{device or 0}")

    def cpu(self) -> Self:  # type: ignore[override]
        return self.to("cpu")

    def float(self) -> Self:  # type: ignore[override]
        return self.to(torch.float32)

    def half(self) -> Self:  # type: ignore[override]
        return self.to(torch.float16)

    def bfloat16(self) -> Self:  # type: ignore[override]
        return self.to(torch.bfloat16)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        raise NotImplementedError(
            "the core keeps its tensors: use model.to(device/dtype), .cuda(), .cpu(), .float(), .half(), .bfloat16()"
        )

    def train(self, mode: bool = True) -> Self:
        """Training mode (dropout active where the config sets it)."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self._native.set_training(mode)
        for module in self._modules.values():
            if module is not None:
                module.train(mode)
        return self

    def eval(self) -> Self:
        """Evaluation mode (no dropout)."""
        return self.train(False)

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self._native.training

    @training.setter
    def training(self, mode: bool) -> None:
        self._native.set_training(bool(mode))

    @property
    def device(self) -> torch.device:
        return torch.device(self._native.device)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self._native.dtype)

    @property
    def config(self) -> BlipConfig:
        """The parsed configuration (`config.text_config.vocab_size`, `config.to_dict()`, transformers'
        `PretrainedConfig` attributes such as `use_return_dict` and `get_text_config()`)."""
        config = BlipConfig.from_json_string(self._native.config_json())
        config._set_defaults(_attn_implementation=self._attn_implementation, name_or_path=self._native.name_or_path)
        return config

    @property
    def name_or_path(self) -> str:
        return self._native.name_or_path

    # -------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Writes `config.json`, `model.safetensors` and `generation_config.json`, a folder transformers loads
        with no missing or unexpected keys. Files are written atomically (temporary file, then rename)."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("blip_peft writes safetensors only (safe_serialization=False is not supported)")
        directory = fspath(save_directory, "save_directory")
        self._native.save_pretrained(directory)
        self.generation_config.save_pretrained(directory)

    def __repr__(self) -> str:
        return self._native.__repr__()

    def __setstate__(self, state: Any) -> None:
        raise TypeError(f"{type(self).__name__} cannot be unpickled; save_pretrained / from_pretrained it")

    def __getstate__(self) -> Any:
        raise TypeError(f"{type(self).__name__} cannot be pickled; save it with save_pretrained")


class BlipForConditionalGeneration(BlipPreTrainedModel):
    """BLIP for image captioning, with transformers' API and weight names.

    Load a transformers checkpoint folder with :meth:`from_pretrained`, call the model like a torch
    module, and train it with any torch optimizer over :meth:`parameters`.

    It is a `torch.nn.Module` whose module tree has transformers' names and classes (`modules()`,
    `named_modules()`, `get_submodule`, `state_dict()`, `load_state_dict()`), each holding the very tensors the
    Rust core computes with. The forward runs in the core, so hooks registered on the model itself fire, while
    hooks on modules inside the tree never do (the core does not call them).
    """

    #: The prompt captions start with when `blip_peft.generate` / `evaluate` are given none (set by
    #: `train(prompt=...)`; kept in memory: a `PeftModel` saves its adapter's with the adapter).
    caption_prompt: str | None = None

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        logits_to_keep: int = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        shift_labels: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Runs the model: logits of every caption position and, with `labels`, the mean cross-entropy of
        predicting `labels[:, 1:]` from positions `:-1` (exactly transformers' loss; -100 is ignored).

        `output_hidden_states` / `output_attentions` add the vision tower's hidden states and attention
        probabilities (attention then runs eagerly); `logits_to_keep=k` computes the logits of the last `k`
        positions only; `shift_labels` are targets already aligned with the logits (used instead of shifting
        `labels`); `return_dict=False` returns the output's non-None fields as a tuple;
        `interpolate_pos_encoding=True` runs images at another resolution than the checkpoint's `image_size`
        (the position embeddings resampled bicubically to the image's patch grid, as transformers does).

        `adapter_names` (peft's mixed-adapter batch, in evaluation mode): one adapter name per row, `"__base__"`
        for the base model; each row then runs its own adapter in both towers, whatever adapter is active.
        """
        unknown = set(kwargs) - {"use_cache"}
        if unknown:
            raise TypeError(f"forward() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if input_ids is None:
            raise ValueError(
                "input_ids is required: BlipForConditionalGeneration scores captions; use generate() to write them"
            )
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
            raise TypeError(f"logits_to_keep must be an int (0 keeps every position), got {type(logits_to_keep)}")
        call = dict(
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            eager=self._attn_implementation == "eager",
            logits_to_keep=logits_to_keep,
            shift_labels=shift_labels,
            adapter_names=_adapter_names(adapter_names),
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
        )
        native_args = (pixel_values, input_ids, attention_mask, labels)

        def run(*tensors: Any) -> Any:
            loss, logits, embeds, hidden, attn = self._native.forward(*tensors, **call)
            return loss, logits, embeds, tuple(hidden or ()), tuple(attn or ())

        loss, logits, image_embeds, hidden, attn = self._checkpointed(run, *native_args)
        hidden, attn = (
            (hidden or None) if output_hidden_states else None,
            (attn or None) if output_attentions else None,
        )
        out = BlipForConditionalGenerationModelOutput(
            loss=loss,
            logits=logits,
            image_embeds=image_embeds,
            last_hidden_state=image_embeds,
            hidden_states=tuple(hidden) if hidden is not None else None,
            attentions=tuple(attn) if attn is not None else None,
        )
        return out if return_dict is None or return_dict else out.to_tuple()

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Generates captions as token ids, exactly as transformers' `generate` does for BLIP.

        The result is a `torch.LongTensor` laid out like transformers' (`[BOS, prompt..., new tokens..., pad]`).
        Keyword arguments take transformers' names and defaults: `max_new_tokens`, `max_length` (20 when neither
        is given), `min_new_tokens`, `min_length`, `num_beams`, `length_penalty`, `early_stopping`,
        `num_return_sequences`, `do_sample`, `temperature`, `top_k` (50), `top_p`, `repetition_penalty`,
        `no_repeat_ngram_size`, `bos_token_id`, `eos_token_id`, `pad_token_id`, `generation_config` (a
        `GenerationConfig`: its settings under the keywords; as in transformers, its special token ids give way
        to BLIP's: captions end at `[SEP]`), `interpolate_pos_encoding` (images at another resolution than the
        checkpoint's, as in `forward`), and `seed` (an int or a `torch.Generator`) for reproducible sampling.

        As in transformers' BLIP, `model.generation_config` (read from `generation_config.json`) is not applied
        by itself (BLIP's `generate` runs its decoder's defaults); pass `generation_config=model.generation_config`
        to use it.

        A prompt (`input_ids` from the processor, e.g. "a photography of") is continued. Prompts of different
        lengths in one batch (with their `attention_mask`) are each decoded as if alone and the rows are
        right-padded; transformers mishandles that case.

        Threads: calls to `generate` (and the forward pass) on one model from several threads take turns, each
        running alone with the GIL released (so each gets what it would alone, seeded sampling included), while
        `config`, `device`, `dtype` and `named_parameters()` answer at once. A training callback may call
        `generate` on the model being trained (sample captions); while training runs, calls from other threads
        that need the model raise a RuntimeError saying it is busy.

        `adapter_names` (peft's mixed-adapter batch): one adapter name per image, `"__base__"` for the base model;
        the image and every row decoded from it (its beams, its `num_return_sequences`) run that adapter, in
        both towers, in one batch.
        """
        if pixel_values is None:
            raise ValueError("generate() needs pixel_values")
        names = _adapter_names(adapter_names)
        return self._native.generate(pixel_values, input_ids, attention_mask, _generation_settings(kwargs), names)


def _single_device(device_map: Any) -> Any:
    """The one device a `device_map` names (`"cuda"`, `0`, `torch.device`, or `{"": device}`)."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) == 1:
            (device_map,) = devices
        else:
            raise ValueError("device_map must place the whole model on one device here (e.g. {'': 'cuda:0'})")
    if isinstance(device_map, bool) or not isinstance(device_map, (str, torch.device, int)) or device_map == "auto":
        raise ValueError("device_map must name a single device here (e.g. 'cuda' or 'cpu')")
    return f"cuda:{device_map}" if isinstance(device_map, int) else device_map


def _config_dict(config: Any) -> dict[str, Any]:
    """A configuration as the JSON document `config.json` holds: ours, transformers' `BlipConfig`, or a dict."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    if hasattr(config, "to_dict"):
        return json.loads(json.dumps(config.to_dict(), default=str))
    raise TypeError(f"config must be a BlipConfig or a dict, got {type(config).__name__}")


def _resized_rows(old: torch.Tensor, new: int, mean_resizing: bool, std: float) -> torch.Tensor:
    """`old`'s first rows, with new ones as transformers initialises added embeddings."""
    n_old, dim = old.shape
    out = torch.empty(new, dim, dtype=old.dtype, device=old.device)
    keep = min(n_old, new)
    out[:keep] = old.detach()[:keep]
    added = new - n_old
    if added > 0:
        if mean_resizing:
            base = old.detach().to(torch.float32)
            mean = base.mean(0)
            centered = base - mean
            covariance = centered.T @ centered / n_old
            scaled = 1e-9 * covariance
            if bool(torch.distributions.constraints.positive_definite.check(scaled).all()):
                dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=scaled)
                out[n_old:] = dist.sample((added,)).to(old.dtype)
            else:
                out[n_old:] = mean[None, :].repeat(added, 1).to(old.dtype)
        else:
            out[n_old:] = (torch.randn(added, dim, device=old.device) * std).to(old.dtype)
    return out


def _resized_bias(old: torch.Tensor, new: int, mean_resizing: bool) -> torch.Tensor:
    out = torch.zeros(new, dtype=old.dtype, device=old.device)
    keep = min(old.shape[0], new)
    out[:keep] = old.detach()[:keep]
    if new > old.shape[0] and mean_resizing:
        mean = old.detach().float().mean()
        spread = old.detach().float().std()
        out[old.shape[0] :] = torch.empty(new - old.shape[0]).normal_(float(mean), float(1e-9 * spread)).to(old.dtype)
    return out


_SHELLS: dict[str, type] = {}


class _CoreModule(torch.nn.Module):
    """A module of the tree whose computation runs in the Rust core (hooks on it never fire)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{type(self).__name__} runs inside the Rust core; call the top-level BlipForConditionalGeneration"
        )


_TORCH_LEAVES = {
    "Linear": torch.nn.Linear,
    "Embedding": torch.nn.Embedding,
    "LayerNorm": torch.nn.LayerNorm,
    "Conv2d": torch.nn.Conv2d,
    "Dropout": torch.nn.Dropout,
    "Identity": torch.nn.Identity,
    "ModuleList": torch.nn.ModuleList,
    "ModuleDict": torch.nn.ModuleDict,
}


def _shell(type_name: str) -> torch.nn.Module:
    """An empty module of torch's class `type_name` (a torch one when torch has it, else a class of that name)."""
    torch_class = _TORCH_LEAVES.get(type_name)
    if torch_class is not None:
        module: torch.nn.Module = object.__new__(torch_class)
        torch.nn.Module.__init__(module)
        return module
    cls = _SHELLS.get(type_name)
    if cls is None:
        cls = _SHELLS[type_name] = type(type_name, (_CoreModule,), {"__module__": __name__})
    return cls()


def _child(module: torch.nn.Module, name: str) -> torch.nn.Module:
    child = module._modules[name]
    assert child is not None
    return child


def _params(module: torch.nn.Module) -> dict[str, Any]:
    """A module's own parameter table, which takes the core's plain tensors."""
    return module._parameters  # type: ignore[return-value]


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter of a module of the tree, by name."""
    t = module._parameters.get(name)
    if t is None:
        raise ValueError(f"{type(module).__name__} has no {name}")
    return t


def _fill_attributes(module: torch.nn.Module) -> None:
    """The attributes torch's leaf modules read in their forward and repr, from their tensors' shapes (so a
    `get_input_embeddings()` table can be called from Python over the core's weights)."""
    params = module._parameters
    weight = params.get("weight")
    if isinstance(module, torch.nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape
        if "bias" not in params:
            params["bias"] = None
    elif isinstance(module, torch.nn.Embedding) and weight is not None:
        module.num_embeddings, module.embedding_dim = weight.shape
        module.padding_idx = None
        module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse = None, 2.0, False, False
    elif isinstance(module, torch.nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
        module.eps, module.elementwise_affine = 1e-5, True
    elif isinstance(module, torch.nn.Dropout):
        module.p, module.inplace = 0.0, False


def _adapter_names(names: Any) -> list[str] | None:
    """`adapter_names` as the core takes it: a list of str (one per row), or None."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of adapter names (one per row), got {type(names).__name__}")
    bad = [type(n).__name__ for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f'adapter_names must hold str names ("__base__" for the base model), got {bad[0]}')
    return list(names)


# Accepted for compatibility; they do not change what is generated here.
_IGNORED_GENERATION_ARGS = {"use_cache", "output_attentions", "output_hidden_states", "synced_gpus"}


def _generation_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers-style generate kwargs to the decoding settings the core reads (and checks): the Python-only
    forms are converted here (a `generation_config` object, a `torch.Generator` seed); None means the default."""
    settings: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _IGNORED_GENERATION_ARGS or (key == "return_dict_in_generate" and not value):
            continue
        if key == "generation_config":
            if value is not None:
                # BLIP's generate passes its own special ids over the object's (captions end at [SEP]).
                names = set(_blip_peft.generation_setting_names()) - {"bos_token_id", "eos_token_id", "pad_token_id"}
                for k, v in value.to_dict().items():
                    if k in names and v is not None and k not in kwargs:
                        settings[k] = v
            continue
        if value is not None:
            settings[key] = value
    seed = settings.get("seed")
    if isinstance(seed, torch.Generator):
        # A seed drawn from the generator: reproducible for a generator in the same state.
        settings["seed"] = int(torch.randint(0, 2**62, (1,), generator=seed).item())
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return settings


AutoModelForVision2Seq = BlipForConditionalGeneration
AutoModelForImageTextToText = BlipForConditionalGeneration
