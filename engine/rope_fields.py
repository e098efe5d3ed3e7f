"""The `yarn` and `dynamic` (Dynamic NTK) rope scalings of a config.json, read as transformers'
modeling_rope_utils reads them (_compute_yarn_parameters, _compute_dynamic_ntk_parameters) and
validated once here, so the rotary layer (engine.model.layers.rotary) trusts every value; also the
longest max_model_len each scaling serves (vLLM's limit).

yarn is static: one set of inverse frequencies and one attention factor (it scales cos and sin) at every
length, so weir's cos/sin cache is transformers' at every position. Resolved here: `factor` (null: the
ratio max_position_embeddings / original, as transformers), `original_max_position_embeddings` (a
top-level key wins over the one in rope_scaling, then max_position_embeddings, as transformers builds the
model), `beta_fast` / `beta_slow` (32 / 1), `truncate` (true) and `attention_factor` (explicit, else
from `mscale` / `mscale_all_dim`, else 0.1 * ln(factor) + 1).

dynamic is not static in transformers: a forward over a sequence longer than max_position_embeddings
recomputes the base from that length (keys already in its KV cache stay rotated the old way), and a
shorter one uses the plain base. A paged, prefix-cached KV cache needs one rotation per position, so
weir builds one cache per engine with transformers' formula at seq_len = max(max_model_len,
max_position_embeddings): with max_model_len <= max_position_embeddings (the default) that is the plain
base, transformers' own at every length the engine serves; above it (up to max_position_embeddings *
factor, vLLM's limit) it is the base transformers gives a sequence of max_model_len tokens, used for
every request (at max_model_len = max_position_embeddings * factor it is vLLM's fixed base), so tokens
differ from transformers' there.

Plain Python, no torch.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from engine.config_fields import config_file, positive_int, positive_number

logger = logging.getLogger("weir.engine")

YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # the YaRN paper's defaults, as transformers'


def _optional_number(params: dict[str, Any], key: str, where: str, model_path: str) -> float | None:
    """params[key] as a non-negative number, or None where missing or null."""
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(
            f"{where} in {config_file(model_path)} must be a non-negative number or null; got {value!r}"
        )
    return float(value)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """The YaRN paper's magnitude scaling (its eq. 21), as transformers' yarn_get_mscale."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def resolve_yarn(
    params: dict[str, Any], cfg: dict[str, Any], max_position_embeddings: int, model_path: str
) -> None:
    """Validate a yarn rope_scaling dict and resolve, in place, every value the cache needs."""
    original = cfg.get("original_max_position_embeddings")
    if original is None:
        original = params.get("original_max_position_embeddings")
    original = positive_int(
        max_position_embeddings if original is None else original,
        "yarn original_max_position_embeddings",
        model_path,
    )
    params["original_max_position_embeddings"] = original
    factor = params["factor"]
    if factor is None:  # (DeepSeek-V3's configs) the ratio of the extended to the pretraining length
        factor = max_position_embeddings / original
    params["factor"] = factor = positive_number(factor, "yarn factor", model_path)
    for key, default in (("beta_fast", YARN_BETA_FAST), ("beta_slow", YARN_BETA_SLOW)):
        value = params.get(key)
        params[key] = default if value is None else positive_number(value, f"yarn {key}", model_path)
    if params["beta_fast"] < params["beta_slow"]:
        raise ValueError(
            f"yarn beta_fast ({params['beta_fast']}) in {config_file(model_path)} must be at least "
            f"beta_slow ({params['beta_slow']})"
        )
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):  # (transformers reads null as false, its documented default is true)
        raise ValueError(
            f"yarn truncate in {config_file(model_path)} must be true or false; got {truncate!r}"
        )
    params["truncate"] = truncate
    mscale = _optional_number(params, "mscale", "yarn mscale", model_path)
    mscale_all_dim = _optional_number(params, "mscale_all_dim", "yarn mscale_all_dim", model_path)
    attention_factor = params.get("attention_factor")
    if attention_factor is not None:
        attention_factor = positive_number(attention_factor, "yarn attention_factor", model_path)
    elif mscale and mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:  # (an mscale without mscale_all_dim is ignored, as transformers does)
        attention_factor = yarn_get_mscale(factor)
    params["attention_factor"] = float(attention_factor)


def resolve_dynamic(
    params: dict[str, Any], rotary_dim: int, max_position_embeddings: int, model_path: str
) -> None:
    """Validate a dynamic rope_scaling dict; its `seq_len` is set once max_model_len is known."""
    params["factor"] = positive_number(params["factor"], "dynamic factor", model_path)
    if rotary_dim <= 2:  # the base is raised to rotary_dim / (rotary_dim - 2)
        raise ValueError(
            f"rope scaling 'dynamic' in {model_path} needs a rotary dimension above 2; got {rotary_dim}"
        )
    params["max_position_embeddings"] = max_position_embeddings


def scaled_max_len(rope_scaling: dict[str, Any] | None, max_position_embeddings: int) -> tuple[int, str]:
    """(the longest max_model_len the model serves, why): vLLM's limit, original_max_position_embeddings *
    factor for yarn and max_position_embeddings * factor for dynamic (never below max_position_embeddings)."""
    rope_type = (rope_scaling or {}).get("rope_type")
    if rope_scaling is not None and rope_type in ("yarn", "dynamic"):
        key = "original_max_position_embeddings" if rope_type == "yarn" else "max_position_embeddings"
        scaled = int(rope_scaling[key] * rope_scaling["factor"])
        if scaled > max_position_embeddings:
            return scaled, f"{key} {rope_scaling[key]} * {rope_type} factor {rope_scaling['factor']}"
    return max_position_embeddings, f"max_position_embeddings {max_position_embeddings}"


def default_max_model_len(rope_scaling: dict[str, Any] | None, max_position_embeddings: int) -> int:
    """max_model_len where the user gives none: yarn's scaled length (vLLM's default; its cache is
    transformers' at every length), else max_position_embeddings (dynamic too: transformers' output)."""
    if rope_scaling is not None and rope_scaling["rope_type"] == "yarn":
        return scaled_max_len(rope_scaling, max_position_embeddings)[0]
    return max_position_embeddings


def set_dynamic_seq_len(rope_scaling: dict[str, Any], max_model_len: int) -> None:
    """The one sequence length the dynamic base is computed for (see the module doc)."""
    trained = rope_scaling["max_position_embeddings"]
    rope_scaling["seq_len"] = max(max_model_len, trained)
    if max_model_len > trained:
        logger.info(
            "dynamic rope: one NTK base for max_model_len %d at every position (max_position_embeddings %d); "
            "transformers rescales per sequence length and keeps the plain base up to %d tokens, so tokens "
            "differ from its output; serve with --max-model-len %d for its output",
            max_model_len,
            trained,
            trained,
            trained,
        )
    else:
        logger.info(
            "dynamic rope: no scaling at max_model_len %d <= max_position_embeddings %d (as transformers at "
            "these lengths); --max-model-len up to %d scales the base",
            max_model_len,
            trained,
            scaled_max_len(rope_scaling, trained)[0],
        )
