"""A tiny random DINOv2-with-registers model saved in the transformers layout, for offline extractor tests."""
import torch

from utils.image_features import IMAGENET_MEAN, IMAGENET_STD, get_extractor

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


def reference_prenorm(model, images):
    """The model's own input to its final LayerNorm (x_prenorm), captured by a hook, and its normed output."""
    seen = {}

    def keep_input(module, args, output):  # returns None: a forward hook's return value would replace the output
        seen["x"] = args[0]

    hook = model.layernorm.register_forward_hook(keep_input)
    pixels = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    hook.remove()
    return seen["x"], out.last_hidden_state


def attention_free_extractor(folder):
    """The tiny model's extractor with the attention branches switched off: each token then depends on its own input."""
    e = get_extractor("dinov2_vitl14_reg", weights=folder, image_size=IMAGE)
    with torch.no_grad():
        for layer in e.model.encoder.layer:
            layer.layer_scale1.lambda1.zero_()
    return e


def patch_pair():
    """Two images that differ only in the patch at row 1, column 2."""
    img = torch.full((1, 3, IMAGE, IMAGE), 0.5)
    img2 = img.clone()
    img2[:, :, PATCH:2 * PATCH, 2 * PATCH:3 * PATCH] = torch.rand(3, PATCH, PATCH)
    return img, img2
