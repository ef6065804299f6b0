"""A tiny random DINOv2-with-registers model saved in the transformers layout, for offline extractor tests."""
import torch

IMAGE, PATCH, REGISTERS = 42, 14, 4


def save_tiny_dinov2(folder, final_norm_affine: bool = False):
    """Save the model to `folder` and return it. CLS and registers are random so that taking the wrong token shows;
    with `final_norm_affine` the final LayerNorm gets a non-trivial affine, so using it (or not) shows too."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=PATCH, image_size=IMAGE, num_register_tokens=REGISTERS)
    model = Dinov2WithRegistersModel(cfg).eval()
    with torch.no_grad():
        model.embeddings.register_tokens.normal_()
        model.embeddings.cls_token.normal_()
        if final_norm_affine:
            model.layernorm.weight.uniform_(0.5, 2.0)
            model.layernorm.bias.normal_()
    model.save_pretrained(folder)
    return model
