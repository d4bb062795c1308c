import pytest
import torch

from vnet import PRESETS, VNetConfig, build_vnet, count_parameters


@pytest.mark.parametrize("shape", [(1, 1, 32, 32, 32), (2, 1, 16, 48, 32)])
def test_output_shape(shape):
    model = build_vnet("small", base_width=4).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 5, *shape[2:])


def test_vnet_preset_parameter_count_matches_monai():
    monai_nets = pytest.importorskip("monai.networks.nets")
    # The paper's VNet as released (MONAI's port): same topology, ELU instead of PReLU.
    ours = build_vnet("vnet", activation="elu")
    assert count_parameters(ours) == count_parameters(monai_nets.VNet(out_channels=5)) == 45_609_928
    assert count_parameters(build_vnet("vnet")) == 45_613_549  # PReLU adds one weight per channel
    assert 2_000_000 < count_parameters(build_vnet("small")) < 3_000_000


def test_input_not_divisible_by_16_is_a_clear_error():
    model = build_vnet("small", base_width=4)
    with pytest.raises(ValueError, match=r"divisible by 16.*\(40, 32, 32\).*pad to \(48, 32, 32\)"):
        model(torch.randn(1, 1, 40, 32, 32))


def test_config_round_trip_and_overrides():
    cfg = PRESETS["small"]
    assert VNetConfig.from_dict(cfg.to_dict()) == cfg
    model = build_vnet(cfg.to_dict(), dropout=0.2, norm="group")
    assert model.cfg.dropout == 0.2 and model.cfg.norm == "group"
    with pytest.raises(ValueError, match="unknown preset"):
        build_vnet("unet")
