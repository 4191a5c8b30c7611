"""Uni-Med's CMoE connector: constant = mean of experts, hard = gradient isolation per task, routing weights sum to 1,
soft = sigmoid-normalised router, sparse = top-2 softmax, the token grid kept for segmentation, parameter ownership,
and the released code's token reshape (tokens become channels) next to the proper spatial map."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from endoarss_lib.models import (CMoEConnector, build_model, count_gflops, released_grid, released_token_map,
                                 routing_divergence, spatial_token_map, tokens_from_map)

VIT, RES = "vit_tiny_patch14", "resnet_tiny"
SIZE, K, S = 42, 3, 4


def tiny(backbone=VIT, arch="hps", router="soft", **kw):
    torch.manual_seed(kw.pop("seed", 0))
    kw.setdefault("head_channels", 16)
    return build_model(backbone, arch, num_activities=K, num_seg_classes=S, image_size=SIZE, connector="cmoe",
                       cmoe_router=router, **kw)


def feats(b=2, d=8, h=3, w=4, tok=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmap = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
    cls = torch.randn(b, d, generator=g, dtype=torch.float64) if tok else None
    return fmap, cls


def connector(router, d=8, experts=5, seed=0, **kw):
    torch.manual_seed(seed)
    return CMoEConnector(d, ("cls", "seg"), num_experts=experts, router=router, **kw).double()


def manual_expert(expert, x):
    h = x @ expert.fc1.weight.T + expert.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return h @ expert.fc2.weight.T + expert.fc2.bias


def test_constant_router_is_the_mean_of_the_experts():
    conn = connector("constant")
    fmap, tok = feats()
    out = conn({"cls": (fmap, tok), "seg": (fmap, tok)})
    x = torch.cat([tok[:, None], tokens_from_map(fmap)], 1)
    ref = torch.stack([manual_expert(e, x) for e in conn.experts]).mean(0)
    for t in ("cls", "seg"):
        y, new_tok = out[t]
        assert y.shape == fmap.shape
        assert torch.allclose(tokens_from_map(y), ref[:, 1:], atol=1e-12)
        assert torch.allclose(new_tok, ref[:, 0], atol=1e-12)
    assert not hasattr(conn, "router") and not hasattr(conn, "task_tokens")
    assert conn.last_routing["cls"]["entropy"].item() == pytest.approx(math.log(5))


def test_soft_router_is_sigmoid_normalised_and_depends_on_the_task_token():
    conn = connector("soft")
    fmap, _ = feats(tok=False)
    x = tokens_from_map(fmap)
    out = conn({"cls": (fmap, None), "seg": (fmap, None)})
    ys = torch.stack([manual_expert(e, x) for e in conn.experts], dim=-2)
    weights = {}
    for t in ("cls", "seg"):
        inp = torch.cat([conn.task_tokens[t].expand_as(x), x], -1)
        logits = conn.router(inp)
        w = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
        assert torch.allclose(conn.routing_weights(t, x), w, atol=1e-14)
        assert not torch.allclose(w, logits.softmax(-1))  # not a softmax
        assert torch.allclose(tokens_from_map(out[t][0]), (w[..., None] * ys).sum(-2), atol=1e-12)
        weights[t] = w
    assert not torch.allclose(weights["cls"], weights["seg"])  # task tokens route differently
    assert conn.task_tokens["cls"].std().item() < 0.1  # N(0, 0.02) init


@pytest.mark.parametrize("router", ["soft", "sparse", "hard", "constant"])
def test_routing_weights_sum_to_one_per_token(router):
    conn = connector(router)
    x = tokens_from_map(feats(b=3)[0])
    for t in ("cls", "seg"):
        w = conn.routing_weights(t, x)
        assert w.shape == (3, 12, 5) and (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(3, 12, dtype=w.dtype), atol=1e-12)
        nonzero = (w > 0).sum(-1)
        expected = {"soft": 5, "sparse": 2, "hard": 1, "constant": 5}[router]
        assert (nonzero == expected).all()
    if router == "sparse":  # the two kept experts are the top-2 logits, softmax-weighted
        inp = torch.cat([conn.task_tokens["cls"].expand_as(x), x], -1)
        logits = conn.router(inp)
        vals, idx = logits.topk(2, -1)
        w = conn.routing_weights("cls", x)
        assert torch.allclose(w.gather(-1, idx), vals.softmax(-1), atol=1e-14)
    if router == "hard":
        assert (conn.routing_weights("cls", x).argmax(-1) == 0).all()
        assert (conn.routing_weights("seg", x).argmax(-1) == 1).all()


@pytest.mark.parametrize("backbone,arch", [(VIT, "hps"), (VIT, "tesla"), (RES, "hps")])
def test_hard_routing_isolates_each_task_gradient_to_its_expert(backbone, arch):
    model = tiny(backbone, arch, router="hard", cmoe_experts=3, cmoe_hidden=32)
    x = torch.randn(2, 3, SIZE, SIZE)
    y_cls, y_seg = torch.randint(0, K, (2,)), torch.randint(0, S, (2, SIZE, SIZE))
    for t, own in (("cls", 0), ("seg", 1)):
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out["cls"], y_cls) if t == "cls" else F.cross_entropy(out["seg"], y_seg)
        loss.backward()
        for e, expert in enumerate(model.connector.experts):
            grads = [p.grad for p in expert.parameters()]
            if e == own:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), (t, e)
            else:
                assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), (t, e)
    names_cls = {n for n, _ in model.named_task_specific_parameters("cls")}
    names_shared = {n for n, _ in model.named_trainable_shared_parameters()}
    assert {"connector.experts.0.fc1.weight", "connector.experts.0.fc2.bias"} <= names_cls
    assert "connector.experts.1.fc1.weight" in {n for n, _ in model.named_task_specific_parameters("seg")}
    assert "connector.experts.2.fc1.weight" in names_shared  # beyond the tasks: unused, not owned


def test_soft_router_parameters_are_shared_and_task_tokens_task_specific():
    model = tiny(VIT, "tesla", router="soft")
    cls = {n for n, _ in model.named_task_specific_parameters("cls")}
    seg = {n for n, _ in model.named_task_specific_parameters("seg")}
    shared = {n for n, _ in model.named_trainable_shared_parameters()}
    assert "connector.task_tokens.cls" in cls and "connector.task_tokens.seg" in seg
    assert {n for n in shared if n.startswith("connector.")} >= {"connector.router.0.weight",
                                                                  "connector.experts.4.fc2.weight"}
    rep = model.parameter_report()
    assert rep["connector"]["trainable"] == rep["connector"]["total"] == sum(
        p.numel() for p in model.connector.parameters())


# every router on every backbone and architecture would be 16 models; each appears at least once here
GRID = [(VIT, "hps", r) for r in ("soft", "sparse", "hard", "constant")] + [
    (VIT, "tesla", "soft"), (VIT, "tesla", "hard"), (RES, "hps", "sparse"), (RES, "tesla", "constant")]


@pytest.mark.parametrize("backbone,arch,router", GRID, ids=["-".join(g) for g in GRID])
def test_every_backbone_and_architecture_keeps_the_token_grid(backbone, arch, router):
    model = tiny(backbone, arch, router, cmoe_hidden=32, cmoe_router_hidden=32)
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert out["seg"].shape == (2, S, SIZE, SIZE) and out["cls"].shape == (2, K)
    grid = -(-SIZE // model.backbone.stride)  # 3 x 3 tokens (ViT/14) or the ResNet's stride-16 map
    f = model.features(x)
    assert all(f[t].shape == (2, model.backbone.out_channels, grid, grid) for t in ("cls", "seg"))
    (out["cls"].sum() + out["seg"].mean()).backward()
    summary = model.connector.routing_summary()
    assert set(summary) == {"cls", "seg"} and all(sum(s["weights"]) == pytest.approx(1.0) for s in summary.values())


def test_shared_map_computes_the_experts_once_with_the_same_result():
    conn = connector("soft")
    fmap, tok = feats()
    joint = conn({"cls": (fmap, tok), "seg": (fmap, tok)})
    alone = {t: conn({t: (fmap.clone(), tok.clone())})[t] for t in ("cls", "seg")}
    for t in ("cls", "seg"):
        assert torch.allclose(joint[t][0], alone[t][0], atol=1e-12)
        assert torch.allclose(joint[t][1], alone[t][1], atol=1e-12)


def test_tesla_batched_equals_per_task_loop_with_the_connector():
    model = tiny(VIT, "tesla", router="sparse").eval()
    with torch.no_grad():
        for p in model.parameters():  # non-zero task adapters so the two task maps differ
            if p.requires_grad and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn_like(p) * 0.05)
        x = torch.randn(2, 3, SIZE, SIZE)
        batched, loop = model(x), model.forward_per_task(x)
    for t in ("cls", "seg"):
        assert torch.allclose(batched[t], loop[t], atol=1e-5)


def test_gflops_include_the_connector_and_validation():
    model = tiny(VIT, "hps")
    g = count_gflops(model, by_component=True)
    assert g["connector"] > 0
    parts = g["sma"] + g["backbone"] + g["gates"] + g["connector"] + g["head.cls"] + g["head.seg"]
    assert abs(parts - g["total"]) < 1e-9
    with pytest.raises(ValueError, match="cmoe_router"):
        tiny(VIT, "hps", router="top1")
    with pytest.raises(ValueError, match="cmoe_experts >= 2"):
        tiny(VIT, "hps", router="hard", cmoe_experts=1)
    with pytest.raises(ValueError, match="connector"):
        build_model(VIT, "hps", num_activities=K, num_seg_classes=S, image_size=SIZE, connector="qformer")
    with pytest.raises(ValueError, match="token_map"):
        build_model(RES, "hps", num_activities=K, num_seg_classes=S, image_size=SIZE, token_map="released")


def test_routing_divergence_closed_form():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert routing_divergence(p, q) == pytest.approx(math.log(2))
    assert routing_divergence(p, p) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The released code's reshape
# ---------------------------------------------------------------------------------------------------------------

def test_released_reshape_is_the_view_and_puts_tokens_on_channels():
    assert released_grid(768) == (16, 48) and released_grid(64) == (8, 8) and released_grid(384) == (16, 24)
    tokens = torch.randn(2, 256, 768)
    assert torch.equal(released_token_map(tokens), tokens.view(2, 256, 16, 48))  # the released code's literal
    # position probe: mark token p (grid position (1, 2) of a 4 x 4 grid) and see where it lands
    h = w = 4
    marked = torch.zeros(1, h * w, 16)
    p = 1 * w + 2
    marked[0, p] = 1.0
    spatial = spatial_token_map(marked, h, w)
    assert torch.nonzero(spatial.abs().sum(1)[0]).tolist() == [[1, 2]]  # one pixel: the patch's position
    released = released_token_map(marked)
    assert released.shape == (1, 16, 4, 4)
    assert torch.nonzero(released.abs().sum((2, 3))[0]).flatten().tolist() == [p]  # one channel ...
    assert int((released[0, p] != 0).sum()) == 16  # ... spread over every "pixel"
    assert torch.equal(tokens_from_map(spatial), marked)


def test_released_token_map_model_option():
    model = build_model(VIT, "hps", num_activities=K, num_seg_classes=S, image_size=56, head_channels=16,
                        token_map="released")
    x = torch.randn(2, 3, 56, 56)
    f = model.features(x)["seg"]
    assert f.shape == (2, 16, 8, 8)  # 4 x 4 = 16 tokens become channels over an 8 x 8 grid of 64 features
    ref = build_model(VIT, "hps", num_activities=K, num_seg_classes=S, image_size=56, head_channels=16)
    ref.backbone.load_state_dict(model.backbone.state_dict())
    proper = ref.features(x)["seg"]
    assert torch.equal(f, tokens_from_map(proper).reshape(2, 16, 8, 8))
    assert model(x)["seg"].shape == (2, S, 56, 56)
