"""The batched prompted forward matches SAM's own per-image forward; pixel normalisation; coordinates."""

import pytest
import torch
import torch.nn.functional as F

import medadapt as ma
from medadapt.train import PromptedSAM, build_sam, decode_masks, preprocess_images, scale_coords


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam("tiny", img_size=32, seed=0).eval()  # float32: SAM casts prompt coords to float


def test_preprocess_is_sams_normalisation(sam):
    x = torch.rand(2, 1, 32, 32, dtype=torch.float32)
    out = preprocess_images(sam, x)
    mean = torch.tensor([123.675, 116.28, 103.53], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], dtype=torch.float32).view(3, 1, 1)
    torch.testing.assert_close(out, (255 * x.expand(-1, 3, -1, -1) - mean) / std)
    x255 = 255 * torch.rand(1, 3, 32, 32, dtype=torch.float32)
    torch.testing.assert_close(preprocess_images(sam, x255, max_value=255.0), sam.preprocess(x255))
    assert preprocess_images(sam, torch.rand(1, 3, 20, 24, dtype=torch.float32)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="channels"):
        preprocess_images(sam, torch.rand(1, 2, 32, 32, dtype=torch.float32))
    with pytest.raises(ValueError, match="images"):
        preprocess_images(sam, torch.rand(3, 32, 32))


def test_scale_coords_maps_pixel_centres():
    xy = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    torch.testing.assert_close(scale_coords(xy, (4, 2), 8), torch.tensor([[1.5, 0.5], [5.5, 6.5]]))
    torch.testing.assert_close(scale_coords(xy, (8, 8), 8), xy)


def test_decode_masks_equals_sams_decoder_per_image(sam):
    """N = 3 images with K = 2 prompts each, in one pass, equal SAM's decoder run image by image."""
    n, k, c, g = 3, 2, 32, 4
    emb = torch.randn(n, c, g, g, dtype=torch.float32)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 31.0, 31.0]] * n, dtype=torch.float32)
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    masks, iou = decode_masks(sam.mask_decoder, emb, pe, sparse, dense)
    assert masks.shape == (n * k, 1, 4 * g, 4 * g) and iou.shape == (n * k, 1)
    for i in range(n):
        part = slice(i * k, (i + 1) * k)
        ref_masks, ref_iou = sam.mask_decoder(emb[i:i + 1], pe, sparse[part], dense[part], multimask_output=False)
        torch.testing.assert_close(masks[part], ref_masks)
        torch.testing.assert_close(iou[part], ref_iou)
    multi, _ = decode_masks(sam.mask_decoder, emb, pe, sparse, dense, multimask_output=True)
    assert multi.shape[1] == 3
    with pytest.raises(ValueError, match="multiple"):
        decode_masks(sam.mask_decoder, emb[:2], pe, sparse[:3], dense[:3])


def test_prompted_forward_equals_sam_forward(sam):
    """Boxes and points in label coordinates give SAM's own Sam.forward masks (its loop over images)."""
    torch.manual_seed(1)
    images = 255 * torch.rand(2, 3, 32, 32, dtype=torch.float32)
    boxes = torch.tensor([[[3.0, 4.0, 20.0, 30.0]], [[8.0, 1.0, 17.0, 12.0]]], dtype=torch.float32)
    points = torch.tensor([[[[5.0, 6.0], [20.0, 9.0]]], [[[10.0, 10.0], [0.0, 0.0]]]], dtype=torch.float32)
    point_labels = torch.tensor([[[1, 0]], [[1, -1]]])
    model = PromptedSAM(sam, max_value=255.0)
    ours = model({"image": images, "boxes": boxes, "points": points, "point_labels": point_labels})
    assert ours["logits"].shape == (2, 1, 32, 32) and ours["iou"].shape == (2, 1)
    ref = sam([{"image": images[i], "original_size": (32, 32), "boxes": boxes[i], "point_coords": points[i],
                "point_labels": point_labels[i]} for i in range(2)], multimask_output=False)
    for i in range(2):
        up = F.interpolate(ref[i]["low_res_logits"], size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(ours["logits"][i], up[:, 0])
        torch.testing.assert_close(ours["iou"][i], ref[i]["iou_predictions"][:, 0])
        decided = ours["logits"][i].abs() > 1e-4
        assert torch.equal((ours["logits"][i] > 0)[decided], ref[i]["masks"][:, 0][decided])


def test_label_grid_differs_from_input_size(sam):
    """Image and prompts on a 16x16 label grid: SAM sees the image at 32 px and the box scaled to 32 px;
    the 16x16 low-res mask is already at the label size."""
    images = torch.rand(1, 3, 16, 16)
    boxes16 = torch.tensor([[[2.0, 3.0, 9.0, 12.0]]])
    small = PromptedSAM(sam)({"image": images, "boxes": boxes16})["logits"]
    assert small.shape == (1, 1, 16, 16)
    embeddings = sam.image_encoder(preprocess_images(sam, images))
    boxes32 = torch.tensor([[4.5, 6.5, 18.5, 24.5]])  # (x + 0.5)·2 − 0.5
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes32, masks=None)
    ref, _ = decode_masks(sam.mask_decoder, embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense)
    torch.testing.assert_close(small[0], ref[:, 0])


def test_volume_batch_runs_slice_by_slice_without_sd_trans(sam):
    """(B, C, D, H, W) with prompts (B, D, K, 4) equals the B·D slices as a 2D batch."""
    vol = torch.rand(2, 3, 3, 32, 32, dtype=torch.float32)
    boxes = torch.tensor([4.0, 4.0, 25.0, 27.0], dtype=torch.float32).expand(2, 3, 2, 4).clone()
    boxes[..., 1, :2] = 10.0
    model = PromptedSAM(sam)
    assert model.volume_input == "slices"
    out = model({"image": vol, "boxes": boxes})
    assert out["logits"].shape == (2, 3, 2, 32, 32) and out["iou"].shape == (2, 3, 2)
    flat = model({"image": vol.movedim(2, 1).flatten(0, 1), "boxes": boxes.flatten(0, 1)})
    torch.testing.assert_close(out["logits"].flatten(0, 1), flat["logits"])
    with pytest.raises(ValueError, match="leading shape"):
        model({"image": vol, "boxes": boxes[:, :2]})
    with pytest.raises(ValueError, match="boxes"):
        model({"image": vol})
    with pytest.raises(ValueError, match="volume_input"):
        PromptedSAM(sam, volume_input="3d")


def test_injected_model_starts_as_base_and_disabling_restores_base():
    sam = build_sam("tiny", img_size=32, seed=0).eval()
    batch = {"image": torch.rand(2, 3, 32, 32), "boxes": torch.tensor([[[2.0, 2.0, 20.0, 20.0]]] * 2)}
    base = PromptedSAM(sam)(batch)["logits"]
    ma.inject(sam, ma.MedSAConfig(modules_to_save=["mask_decoder"]))
    model = PromptedSAM(sam)
    torch.testing.assert_close(model(batch)["logits"], base, rtol=0, atol=0)
    with torch.no_grad():
        for p in sam.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(model(batch)["logits"], base)
    with ma.disable_adapters(sam):
        torch.testing.assert_close(model(batch)["logits"], base, rtol=0, atol=0)


def test_volumes_go_through_sd_trans_and_hyp_adapters():
    """With SD-Trans the encoder gets the volume itself; at init the whole 3D model is the base model,
    and one training step reaches the depth adapters and the decoder's HyP adapters."""
    from medadapt.train import PromptedSegmentationLoss, add_prompts

    sam = build_sam("tiny", img_size=32, seed=0)
    torch.manual_seed(0)
    label = torch.zeros(1, 3, 32, 32, dtype=torch.long)
    label[..., 4:20, 6:25] = 1
    label[0, 1, 22:30, 2:12] = 2
    batch = add_prompts({"image": torch.rand(1, 3, 3, 32, 32), "label": label}, [1, 2], "box", jitter=0.0)
    base = PromptedSAM(sam)(batch)["logits"]
    ma.inject(sam, ma.MedSAConfig(space_depth=True, depth_pos_embed=4, hyper_prompt=True,
                                  modules_to_save=["mask_decoder"]))
    model = PromptedSAM(sam)
    assert model.volume_input == "volume"
    out = model(batch)
    assert out["logits"].shape == (1, 3, 2, 32, 32)
    torch.testing.assert_close(out["logits"], base, rtol=1e-5, atol=1e-5)
    PromptedSegmentationLoss()(out, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    depth = [g for n, g in grads.items() if "depth_adapter.up" in n]
    hyper = [g for n, g in grads.items() if "hyper_adapter.up" in n]
    assert depth and hyper
    assert all(g is not None and g.abs().sum() > 0 for g in depth + hyper)
