from instructloop.model import resolve_model


def test_default_tokenizer_has_distinct_pad_and_eos(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("Hello world").input_ids[0] != tokenizer.bos_token_id  # no BOS prepended
    assert tokenizer.padding_side == "left"


def test_resolve_model_accepts_folders_and_hub_ids(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    import pytest

    from instructloop.model import ModelNotAvailable

    with pytest.raises(ModelNotAvailable, match="config.json"):
        resolve_model(str(tmp_path))
