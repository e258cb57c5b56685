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


def test_the_prepared_default_tokenizer_equals_the_one_from_the_gguf(tmp_path, monkeypatch, tokenizer):
    """The gateway's image bakes the tokenizer alone (``model prepare --tokenizer-only``) so it starts without
    parsing the GGUF: what it loads must tokenize and render chats exactly like the GGUF's fixed tokenizer."""
    from instructloop.model import default_tokenizer_dir, load_default_tokenizer, prepare_default_tokenizer

    monkeypatch.setenv("INSTRUCTLOOP_HOME", str(tmp_path))
    assert prepare_default_tokenizer() == default_tokenizer_dir(tmp_path)
    assert not list(default_tokenizer_dir(tmp_path).glob("*.safetensors")), "no weights"
    baked = load_default_tokenizer()
    assert type(baked).__name__ == type(tokenizer).__name__
    for attr in ("eos_token", "pad_token", "bos_token", "padding_side", "eos_token_id", "pad_token_id"):
        assert getattr(baked, attr) == getattr(tokenizer, attr), attr
    texts = ["Tell me about cats.", "  spaces\tand\nnewlines <|im_end|> ünïcødé 123"]
    assert baked(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    chat = [{"role": "user", "content": "Hi there"}]
    assert baked.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    ) == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
