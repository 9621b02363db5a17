from lora_offset.formats.keys import kohya_name, kohya_to_module_map, split_key


def test_unet_key_replaces_dots():
    assert (kohya_name("lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
            == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
    assert kohya_name("lora_unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0") == (
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0")


def test_text_encoder_key_has_text_model_under_transformers_4_and_5():
    expected = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name("lora_te", "encoder.layers.0.self_attn.q_proj") == expected
    assert kohya_name("lora_te", "text_model.encoder.layers.0.self_attn.q_proj") == expected


def test_inverse_map_and_split():
    names = ["mid_block.attentions.0.proj_in", "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj"]
    inverse = kohya_to_module_map("lora_unet", names)
    assert inverse["lora_unet_mid_block_attentions_0_proj_in"] == "mid_block.attentions.0.proj_in"
    assert len(inverse) == 2
    assert split_key("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight") == (
        "lora_unet_mid_block_attentions_0_proj_in", "lora_down.weight")
