"""Tests for the DeepLab-style heads (endoarss_lib.models.heads)."""
import pytest
import torch

from endoarss_lib.models.heads import ASPP, ClassificationHead, SegmentationHead, default_aspp_rates


@pytest.mark.parametrize("size", [4, 5, 8, 16, 32, 33, 64])
def test_default_rates_sensible(size):
    r = default_aspp_rates(size)
    assert len(r) == 3 and all(isinstance(v, int) and 1 <= v < size for v in r)
    assert r[0] < r[1] < r[2]


def test_default_rates_values_and_small_maps():
    assert default_aspp_rates(16) == (2, 4, 6)
    assert default_aspp_rates(33) == (5, 10, 15)
    assert default_aspp_rates(3) == (1, 2, 2)
    assert default_aspp_rates(1) == (1, 1, 1)
    with pytest.raises(ValueError, match="feature_size"):
        default_aspp_rates(0)


@pytest.mark.parametrize(
    "feat, out", [((4, 4), (56, 56)), ((16, 16), (224, 224)), ((6, 9), (30, 45)), ((3, 5), (7, 11))]
)
def test_segmentation_shapes_batch1_train(feat, out):
    head = SegmentationHead(12, 5, channels=16, feature_size=min(feat)).train()
    y = head(torch.randn(1, 12, *feat), out)
    assert y.shape == (1, 5, *out)
    assert torch.isfinite(y).all()


def test_segmentation_explicit_rates():
    head = SegmentationHead(8, 3, channels=8, rates=(1, 3, 5))
    assert head.aspp.rates == (1, 3, 5)
    assert head(torch.randn(2, 8, 8, 8), (16, 16)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="rates"):
        SegmentationHead(8, 3, rates=(1, 2))


def test_aspp_shape():
    assert ASPP(8, 16, (1, 2, 3)).train()(torch.randn(1, 8, 5, 5)).shape == (1, 16, 5, 5)


@pytest.mark.parametrize("token_dim", [None, 6])
def test_classification_shapes(token_dim):
    head = ClassificationHead(12, 4, channels=16, token_dim=token_dim).train()
    tok = None if token_dim is None else torch.randn(1, token_dim)
    y = head(torch.randn(1, 12, 4, 4), tok)
    assert y.shape == (1, 4)
    assert torch.isfinite(y).all()


def test_classification_token_errors():
    with pytest.raises(ValueError, match="cls_token"):
        ClassificationHead(8, 3, channels=8, token_dim=4)(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="cls_token"):
        ClassificationHead(8, 3, channels=8)(torch.randn(2, 8, 4, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="cls_token"):
        ClassificationHead(8, 3, channels=8, token_dim=4)(torch.randn(2, 8, 4, 4), torch.randn(2, 5))


def test_bad_inputs():
    seg, cls = SegmentationHead(8, 3, channels=8), ClassificationHead(8, 3, channels=8)
    for head, extra in ((seg, ((8, 8),)), (cls, ())):
        with pytest.raises(ValueError, match="in_channels"):
            head(torch.randn(2, 7, 4, 4), *extra)
        with pytest.raises(ValueError, match="4-D"):
            head(torch.randn(2, 8, 16), *extra)
    with pytest.raises(ValueError, match="out_size"):
        seg(torch.randn(2, 8, 4, 4), (8,))
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationHead(8, 0)
    with pytest.raises(ValueError, match="in_channels"):
        ClassificationHead(0, 3)


def test_every_parameter_gets_gradient():
    torch.manual_seed(0)
    seg = SegmentationHead(8, 3, channels=8, feature_size=8)
    cls = ClassificationHead(8, 3, channels=8, token_dim=4)
    f = torch.randn(2, 8, 8, 8)
    loss = (seg(f, (16, 16)) * torch.randn(2, 3, 16, 16)).sum() + (cls(f, torch.randn(2, 4)) * torch.randn(2, 3)).sum()
    loss.backward()
    for name, p in list(seg.named_parameters()) + list(cls.named_parameters()):
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_eval_determinism():
    torch.manual_seed(0)
    seg = SegmentationHead(8, 3, channels=8, dropout=0.5).eval()
    cls = ClassificationHead(8, 3, channels=8, dropout=0.5).eval()
    f = torch.randn(2, 8, 6, 6)
    assert torch.equal(seg(f, (12, 12)), seg(f, (12, 12)))
    assert torch.equal(cls(f), cls(f))


def test_detail_branch_reads_sub_patch_image_detail():
    """With the detail branch the logits near a changed 4 x 4 image region change with the features fixed; the
    paper's head ignores the image. The branch needs the image, and its parameters get gradients."""
    torch.manual_seed(0)
    features = torch.randn(2, 16, 4, 4)
    image = torch.randn(2, 3, 56, 56)
    plain = SegmentationHead(16, 3, channels=8, feature_size=4).eval()
    detail = SegmentationHead(16, 3, channels=8, feature_size=4, detail_channels=8).eval()
    assert plain(features, (56, 56)).shape == detail(features, (56, 56), image=image).shape == (2, 3, 56, 56)
    changed = image.clone()
    changed[:, :, 20:24, 20:24] += 3.0  # smaller than one 14 px patch
    delta = (detail(features, (56, 56), image=changed) - detail(features, (56, 56), image=image)).abs().sum(1)
    assert delta[:, 18:26, 18:26].mean() > 10 * delta[:, :8, :8].mean()  # local: near the change, not far away
    with pytest.raises(ValueError, match="image is required"):
        detail(features, (56, 56))
    detail.train()
    detail(features, (56, 56), image=image).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in detail.stem.parameters())


def test_detail_branch_through_the_model_config(tmp_path):
    from endoarss_lib.config import preset
    from endoarss_lib.training.engine import fit

    base = dict(image_size=56, synthetic_n_train=24, synthetic_n_test=12, batch_size=6, epochs=1, progress=False,
                out_dir=str(tmp_path))
    plain = preset("smoke", model={"backbone": "vit_tiny_patch14", "arch": "tesla"}, **base)
    detailed = preset("smoke", model={"backbone": "vit_tiny_patch14", "arch": "tesla", "seg_detail_channels": 8},
                      **base)
    assert plain.results_hash() == preset("smoke", model={"backbone": "vit_tiny_patch14", "arch": "tesla",
                                                          "seg_detail_channels": 0}, **base).results_hash()
    assert detailed.results_hash() != plain.results_hash()
    row = fit(detailed)
    assert 0 <= row["test_seg_miou"] <= 1
