import pytest
import torch

from losses import DiceCELoss, dice_loss

monai_losses = pytest.importorskip("monai.losses")


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [True, False])
def test_dice_loss_matches_monai(include_background, batch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, 9, 10, generator=g)
    target = torch.randint(0, 5, (2, 8, 9, 10), generator=g)
    target[1][target[1] == 3] = 0  # class 3 absent from the second sample
    ref = monai_losses.DiceLoss(include_background=include_background, to_onehot_y=True, softmax=True, batch=batch)
    expected = ref(logits, target[:, None])
    assert torch.allclose(dice_loss(logits, target, include_background, batch), expected, atol=1e-5)


def test_absent_class_is_not_a_nan_and_rewards_empty_prediction():
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    logits = torch.full((1, 5, 4, 4, 4), -20.0)
    logits[:, 0][target == 0] = 20.0
    logits[:, 1][target == 1] = 20.0
    loss = dice_loss(logits, target, include_background=False)
    assert torch.isfinite(loss) and loss < 1e-3  # absent classes predicted empty: perfect


def test_dice_ce_gradients_are_finite():
    logits = torch.randn(2, 5, 8, 8, 8, requires_grad=True)
    target = torch.randint(0, 5, (2, 8, 8, 8))
    loss = DiceCELoss()(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
