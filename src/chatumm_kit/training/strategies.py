"""Multi-process strategies as YAML-friendly factories: DDP, FSDP2 (via Lightning's ``ModelParallelStrategy``), FSDP1.

Which to use:

* :func:`ddp` — every rank holds the whole model; gradients are all-reduced. CPU (gloo) and GPU (nccl).
* :func:`fsdp2` — parameters, gradients and optimizer state sharded per rank with ``torch.distributed.fsdp
  .fully_shard`` (FSDP2, ``DTensor`` parameters). Runs on CPU with gloo as well as on GPUs. Checkpoints are
  folders written by ``torch.distributed.checkpoint`` (each rank writes its shards; nothing is gathered).
* :func:`fsdp_gpu` — Lightning's ``FSDPStrategy`` (FSDP1, flat parameters) with per-layer wrapping, for GPU users
  who need it; :class:`chatumm_kit.training.ema.EMACallback` does not support it.

How FSDP2 is applied (Lightning's model-parallel design): the LightningModule builds its model in an idempotent
``configure_model()``; sharding then happens **before** optimizers are created. :class:`FSDP2Strategy` shards each
direct child of the LightningModule that holds parameters with :func:`apply_fsdp2` — one FSDP unit per element of
every ``ModuleList`` named in ``unit_names`` (decoder layers, ViT blocks), then the child itself as the root unit —
unless ``configure_model()`` already sharded (by calling ``trainer.strategy.shard_model(self.model)``,
:func:`apply_fsdp2` or ``fully_shard`` itself), in which case the strategy leaves the module alone. A root's
``forward`` (or a method listed in ``forward_methods``) must be the entry point the system calls, because FSDP2
gathers the root's own parameters (embeddings, final norm) in its forward hooks.

On CPU (found on torch 2.14 / Lightning 2.6.6): the stock ``ModelParallelStrategy`` already accepts
``accelerator="cpu"`` and the gloo backend, and ``fully_shard`` trains on CPU (2 processes reproduce the DDP run
bit for bit in the tests). The one thing needed is the mesh shape: Lightning's ``data_parallel_size="auto"`` means
"number of nodes" and ``tensor_parallel_size="auto"`` means "devices per node", i.e. pure tensor parallelism on one
machine. :class:`FSDP2Strategy` fixes tensor parallelism to 1 and resolves the data-parallel size to the world size.

Resuming: a run resumes under the strategy that wrote its checkpoint. Lightning maps a DDP file's optimizer state
onto FSDP2 by parameter order, which the two weight-decay groups of :func:`chatumm_kit.training.optim.param_groups`
reorder, so a DDP → FSDP2 resume fails (or, were shapes equal, would mix moments up).

Precision: with ``mixed_precision="bf16"`` FSDP2 casts parameters to bf16 for compute and reduces gradients in
float32 while the sharded master weights and optimizer state stay float32; keep the Trainer at ``precision="32-true"``
(an autocast plugin on top would be redundant). bf16 needs a CUDA device that supports it; on CPU pass ``None``.

Example:
    >>> strategy = fsdp2(mixed_precision=None, activation_checkpointing=False)   # the fields of FSDP2Plan
    >>> type(strategy).__name__, strategy.plan.unit_names
    ('FSDP2Strategy', ('layers', 'blocks'))
    >>> # L.Trainer(accelerator="cpu", devices=2, strategy=strategy).fit(system)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from chatumm_kit.config.errors import RecipeError
from chatumm_kit.config.imports import check_allowed, resolve_callable
from chatumm_kit.config.signatures import keyword_signature

if TYPE_CHECKING:
    import lightning as L
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "FSDP2Plan",
    "FSDP2Strategy",
    "MixedPrecisionName",
    "apply_fsdp2",
    "ddp",
    "fsdp2",
    "fsdp2_mixed_precision",
    "fsdp_gpu",
    "is_fsdp2_sharded",
]

MixedPrecisionName = Literal["bf16"] | None


def ddp(
    *, find_unused_parameters: bool = False, process_group_backend: str | None = None, **kwargs: Any
) -> DDPStrategy:
    """Lightning's ``DDPStrategy``; the backend defaults to gloo on CPU and nccl on CUDA.

    ``find_unused_parameters`` is off by default: every parameter of a ChatUMM layer is used in each step, and the
    search costs a graph traversal per step. Turn it on when a run freezes or skips a branch.

    Example:
        >>> ddp().__class__.__name__
        'DDPStrategy'
    """
    return DDPStrategy(
        find_unused_parameters=find_unused_parameters, process_group_backend=process_group_backend, **kwargs
    )


def fsdp2_mixed_precision(mixed_precision: MixedPrecisionName, *, device_type: str):
    """``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`` for ``"bf16"``, ``None`` for ``None``.

    Raises if bf16 is asked for on hardware without it (anything but a bf16-capable CUDA device) rather than
    silently training in another precision.

    Example:
        >>> fsdp2_mixed_precision(None, device_type="cpu") is None
        True
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision is None:
        return None
    if mixed_precision != "bf16":
        raise ValueError(f"mixed_precision: expected 'bf16' or None, got {mixed_precision!r}")
    if device_type != "cuda" or not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"mixed_precision='bf16': the {device_type!r} device mesh does not run bf16 FSDP2 (needs a CUDA GPU with "
            "bf16); pass mixed_precision=None to train in float32"
        )
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@dataclass(frozen=True)
class FSDP2Plan:
    """How FSDP2 shards a model — the one definition of these settings (:func:`apply_fsdp2`, :class:`FSDP2Strategy`
    and the :func:`fsdp2` factory all take them from here).

    Attributes:
        unit_names: attribute names of the layer lists whose elements become FSDP units (decoder layers, ViT blocks).
        mixed_precision: ``"bf16"`` (CUDA with bf16 only) or ``None``; see :func:`fsdp2_mixed_precision`.
        activation_checkpointing: recompute each outermost unit's activations in backward (leave the model's own
            ``gradient_checkpointing`` off then: :func:`apply_fsdp2` refuses both).
        reshard_after_forward: free gathered parameters after each unit's forward (ZeRO-3); ``False`` keeps them
            until backward (ZeRO-2, more memory, less communication). The root never reshards after forward.
        forward_methods: extra root methods that act as forward (``register_fsdp_forward_method``).
    """

    unit_names: tuple[str, ...] = ("layers", "blocks")
    mixed_precision: MixedPrecisionName = "bf16"
    activation_checkpointing: bool = True
    reshard_after_forward: bool = True
    forward_methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit_names", tuple(self.unit_names))  # YAML gives lists
        object.__setattr__(self, "forward_methods", tuple(self.forward_methods))
        if self.mixed_precision not in ("bf16", None):
            raise ValueError(f"FSDP2Plan.mixed_precision: expected 'bf16' or None, got {self.mixed_precision!r}")
        if not self.unit_names:
            raise ValueError("FSDP2Plan.unit_names: empty; name the layer lists to shard (e.g. ['layers'])")


def _unit_names(
    module: nn.Module,
    *,
    unit_names: Sequence[str],
    unit_types: Sequence[type[nn.Module]],
    predicate: Callable[[str, nn.Module], bool] | None,
) -> list[str]:
    """Qualified names of FSDP units, deepest first (fully_shard must go bottom-up)."""
    names = []
    for name, sub in module.named_modules():
        if not name:
            continue
        parts = name.split(".")
        in_list = len(parts) >= 2 and parts[-2] in unit_names and parts[-1].isdigit()
        if in_list or isinstance(sub, tuple(unit_types)) or (predicate is not None and predicate(name, sub)):
            names.append(name)
    return sorted(names, key=lambda n: n.count("."), reverse=True)


def _checkpoints_itself(module: nn.Module) -> bool:
    """Whether a kit component recomputes its own layers (``MoTBackbone``'s config, ``ViTEncoder``'s flag)."""
    config = getattr(module, "config", None)
    return bool(getattr(config, "gradient_checkpointing", False) or getattr(module, "gradient_checkpointing", False))


def is_fsdp2_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or any submodule."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def apply_fsdp2(
    module: nn.Module,
    *,
    device_mesh: DeviceMesh,
    plan: FSDP2Plan = FSDP2Plan(),  # noqa: B008 - frozen dataclass, safe as a default
    unit_types: Sequence[type[nn.Module]] = (),
    predicate: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Shard ``module`` with FSDP2: one unit per decoder layer / ViT block, then ``module`` itself as the root.

    A submodule is a unit when it is element ``i`` of a container whose attribute name is in ``plan.unit_names``
    (``...layers.3``), an instance of ``unit_types``, or accepted by ``predicate(name, submodule)``. Units are
    sharded deepest first, then the root takes every remaining parameter. With ``plan.activation_checkpointing``,
    each outermost unit recomputes its activations in backward (``torch.distributed._composable.checkpoint``, which
    adds hooks and keeps parameter names and state-dict keys unchanged).

    Args:
        module: the model (built, on any device; materialised or meta).
        device_mesh: 1-D data-parallel mesh (for Lightning's 2-D mesh pass ``mesh["data_parallel"]``).
        plan: what to shard and how (:class:`FSDP2Plan`, the one place these settings are defined).
        unit_types, predicate: further units (see above).

    Returns:
        The qualified names of the units, in the order they were sharded (root last, as ``""``).

    Example:
        >>> apply_fsdp2(model, device_mesh=mesh, plan=FSDP2Plan(mixed_precision=None))  # doctest: +SKIP
        ['layers.0', 'layers.1', '']
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if plan.activation_checkpointing:  # one setting in one place: never recompute a layer twice
        doubled = [n or type(module).__name__ for n, m in module.named_modules() if _checkpoints_itself(m)]
        if doubled:
            raise ValueError(
                f"apply_fsdp2(activation_checkpointing=True): {', '.join(doubled)} already checkpoint their own "
                "layers (gradient_checkpointing=True); turn one of the two off"
            )
    if is_fsdp2_sharded(module):
        raise ValueError(f"apply_fsdp2: {type(module).__name__} is already sharded (configure_model ran twice?)")
    if device_mesh.ndim != 1:
        raise ValueError(
            f"apply_fsdp2: expected a 1-D data-parallel mesh, got {device_mesh.ndim}-D {device_mesh.mesh_dim_names}; "
            "pass mesh['data_parallel']"
        )
    mp = fsdp2_mixed_precision(plan.mixed_precision, device_type=device_mesh.device_type)
    kwargs: dict[str, Any] = {"mesh": device_mesh} | ({"mp_policy": mp} if mp is not None else {})
    units = _unit_names(module, unit_names=plan.unit_names, unit_types=unit_types, predicate=predicate)
    if plan.activation_checkpointing:
        for name in units:
            if not any(name.startswith(other + ".") for other in units):  # outermost units only
                checkpoint(module.get_submodule(name))
    for name in units:
        fully_shard(module.get_submodule(name), reshard_after_forward=plan.reshard_after_forward, **kwargs)
    fully_shard(module, reshard_after_forward=False, **kwargs)  # the root is needed again at once in backward
    for method in plan.forward_methods:
        if not callable(getattr(module, method, None)):
            raise AttributeError(
                f"apply_fsdp2: forward_methods names {method!r}, not a method of {type(module).__name__}"
            )
        register_fsdp_forward_method(module, method)
    return [*units, ""]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure FSDP2 data parallelism, sharding the model with a :class:`FSDP2Plan`.

    Differences from the parent: the mesh is ``(world_size, 1)`` (data-parallel only) whatever the node layout,
    and if ``configure_model()`` did not shard anything itself, :meth:`setup` shards every direct child of the
    LightningModule that holds parameters with :func:`apply_fsdp2` (each child is its own root). Checkpointing,
    device placement and optimizer handling are the parent's.

    Args:
        plan: what to shard and how.
        save_distributed_checkpoint: ``True`` writes checkpoint folders of per-rank shards (no gather);
            ``False`` gathers one full file on rank 0.
        process_group_backend: ``None`` picks gloo on CPU, nccl on CUDA.
        timeout: collective timeout.

    Example:
        >>> FSDP2Strategy(plan=FSDP2Plan(mixed_precision=None)).plan.activation_checkpointing
        True
    """

    def __init__(
        self,
        *,
        plan: FSDP2Plan = FSDP2Plan(),  # noqa: B008 - frozen dataclass, safe as a default
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.plan = plan
        self.sharded_units: dict[str, list[str]] = {}

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # parent's "auto" = number of nodes; FSDP2 shards over all ranks
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard_model(self, module: nn.Module) -> list[str]:
        """Apply the plan to ``module`` now; for ``configure_model()`` of systems that shard their model themselves.

        Example (inside ``configure_model``):
            >>> shard = getattr(self.trainer.strategy, "shard_model", None)  # doctest: +SKIP
            >>> if shard: shard(self.model)  # doctest: +SKIP
        """
        units = apply_fsdp2(module, device_mesh=self.device_mesh["data_parallel"], plan=self.plan)
        owner = self.lightning_module
        name = next((n for n, m in owner.named_modules() if m is module), None) if owner is not None else None
        self.sharded_units[name or type(module).__name__] = units
        return units

    def setup(self, trainer: L.Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        if not is_fsdp2_sharded(module):  # configure_model() did not shard: shard each child holding parameters
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if own:
                raise ValueError(
                    f"FSDP2Strategy: {type(module).__name__} holds parameters directly ({own}); FSDP2 shards "
                    "submodules, so move them into the model built by configure_model()"
                )
            mesh = self.device_mesh["data_parallel"]
            for name, child in module.named_children():
                if any(True for _ in child.parameters()):
                    self.sharded_units[name] = apply_fsdp2(child, device_mesh=mesh, plan=self.plan)
        super().setup(trainer)


def fsdp2(
    *, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None, **plan: Any
) -> FSDP2Strategy:
    """An :class:`FSDP2Strategy` (a ``ModelParallelStrategy``) from flat YAML-friendly arguments: ``plan`` are the
    fields of :class:`FSDP2Plan` (its signature lists them), the rest :class:`FSDP2Strategy`'s.

    Example (YAML):
        trainer:
          strategy: {_component_: chatumm_kit.training.strategies.fsdp2, mixed_precision: bf16}

    Example:
        >>> fsdp2(unit_names=["layers"], mixed_precision=None).plan.unit_names
        ('layers',)
    """
    return FSDP2Strategy(
        plan=FSDP2Plan(**plan),
        save_distributed_checkpoint=save_distributed_checkpoint,
        process_group_backend=process_group_backend,
    )


fsdp2.__signature__ = keyword_signature(  # type: ignore[attr-defined]
    FSDP2Plan,
    inspect.Parameter("save_distributed_checkpoint", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool"),
    inspect.Parameter("process_group_backend", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None"),
)


def fsdp_gpu(
    *,
    layer_types: Sequence[type[nn.Module] | str],
    activation_checkpointing: bool = True,
    mixed_precision: MixedPrecisionName = "bf16",
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: Literal["full", "sharded"] = "sharded",
    **kwargs: Any,
) -> FSDPStrategy:
    """Lightning's ``FSDPStrategy`` (FSDP1) wrapping each instance of ``layer_types`` as one unit (GPU only).

    Args:
        layer_types: classes (or dotted paths on the recipe allow-list, e.g.
            ``"chatumm_kit.components.mot.MoTDecoderLayer"``) that become FSDP units and, with
            ``activation_checkpointing``, recompute their activations in backward.
        mixed_precision: ``"bf16"`` → ``MixedPrecision(param_dtype=bf16, reduce_dtype=float32,
            buffer_dtype=bf16)``; ``None`` → float32.
        sharding_strategy, state_dict_type, kwargs: passed to ``FSDPStrategy``.

    Example:
        >>> fsdp_gpu(layer_types=[torch.nn.TransformerEncoderLayer]).__class__.__name__
        'FSDPStrategy'
    """
    from torch.distributed.fsdp import MixedPrecision

    types = {t if isinstance(t, type) else resolve_callable(t, where="fsdp_gpu.layer_types") for t in layer_types}
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if not types or bad:
        raise ValueError(f"fsdp_gpu.layer_types: need nn.Module classes, got {list(layer_types)!r}")
    if mixed_precision not in ("bf16", None):
        raise ValueError(f"fsdp_gpu.mixed_precision: expected 'bf16' or None, got {mixed_precision!r}")
    mp = (
        MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16)
        if mixed_precision == "bf16"
        else None
    )
    return FSDPStrategy(
        auto_wrap_policy=types,
        activation_checkpointing_policy=types if activation_checkpointing else None,
        mixed_precision=mp,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        **kwargs,
    )


def _check_layer_types(kwargs: dict[str, Any]) -> list[str]:
    """``chatumm validate`` hook: each dotted ``layer_types`` entry must be on the recipe allow-list."""
    problems = []
    for i, t in enumerate(kwargs.get("layer_types") or []):
        if isinstance(t, str):
            try:
                check_allowed(t, where=f"layer_types[{i}]")
            except RecipeError as e:
                problems.extend(e.problems)
    return problems


fsdp_gpu.check_recipe_arguments = _check_layer_types
