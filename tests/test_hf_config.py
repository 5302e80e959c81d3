"""``model=hf model.config=PATH``: a ModelSpec from a Hugging Face config.json, for every MoE
family the design card names; checked against the hand-worked presets where one exists, and
against the counts a reader can check on the config for the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from moebits.core.hf_config import spec_from_hf
from moebits.core.model_spec import MODEL_PRESETS
from moebits.sim.app import CONF_DIR
from moebits.sim.config import RunConfig, register_configs
from omegaconf import OmegaConf

FIXTURES = Path(__file__).parent / "data" / "hf_configs"
SAME_AS_PRESET = {"qwen3_30b_a3b": "Qwen3-30B-A3B", "qwen15_moe_a27b": "Qwen1.5-MoE-A2.7B", "mixtral_8x7b": "Mixtral-8x7B",
                  "olmoe_1b_7b": "OLMoE-1B-7B", "deepseek_v2_lite": "DeepSeek-V2-Lite", "llama_4_maverick": "Llama-4-Maverick"}


@pytest.mark.parametrize("stem", sorted(SAME_AS_PRESET))
def test_config_gives_the_preset(stem: str) -> None:
    spec = spec_from_hf(FIXTURES / f"{stem}.json")
    preset = MODEL_PRESETS[SAME_AS_PRESET[stem]]
    assert spec.to_dict() | {"name": preset.name} == preset.to_dict()


def test_qwen3_next_hybrid_attention() -> None:
    spec = spec_from_hf(FIXTURES / "qwen3_next_80b_a3b.json")
    preset = MODEL_PRESETS["Qwen3-Next-80B-A3B"]
    assert (spec.layers, spec.experts, spec.top_k, spec.expert_intermediate, spec.shared_experts,
            spec.shared_intermediate) == (48, 512, 10, 512, 1, 512)
    # 3 Gated DeltaNet layers (33.7M) per gated-GQA layer (27.3M): the preset's ~32M
    assert spec.attention_params == pytest.approx(preset.attention_params, rel=0.01)


def test_deepseek_v3_glm_and_gpt_oss() -> None:
    v3 = spec_from_hf(FIXTURES / "deepseek_v3.json")
    assert (v3.layers, v3.experts, v3.top_k, v3.shared_experts, v3.shared_intermediate) == (58, 256, 8, 1, 2048)
    mla = 7168 * 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 * 128 * 256 + 128 * 128 * 7168
    assert v3.attention_params == mla and v3.dense_params == 3 * (3 * 7168 * 18432 + mla)
    glm = spec_from_hf(FIXTURES / "glm_45_air.json")
    assert (glm.layers, glm.experts, glm.top_k, glm.shared_experts, glm.shared_intermediate) == (45, 128, 8, 1, 1408)
    assert glm.attention_params == 2 * 4096 * 96 * 128 + 2 * 4096 * 8 * 128
    oss = spec_from_hf(FIXTURES / "gpt_oss_20b.json")
    assert (oss.layers, oss.experts, oss.top_k, oss.expert_intermediate, oss.dense_params) == (24, 32, 4, 2880, 0)


def test_model_directory_and_errors(tmp_path: Path) -> None:
    model_dir = tmp_path / "Mixtral-8x7B-v0.1"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((FIXTURES / "mixtral_8x7b.json").read_text())
    assert spec_from_hf(model_dir).name == "Mixtral-8x7B-v0.1"
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="no routed experts"):
        spec_from_hf(dense)
    with pytest.raises(ValueError, match="no such config.json"):
        spec_from_hf(tmp_path / "nope")


def test_hydra_model_hf(tmp_path: Path) -> None:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=["model=hf", f"model.config={FIXTURES / 'olmoe_1b_7b.json'}"]))
    assert isinstance(cfg, RunConfig)
    spec = cfg.model.to_spec()
    assert spec is not None and spec.to_dict() | {"name": "OLMoE-1B-7B"} == MODEL_PRESETS["OLMoE-1B-7B"].to_dict()
