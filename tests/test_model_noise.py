"""The student's model noise (D2CT.MODEL_NOISE, d2ct.modeling.model_noise): stochastic depth drops
a residual block's branch and nothing else, box-head dropout drops features, both only in training
mode, checkpoints load with or without them, and a real training runs with them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from d2ct.config import setup_cfg
from d2ct.errors import ConfigError
from d2ct.modeling.model_noise import DropPathConv2d, apply_model_noise, residual_blocks

from .conftest import train_tiny

NOISE = ["D2CT.MODEL_NOISE.DROP_PATH", "0.3", "D2CT.MODEL_NOISE.BOX_HEAD_DROPOUT", "0.5"]


def _model(config: str, *opts: str):
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", *opts], quiet=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_model_noise(model, cfg)
    return cfg, model


def _branch(block, x):
    """A bottleneck block's residual branch, computed by hand from its layers (no drop)."""
    out = F.relu(block.conv2(F.relu(block.conv1(x))))
    return block.conv3.norm(F.conv2d(out, block.conv3.weight, stride=block.conv3.stride))


@pytest.mark.parametrize("config, depth", [("configs/demo/radiologist_r50.yaml", 18),  # basic blocks
                                           ("configs/demo/radiologist_x101.yaml", 50)])  # bottlenecks
def test_drop_path_rates_grow_linearly_to_the_last_block(config, depth):
    cfg, model = _model(config, *NOISE)
    assert cfg.MODEL.RESNETS.DEPTH == depth
    blocks = residual_blocks(model)
    assert len(blocks) == {18: 8, 50: 16}[depth]
    ends = [getattr(b, "conv3" if depth == 50 else "conv2") for _, b in blocks]
    assert all(type(c) is DropPathConv2d for c in ends)
    probs = [c.drop_prob for c in ends]
    assert probs == pytest.approx([0.3 * (i + 1) / len(blocks) for i in range(len(blocks))])
    # only the branch's last convolution changes: the others keep Detectron2's class
    assert not any(type(m) is DropPathConv2d for _, b in blocks for n, m in b.named_children()
                   if n not in ("conv2", "conv3") or (depth == 50 and n == "conv2"))


def test_a_dropped_block_passes_its_shortcut_and_a_kept_one_is_rescaled():
    _, model = _model("configs/demo/radiologist_x101.yaml", *NOISE)
    block = dict(residual_blocks(model))["res3.0"]  # a projection shortcut
    assert block.shortcut is not None
    x = torch.randn(3, block.in_channels, 16, 16)
    block.train()
    block.conv3.drop_prob = 1.0  # every image loses its branch
    torch.testing.assert_close(block(x), F.relu(block.shortcut(x)))
    # kept (p small, seeded so every image keeps it): branch / (1 - p) + shortcut
    block.conv3.drop_prob = 1e-6
    branch = _branch(block, x)
    torch.testing.assert_close(block(x), F.relu(branch / (1 - 1e-6) + block.shortcut(x)), rtol=1e-4, atol=1e-4)
    block.eval()
    block.conv3.drop_prob = 1.0  # eval: the block is unchanged whatever the rate
    torch.testing.assert_close(block(x), F.relu(branch + block.shortcut(x)), rtol=1e-4, atol=1e-4)


def test_noise_is_drawn_per_image_and_only_in_training():
    _, model = _model("configs/demo/radiologist_x101.yaml", *NOISE)
    block = dict(residual_blocks(model))["res3.0"]
    block.conv3.drop_prob = 0.5
    x = torch.randn(64, block.in_channels, 8, 8)
    block.train()
    out = block(x)
    with torch.no_grad():
        dropped, kept = F.relu(block.shortcut(x)), F.relu(_branch(block, x) / 0.5 + block.shortcut(x))
    is_dropped = [torch.allclose(out[i], dropped[i], atol=1e-4) for i in range(len(x))]
    is_kept = [torch.allclose(out[i], kept[i], atol=1e-4) for i in range(len(x))]
    assert all(d != k for d, k in zip(is_dropped, is_kept))  # each image: its whole branch, or none of it
    assert 10 < sum(is_dropped) < 54  # about half of 64 images (a shared draw would give 0 or 64)
    resnet, images = model.backbone.bottom_up, torch.randn(2, 3, 64, 64)
    resnet.eval()  # no draw at all: the same output twice
    torch.testing.assert_close(resnet(images)["res5"], resnet(images)["res5"])


def test_box_head_dropout_drops_features_in_training_only():
    _, model = _model("configs/demo/radiologist_r50.yaml", "D2CT.MODEL_NOISE.BOX_HEAD_DROPOUT", "0.5")
    head = model.roi_heads.box_head
    x = torch.randn(64, head.fc1.in_features)
    head.train()
    out = head(x)
    reference = F.relu(head.fc2(F.relu(head.fc1(x.flatten(1)))))  # not the same draw: compare zeros
    # about half of the features the ReLU let through are dropped (a 2x sparser output would fail)
    zeros, relu_zeros = (out == 0).float().mean().item(), (reference == 0).float().mean().item()
    assert zeros == pytest.approx(relu_zeros + (1 - relu_zeros) * 0.5, abs=0.06)
    head.eval()
    torch.testing.assert_close(head(x), reference)


def test_checkpoints_load_both_ways_and_eval_outputs_agree():
    _, noisy = _model("configs/demo/radiologist_r50.yaml", *NOISE)
    _, plain = _model("configs/demo/radiologist_r50.yaml")
    assert noisy.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(noisy.state_dict(), strict=True)
    noisy.eval(), plain.eval()
    image = {"image": torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8), "height": 96, "width": 96}
    with torch.no_grad():
        fa = noisy.backbone(noisy.preprocess_image([image]).tensor)
        fb = plain.backbone(plain.preprocess_image([image]).tensor)
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k])


@pytest.mark.parametrize("key, value", [("DROP_PATH", "1.0"), ("BOX_HEAD_DROPOUT", "-0.1"), ("DROP_PATH", "True")])
def test_out_of_range_rates_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"D2CT.MODEL_NOISE.{key}"):
        setup_cfg("configs/demo/final.yaml", [f"D2CT.MODEL_NOISE.{key}", value], quiet=True)


def test_a_noisy_training_runs_and_its_checkpoint_loads_without_noise(tiny_phantom, tmp_path):
    # the demo's R34 (the demo student's backbone) for two real iterations
    out = train_tiny("configs/demo/radiologist_r101.yaml", tiny_phantom, tmp_path / "noisy", *NOISE)
    log = (out / "log.txt").read_text()
    assert "Model noise: stochastic depth over 16 blocks up to 0.3, dropout 0.5 in 2 box-head layers" in log
    assert "DROP_PATH: 0.3" in (out / "config.yaml").read_text()
    _, plain = _model("configs/demo/radiologist_r101.yaml")
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    plain.load_state_dict(state, strict=True)
