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


@pytest.mark.parametrize("cin,cout,side,kernel,bias,channels_last", [
    (8, 8, 4, 5, False, True),     # deep-stage shape: small maps
    (6, 5, 12, 3, True, False),    # few output channels (the head), with a bias
    (4, 4, 8, 3, False, False),
])
def test_swapped_weight_gradient_equals_torch(cin, cout, side, kernel, bias, channels_last, monkeypatch):
    import vnet

    # Every size takes the swapped weight gradient here, whatever the thresholds.
    monkeypatch.setattr(vnet, "WGRAD_ROUTE", "rule")
    monkeypatch.setattr(vnet, "FEW_OUT_CHANNELS", 0)
    monkeypatch.setattr(vnet, "SWAPPED_WGRAD_MAX_VOXELS", side**3)
    torch.manual_seed(0)
    conv = vnet.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=bias)
    # The reference: torch's own convolution and gradients, in float64.
    ref = torch.nn.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, cin, side, side + 1, side + 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    grads = []
    for layer, xi in ((conv, x.clone()), (ref, x.double())):
        xi.requires_grad_(True)
        out = layer(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        grads.append((out.detach(), xi.grad, *(p.grad for p in layer.parameters())))
    assert grads[0][2].shape == conv.weight.shape
    for ours, exact in zip(*grads):
        # float32 sums over thousands of terms: within 1e-5 of the largest value of each gradient
        torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-5 * float(exact.abs().max()))


@pytest.mark.parametrize("cin,cout,shape,kernel,bias,route", [
    (6, 5, (9, 10, 11), 5, True, "depth split"),   # the 5-class head
    (3, 2, (6, 7, 5), 3, False, "depth split"),
    (8, 8, (2, 2, 2), 5, False, "taps cut"),       # a 2^3 bottom stage under 5^3 kernels (training: one GEMM)
    (6, 4, (2, 3, 2), 5, True, "taps cut"),        # 12 voxels: the cut kernel when training too
    (4, 3, (1, 3, 2), 5, True, "both"),            # cut in depth and width, then split
])
def test_depth_split_and_cut_taps_equal_torch(cin, cout, shape, kernel, bias, route, monkeypatch):
    """The head's depth-split convolution, the kernel cut to the taps a thin map can reach and the one
    matrix product of a tiny map give torch's outputs and gradients (float64 reference), for any
    weight-gradient route."""
    import vnet

    monkeypatch.setattr(vnet, "WGRAD_ROUTE", "rule")
    torch.manual_seed(0)
    conv = vnet.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=bias)
    ref = torch.nn.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    weight, padding = vnet._reachable_taps(conv.weight, tuple(conv.padding), torch.Size(shape))
    assert (weight.shape != conv.weight.shape) == (route != "depth split")
    x = torch.randn(2, cin, *shape)
    for grad in (False, True):
        results = []
        for layer, xi in ((conv, x.clone()), (ref, x.double())):
            layer.zero_grad()
            xi.requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                out = layer(xi)
            if grad:
                (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
            results.append((out.detach(), *((xi.grad, *(p.grad for p in layer.parameters())) if grad else ())))
        for ours, exact in zip(*results):
            torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-5 * float(exact.abs().max()))


def test_tiny_maps_train_through_one_matrix_product(monkeypatch):
    """A 2^3 map takes _tiny_map_conv3d when training in float32 (the weight never copied), the cut
    kernel otherwise; a larger map never takes it."""
    import vnet

    calls = []
    tiny = vnet._tiny_map_conv3d
    monkeypatch.setattr(vnet, "_tiny_map_conv3d", lambda *a: calls.append(a[0].shape) or tiny(*a))
    conv = vnet.Conv3d(4, 4, 5, padding=2)
    conv(torch.randn(2, 4, 2, 2, 2))
    with torch.no_grad():
        conv(torch.randn(2, 4, 2, 2, 2))
    conv(torch.randn(2, 4, 2, 2, 3))
    assert calls == [torch.Size([2, 4, 2, 2, 2])]


def small_vnet_gradients():
    """A function returning a fresh backward pass's parameter gradients of one fixed small VNet and batch."""
    torch.manual_seed(0)
    model = build_vnet("small", base_width=4)
    x, target = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 5, (2, 32, 32, 32))

    def grads():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        return [p.grad.clone() for p in model.parameters()]

    return grads


def test_vnet_gradients_do_not_depend_on_the_weight_gradient_path(monkeypatch):
    import vnet

    monkeypatch.setattr(vnet, "WGRAD_ROUTE", "rule")
    grads = small_vnet_gradients()

    swapped = grads()  # the default thresholds: the deep stages and small outputs swapped
    monkeypatch.setattr(vnet, "SWAPPED_WGRAD_MAX_VOXELS", 0)
    monkeypatch.setattr(vnet, "SWAPPED_WGRAD_MAX_OUT", 0)
    for ours, theirs in zip(swapped, grads()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


def test_weight_gradient_route_is_timed_once_per_shape_and_fixed_when_deterministic(monkeypatch):
    """By default each convolution shape is timed both ways once on this CPU and the faster route
    kept; the gradients are the same either way. Under deterministic algorithms the size rule
    decides, with no timing, so a resumed run takes the routes of the interrupted one."""
    import vnet

    monkeypatch.setattr(vnet, "_wgrad_choice", {})
    monkeypatch.setattr(vnet, "WGRAD_ROUTE", "auto")
    # An earlier in-process run with --deterministic may have left deterministic algorithms on.
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    grads = small_vnet_gradients()

    auto = grads()
    assert len(vnet._wgrad_choice) > 3 and all(isinstance(v, bool) for v in vnet._wgrad_choice.values())
    choices = dict(vnet._wgrad_choice)
    grads()
    assert vnet._wgrad_choice == choices  # the second step times nothing new
    monkeypatch.setattr(vnet, "_swapped_route_is_faster", lambda *a: pytest.fail("timed under deterministic"))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    for ours, theirs in zip(auto, grads()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


def test_cpu_bf16_autocast_training_step_takes_onednns_weight_gradient(monkeypatch):
    """Under CPU autocast (train.py's bf16 on AMX) no layer takes the swapped weight gradient, whose
    backward would meet bf16 output gradients and float32 weights; every parameter gets a finite
    float32 gradient close to the float32 step's."""
    import vnet

    monkeypatch.setattr(vnet, "_swapped_route_is_faster", lambda *a: pytest.fail("timed under autocast"))
    monkeypatch.setattr(vnet, "WGRAD_ROUTE", "rule")
    torch.manual_seed(0)
    model = build_vnet("small", base_width=4)
    x, target = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 5, (2, 32, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    torch.nn.functional.cross_entropy(logits.float(), target).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), target).backward()  # float32, the size rule
    # Convolution weights only: a bias ahead of batch norm has a zero gradient, rounding noise in bf16.
    cosine = [torch.nn.functional.cosine_similarity(g.flatten(), p.grad.flatten(), dim=0) for g, p
              in zip(grads, model.parameters()) if p.dim() == 5]
    assert min(cosine) > 0.9, min(cosine)


@pytest.mark.parametrize("preset", ["small", "medium", "vnet"])
def test_every_stage_runs_in_the_autocast_dtype(preset):
    """Under bf16 autocast no stage falls back to float32: the input stage's residual is the float32
    input repeated, and adding it as it is promoted the full-resolution stages (issue 22, item 11)."""
    model = build_vnet(preset).eval()
    dtypes = {}
    for name, stage in model.named_children():
        stage.register_forward_hook(lambda _m, _i, out, name=name: dtypes.__setitem__(name, out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 1, 16, 16, 16))
    assert len(dtypes) == 10 and set(dtypes.values()) == {torch.bfloat16}, dtypes


@pytest.mark.parametrize("depths", [None, {"down_depths": (0, 1, 1), "up_depths": (1, 0, 1, 1)}])
def test_inference_sums_in_place_to_the_same_values(depths):
    """Under no-grad the residual stages add into the convolutions' output; the logits are bit for bit those
    of the graph-building forward, and a stage with no convolutions leaves its input untouched."""
    torch.manual_seed(0)
    model = build_vnet("small", **(depths or {})).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    kept = x.clone()
    with torch.enable_grad():
        expected = model(x)
    with torch.inference_mode():
        got = model(x)
    assert torch.equal(got, expected.detach())
    assert torch.equal(x, kept)


@pytest.mark.parametrize("in_channels", [1, 2])
def test_input_stage_adds_the_input_repeated_across_its_channels(in_channels):
    """The paper's input stage: its convolution plus the input repeated to base_width channels (a one-channel
    input broadcast, without the copy), in training and in inference alike."""
    torch.manual_seed(0)
    stage = build_vnet("small", in_channels=in_channels).input.eval()
    x = torch.randn(1, in_channels, 8, 8, 8)
    with torch.no_grad():
        expected = torch.nn.functional.elu(stage.conv(x) + x.repeat(1, 8 // in_channels, 1, 1, 1))
    with torch.enable_grad():
        assert torch.equal(stage(x), expected)
    with torch.inference_mode():
        assert torch.equal(stage(x), expected)
