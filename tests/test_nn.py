"""Modules and the Vision Transformer: names and shapes as timm, state dicts, errors, whole-model checks."""

import ast
import math
import pathlib

import numpy as np
import pytest

import minivit
from minivit import functional as F, nn, optim
from minivit.gradcheck import gradcheck

TINY = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0)


def tiny_vit(**overrides):
    return nn.VisionTransformer(**{**TINY, **overrides})


def images(n, c=1, size=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, size, size)).astype(np.float32)


def test_parameter_names_and_shapes_follow_timm():
    model = nn.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=2,
                                 num_heads=4, mlp_ratio=2.0)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = {"cls_token": (1, 1, 64), "pos_embed": (1, 50, 64), "patch_embed.proj.weight": (64, 1, 4, 4),
                "patch_embed.proj.bias": (64,), "norm.weight": (64,), "norm.bias": (64,), "head.weight": (10, 64),
                "head.bias": (10,)}
    for i in range(2):
        expected.update({f"blocks.{i}.norm1.weight": (64,), f"blocks.{i}.norm1.bias": (64,),
                         f"blocks.{i}.attn.qkv.weight": (192, 64), f"blocks.{i}.attn.qkv.bias": (192,),
                         f"blocks.{i}.attn.proj.weight": (64, 64), f"blocks.{i}.attn.proj.bias": (64,),
                         f"blocks.{i}.norm2.weight": (64,), f"blocks.{i}.norm2.bias": (64,),
                         f"blocks.{i}.mlp.fc1.weight": (128, 64), f"blocks.{i}.mlp.fc1.bias": (128,),
                         f"blocks.{i}.mlp.fc2.weight": (64, 128), f"blocks.{i}.mlp.fc2.bias": (64,)})
    assert shapes == expected
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in model.state_dict().values())
    assert model.blocks[0].norm1.eps == 1e-6


def test_defaults_are_timm_vit_base():
    model = nn.VisionTransformer(depth=1)
    assert model.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert model.pos_embed.shape == (1, 197, 768)
    assert model.head.weight.shape == (1000, 768)
    assert model.blocks[0].attn.num_heads == 12


def test_avg_pooling_uses_fc_norm_like_timm():
    model = tiny_vit(global_pool="avg", class_token=False)
    keys = list(model.state_dict())
    assert "fc_norm.weight" in keys and "norm.weight" not in keys and "cls_token" not in keys
    assert model.pos_embed.shape == (1, 4, 8)
    assert model(images(2)).shape == (2, 3)


def test_sincos_position_embedding_is_fixed_and_excluded_from_training():
    model = tiny_vit(pos_embed="sincos")
    assert not model.pos_embed.requires_grad
    np.testing.assert_allclose(model.pos_embed.data[0, 0], 0.0)  # the class token has no position
    table = model.pos_embed.data[0, 1:]
    np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # row 0, col 0: sin 0, cos 0
    groups = optim.param_groups_weight_decay(model, 0.05)
    assert all(p is not model.pos_embed for g in groups for p in g["params"])


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = tiny_vit(seed=3).state_dict(), tiny_vit(seed=3).state_dict(), tiny_vit(seed=4).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head.weight"], c["head.weight"])


def test_initial_statistics_follow_timm():
    model = nn.VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=3, seed=0)
    qkv = model.blocks[0].attn.qkv.weight.data
    assert abs(qkv.std() - 0.02) < 0.001
    assert np.all(model.blocks[0].attn.qkv.bias.data == 0)
    assert np.abs(model.cls_token.data).max() < 1e-5
    assert abs(model.pos_embed.data.std() - 0.02) < 0.002


def test_loss_at_initialisation_is_about_log_num_classes():
    model = nn.VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                                 num_heads=2)
    x = images(64, size=16)
    y = np.random.default_rng(1).integers(0, 10, 64)
    loss = F.cross_entropy(model(x), y).item()
    assert abs(loss - math.log(10)) < 0.1


def test_whole_tiny_vit_gradient_check_all_parameters():
    model = tiny_vit(num_classes=3)
    x, y = images(2).astype(np.float64), np.array([0, 2])
    report = gradcheck(lambda x: F.cross_entropy(model(x), y), [x], params=model, mode="directional")
    assert report.ok and report.max_rel <= 1e-6, report
    assert len(report.rows) == 1 + len(model.parameters())
    full = gradcheck(model, [x], mode="full")
    assert full.ok and full.max_rel <= 1e-6, full


@pytest.mark.parametrize("options", [dict(global_pool="avg", class_token=False), dict(pos_embed="sincos"),
                                     dict(act_approximate="tanh", qkv_bias=False)])
def test_variants_pass_the_gradient_check(options):
    report = gradcheck(tiny_vit(depth=1, **options), [images(2)], mode="directional")
    assert report.ok, report


def test_a_tiny_vit_overfits_32_images():
    model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=4, embed_dim=32, depth=2,
                                 num_heads=2, mlp_ratio=2.0, seed=0)
    x = images(32, seed=5)
    y = np.random.default_rng(6).integers(0, 4, 32)
    opt = optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(300):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05, f"loss {loss.item():.3f} after {step + 1} steps"


def test_bad_configurations_and_inputs_get_named_errors():
    with pytest.raises(ValueError, match="image 30x30 is not divisible by patch_size 4"):
        nn.VisionTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="embed_dim 64 is not divisible by num_heads 5"):
        nn.VisionTransformer(embed_dim=64, num_heads=5)
    with pytest.raises(ValueError, match="embed_dim 10 is not divisible by num_heads 4"):
        nn.Attention(10, 4)
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\), got shape \(2, 3, 8, 8\)"):
        model(images(2, c=3))
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 12, 12\)"):
        model(images(2, size=12))
    with pytest.raises(ValueError, match="global_pool"):
        tiny_vit(global_pool="max")
    with pytest.raises(ValueError, match="needs class_token"):
        tiny_vit(class_token=False)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_vit(embed_dim=6, num_heads=2, pos_embed="sincos")


def test_load_state_dict_lists_every_problem_at_once():
    model = tiny_vit()
    state = model.state_dict()
    state.pop("head.bias")
    state.pop("norm.weight")
    state["extra.weight"] = np.zeros(3)
    state["head.weight"] = np.zeros((5, 8))
    with pytest.raises(ValueError) as info:
        model.load_state_dict(state)
    message = str(info.value)
    for part in ("missing keys (2): norm.weight, head.bias", "unexpected keys (1): extra.weight",
                 "head.weight: checkpoint (5, 8), model (3, 8)"):
        assert part in message
    result = model.load_state_dict(state, strict=False)
    assert result["missing"] == ["norm.weight", "head.bias"]


def test_state_dict_round_trip_and_dtype_conversion():
    a, b = tiny_vit(seed=1), tiny_vit(seed=2)
    b.load_state_dict(a.state_dict())
    x = images(2)
    np.testing.assert_array_equal(a(x).data, b(x).data)
    state = a.state_dict()
    state["head.weight"][...] = 7  # a copy: changing it leaves the model alone
    assert not np.all(a.head.weight.data == 7)
    b.double()
    assert b.dtype == np.float64 and b(x.astype(np.float64)).dtype == np.float64
    np.testing.assert_allclose(b(x.astype(np.float64)).data, a(x).data, rtol=1e-4, atol=1e-5)
    b.float()
    assert all(p.dtype == np.float32 for p in b.parameters())


def test_module_basics():
    model = tiny_vit(depth=1, proj_drop_rate=0.1)
    assert len(model.parameters()) == len(dict(model.named_parameters())) == 20
    assert model.num_parameters() == sum(v.size for v in model.state_dict().values())
    model.eval()
    assert not model.blocks[0].mlp.drop1.training
    x = images(2)
    np.testing.assert_array_equal(model(x).data, model(x).data)  # no dropout in eval mode
    model.train()
    assert model.blocks[0].mlp.drop1.training
    assert not np.array_equal(model(x).data, model(x).data)
    F.cross_entropy(model(x), np.array([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "VisionTransformer(" in repr(model) and "(blocks): ModuleList" in repr(model)

    class Broken(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(2))
    with pytest.raises(RuntimeError, match="must call super"):
        Broken()


def test_attention_can_keep_its_probabilities():
    model = tiny_vit()
    model.blocks[1].attn.keep_attn = True
    model(images(3))
    probs = model.blocks[1].attn.attn_probs
    assert probs.shape == (3, 2, 5, 5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert model.blocks[0].attn.attn_probs is None


PACKAGE = pathlib.Path(minivit.__file__).parent


def test_ops_never_import_numpy_so_the_same_code_runs_on_cupy():
    for path in sorted((PACKAGE / "ops").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n and n.split(".")[0] == "numpy" for n in names), f"{path.name} imports numpy"


def test_module_forwards_never_call_numpy_on_data():
    for path in sorted((PACKAGE / "nn").glob("*.py")):
        tree = ast.parse(path.read_text())
        for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
            for fn in [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name.startswith("forward")]:
                used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
                assert "np" not in used, f"{path.name}: {cls.name}.{fn.name} uses np"


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_num_classes_0_returns_the_pooled_features_as_timm(global_pool):
    """No head: the model's output is the pooled, normalised (B, D) features (timm's num_classes=0), the same
    numbers as forward_head(pre_logits=True) of the model with a head."""
    options = dict(global_pool=global_pool, class_token=global_pool == "token")
    features_model = tiny_vit(num_classes=0, **options)
    classifier = tiny_vit(**options)
    classifier.load_state_dict({**features_model.state_dict(), "head.weight": classifier.head.weight.data,
                                "head.bias": classifier.head.bias.data})
    x = images(3)
    features = features_model(x)
    assert features.shape == (3, TINY["embed_dim"])
    np.testing.assert_array_equal(features.data,
                                  classifier.forward_head(classifier.forward_features(x), pre_logits=True).data)
    assert not any(name.startswith("head.") for name, _ in features_model.named_parameters())
    model64 = tiny_vit(num_classes=0, **options).to(dtype=np.float64)
    upstream = np.random.default_rng(0).standard_normal((2, TINY["embed_dim"]))
    report = gradcheck(lambda img: model64(img) * minivit.Tensor(upstream), [images(2).astype(np.float64)])
    assert report.ok, report
    features.backward(np.ones(features.shape, np.float32))
    assert features_model.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        tiny_vit(num_classes=-1)


def test_images_of_the_wrong_kind_and_bad_patch_sizes_get_named_errors():
    model = tiny_vit()
    with pytest.raises(TypeError, match=r"floating-point, got dtype uint8.*astype\(np.float32\) / 255"):
        model((images(2) * 100).astype(np.uint8))
    with pytest.raises(TypeError, match="got list"):
        model(images(2).tolist())
    for bad in (0, -4):
        with pytest.raises(ValueError, match="patch_size must be a positive integer"):
            tiny_vit(patch_size=bad)
        with pytest.raises(ValueError, match="patch_size must be a positive integer"):
            F.patchify(images(1), bad)
        with pytest.raises(ValueError, match="patch_size must be a positive integer"):
            F.unpatchify(np.zeros((1, 4, 4)), bad)
    with pytest.raises(ValueError, match="concat: needs at least one tensor"):
        minivit.concat([])
    with pytest.raises(ValueError, match="stack: needs at least one tensor"):
        minivit.stack([])
    with pytest.raises(ValueError, match="transpose: axis 3 is out of range for a tensor with 2 dimensions"):
        minivit.Tensor(np.zeros((2, 3))).transpose(0, 3)
