"""Which of the learner's exported weight names a vLLM engine's loader would not put into a parameter.

Why: a name the loader drops (its name mapping maps it to nothing, or an "unexpected" suffix it ignores)
leaves that vLLM parameter at its old value after every sync, and the sampler drifts from the learner
with no error. The reload itself raises on names it cannot place at all; this catches the silent ones,
before any training.

The names are resolved the way vLLM's loaders do, model-independently: the model's own
``hf_to_vllm_mapper`` (checkpoint names -> vLLM names), then the stacked layouts every vLLM model
declares in ``packed_modules_mapping`` (``q_proj`` / ``k_proj`` / ``v_proj`` -> ``qkv_proj``, ...), then
the expert mapping each mixture-of-experts layer builds for its own loader (``get_expert_mapping``:
``experts.gate_up_proj`` -> ``experts.routed_experts.w13_weight``).
"""

from __future__ import annotations

from typing import Any


def _fused_candidates(name: str, packed: dict[str, list[str]]) -> list[str]:
    """``name`` with a shard module replaced by its fused module (``.q_proj.`` -> ``.qkv_proj.``)."""
    out = []
    for fused, shards in packed.items():
        for shard in shards:
            if f".{shard}." in name:
                out.append(name.replace(f".{shard}.", f".{fused}.", 1))
    return out


# an MoE layer's loader: its name in the checkpoint (``layer_name``) -> (its path among the model's modules,
# its (parameter, checkpoint weight name) pairs)
ExpertLayers = dict[str, tuple[str, list[tuple[str, str]]]]


def _expert_candidates(name: str, experts: ExpertLayers) -> list[str]:
    """``name`` as the MoE layer it falls under would place it (vLLM's ``RoutedExperts.load_weights``: the
    first weight name of its mapping found in the name is replaced by its parameter)."""
    out = []
    for layer_name, (path, mapping) in experts.items():
        if not name.startswith(layer_name + "."):
            continue
        for param_name, weight_name in mapping:
            if weight_name in name:
                out.append(f"{path}.{name.replace(weight_name, param_name).removeprefix(layer_name + '.')}")
    return out


def resolve_names(names: list[str], mapper: Any, targets: set[str], packed: dict[str, list[str]],
                  experts: ExpertLayers | None = None) -> dict[str, str]:
    """name -> why vLLM would not load it, for every name of ``names`` that does not resolve to one of
    ``targets`` (the engine model's parameter and buffer names). Pure: testable without an engine."""
    rejected = {}
    for name in names:
        mapped = name
        if mapper is not None:
            mapped = mapper.map_name(name) if hasattr(mapper, "map_name") else mapper._map_name(name)
        if mapped is None:
            rejected[name] = "dropped by the engine's name mapping"
        elif mapped not in targets and not any(c in targets for c in _fused_candidates(mapped, packed)
                                                + _expert_candidates(mapped, experts or {})):
            rejected[name] = f"no engine parameter '{mapped}'"
    return rejected


def rejected_weight_names(worker: Any, names: list[str]) -> dict[str, str]:
    """In a vLLM worker (``llm.collective_rpc``): the names of ``names`` its model would not load."""
    model = worker.model_runner.get_model()
    targets = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    packed: dict[str, list[str]] = {}
    experts: ExpertLayers = {}
    for path, module in model.named_modules():
        packed.update(getattr(module, "packed_modules_mapping", None) or {})
        if callable(getattr(module, "get_expert_mapping", None)) and isinstance(getattr(module, "layer_name", None), str):
            mapping = module.get_expert_mapping(include_fused=True)
            experts[module.layer_name] = (path, [(param, weight) for param, weight, *_ in mapping])
    return resolve_names(names, getattr(model, "hf_to_vllm_mapper", None), targets, packed, experts)
