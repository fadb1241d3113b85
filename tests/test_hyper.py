"""MIP hypernetworks: the encoding, HyperNet and hypernetize against hyperlight (test-only
oracle), the delta = 0 identity, gradients, batched hyper-inputs and input checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradlane.layers import EvoNormS0, HyperNet, hypernetize, mip_encode

hl = pytest.importorskip("hyperlight")


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_mip_encoding_has_constant_norm_and_matches_hyperlight():
    x = torch.rand(100, 3)
    x[0] = 0.0
    x[1] = 1.0
    enc = mip_encode(x)
    assert enc.shape == (100, 6)
    close(enc.norm(dim=-1), torch.full((100,), math.sqrt(3)))  # 1 per input scalar
    close(enc, hl.hypernet.encoding.encode_input(x, "cos|sin"))


def copy_from_hyperlight(ours: HyperNet, ref) -> None:
    """Our MLP layers <- hyperlight's backbone; theta_0 <- its output bias."""
    linears = [m for m in ref.backbone if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for mine, theirs in zip(ours.mlp[::2], linears[:-1], strict=True):
            mine.load_state_dict(theirs.state_dict())
        ours.out.weight.copy_(linears[-1].weight)
        ours.theta0.copy_(linears[-1].bias)


def test_hypernet_matches_hyperlight():
    outputs = {"fc.weight": (4, 3), "fc.bias": (4,), "conv.weight": (2, 1, 3, 3)}
    ref = hl.HyperNet(
        input_shapes={"b": (1,), "a": (2,)},
        output_shapes=outputs,
        hidden_sizes=[8, 8],
        encoding="cos|sin",
    )
    ours = HyperNet({"a": 2, "b": 1}, outputs, hidden=[8, 8], encoding="mip")
    copy_from_hyperlight(ours, ref)
    batch = {"a": torch.rand(5, 2), "b": torch.rand(5, 1)}
    want = ref(**{k: v.clone() for k, v in batch.items()})
    got = ours(batch)
    for name, shape in outputs.items():
        assert got[name].shape == (5, *shape)
        close(got[name], want[name])
    one = ours({"a": batch["a"][2], "b": batch["b"][2, 0]})  # one setting: unbatched shapes
    for name, shape in outputs.items():
        assert one[name].shape == shape
        close(one[name], want[name][2])


def test_hypernetize_matches_hyperlight_hypernetize():
    """The same predicted weights give the same outputs as hyperlight's external parameters."""
    ours = hypernetize(cnn(), ["0.weight", "4.*"], {"s": 1}, hidden=[6])
    with torch.no_grad():
        ours.hypernet.out.weight.normal_()  # delta != 0
    ref = cnn()
    ref_h = hl.hypernetize(ref, parameters=[ref[0].weight, ref[4].weight, ref[4].bias])
    x = torch.randn(7, 1, 6, 6)
    for s in (0.0, 0.3, 1.0):
        theta = ours.hypernet(s)
        with ref_h.using_externals(theta):
            want = ref_h(x)
        close(ours(x, hyper=s), want)


def test_delta_zero_is_the_original_network():
    original = cnn()
    model = hypernetize(copy.deepcopy(original), "*", {"s": 1}, hidden=[8, 8])
    assert [n for n, p in model.module.named_parameters()] == []  # every parameter predicted
    x = torch.randn(6, 1, 6, 6)
    for training in (True, False):
        original.train(training)
        model.train(training)
        batched = () if training else (torch.rand(6),)  # per-sample weights: no batch stats
        for s in (0.0, 0.5, 1.0, *batched):
            close(model(x, hyper=s), original(x))
        close(model.module[1].running_mean, original[1].running_mean)

    # after training moved both theta_0 and delta, zeroing delta's last layer leaves theta_0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(x, hyper=torch.rand(())).square().mean().backward()
        opt.step()
    with torch.no_grad():
        model.hypernet.out.weight.zero_()
    plain = copy.deepcopy(original).eval()
    model.eval()
    theta0 = model.hypernet(0.7)
    plain.load_state_dict({**plain.state_dict(), **theta0})
    close(model(x, hyper=0.7), plain(x))


def test_gradients_reach_theta0_and_the_hypernetwork():
    original = cnn()
    model = hypernetize(copy.deepcopy(original), ["0.*", "4.weight"], {"s": 1}, hidden=[8])
    x = torch.randn(6, 1, 6, 6)
    model(x, hyper=0.4).square().mean().backward()
    original(x).square().mean().backward()
    grads = model.hypernet(0.4)  # layout of theta_0's gradient, by name
    offset = 0
    for name, t in grads.items():  # d theta / d theta_0 = identity
        g = model.hypernet.theta0.grad[offset : offset + t.numel()].view_as(t)
        close(g, original.get_parameter(name).grad)
        offset += t.numel()
    assert model.hypernet.out.weight.grad.abs().sum() > 0
    assert model.module[4].bias.grad is not None  # the unpredicted parameters train as usual

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()  # now delta's last layer is non-zero, so gradients reach the hidden layers
    opt.zero_grad()
    model(x, hyper=0.4).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck_through_hypernetwork_fp64():
    torch.manual_seed(0)
    model = hypernetize(nn.Linear(3, 2), "*", {"s": 2}, hidden=[4]).double()
    with torch.no_grad():
        model.hypernet.out.weight.normal_()
    x = torch.randn(5, 3, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    hyper = torch.tensor([0.2, 0.9], dtype=torch.float64)

    def f(*ps):
        return torch.func.functional_call(
            model, dict(zip(names, ps, strict=True)), (x,), {"hyper": hyper}
        )

    assert torch.autograd.gradcheck(f, tuple(params))


def test_batched_hyper_inputs_give_each_sample_its_own_weights():
    torch.manual_seed(0)
    primary = nn.Sequential(
        nn.Conv2d(1, 4, 3), EvoNormS0(4, groups=2), nn.Flatten(), nn.Linear(64, 3)
    )
    model = hypernetize(primary, ["0.weight", "1.*"], {"s": 1, "t": 2}, hidden=[8])
    with torch.no_grad():
        model.hypernet.out.weight.normal_()
    x = torch.randn(5, 1, 6, 6)
    hyper = {"s": torch.rand(5), "t": torch.rand(5, 2)}
    batched = model(x, hyper=hyper)
    for b in range(5):
        one = model(x[b : b + 1], hyper={"s": hyper["s"][b], "t": hyper["t"][b]})
        close(batched[b : b + 1], one, 1e-5)
    assert not torch.allclose(batched[0], model(x[:1], hyper={"s": 0.0, "t": torch.zeros(2)})[0])
    batched.sum().backward()
    assert model.hypernet.theta0.grad is not None


def test_default_parametrisation_predicts_theta_directly():
    net = HyperNet({"s": 1}, {"w": (3, 2)}, hidden=[4], encoding="none", residual=False)
    assert not hasattr(net, "theta0") and net.out.bias is not None
    assert net(0.0)["w"].shape == (3, 2)
    net(-2.5)  # no encoding: any real input is allowed
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    close(net(0.3)["w"], torch.zeros(3, 2))


def test_bad_inputs_raise_value_errors():
    net = HyperNet({"s": 1, "t": 2}, {"w": (2,)}, hidden=[4])
    with pytest.raises(ValueError, match=r"hyper\['s'\]=1.5 is outside \[0, 1\]"):
        net({"s": 1.5, "t": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"hyper\['t'\]=-0.25 is outside \[0, 1\]"):
        net({"s": 0.5, "t": torch.tensor([0.5, -0.25])})
    with pytest.raises(ValueError, match=r"hyper keys \['s'\] are not \['s', 't'\]"):
        net({"s": 0.5})
    with pytest.raises(
        ValueError, match=r"hyper\['t'\] has shape \(3,\); expected \(2,\) or \(B, 2\)"
    ):
        net({"s": 0.5, "t": torch.zeros(3)})
    with pytest.raises(ValueError, match="disagree on the batch"):
        net({"s": torch.zeros(4), "t": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="pass a mapping"):
        net(0.5)
    with pytest.raises(ValueError, match="encoding='fourier' is not allowed"):
        HyperNet({"s": 1}, {"w": (2,)}, encoding="fourier")
    with pytest.raises(ValueError, match="which='head.*' matches no parameter of Sequential"):
        hypernetize(cnn(), "head.*", {"s": 1})
    model = hypernetize(cnn(), "4.*", {"s": 1})
    with pytest.raises(ValueError, match=r"hyper\['s'\]=2 is outside"):
        model(torch.randn(2, 1, 6, 6), hyper=2.0)


def test_state_dict_round_trip():
    a = hypernetize(cnn(), "*", {"s": 1}, hidden=[4])
    with torch.no_grad():
        a.hypernet.out.weight.normal_()
    b = hypernetize(cnn(), "*", {"s": 1}, hidden=[4])
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 1, 6, 6)
    a.eval()
    b.eval()
    close(a(x, hyper=0.25), b(x, hyper=0.25))


def test_tied_parameters_are_predicted_once_for_every_name():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    original = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(3, 4)
    want = original(x)
    model = hypernetize(original, "0.weight", {"s": 1}, hidden=[4])
    assert model.hypernet.outputs == {"0.weight": (4, 4)}
    assert original[2].weight is None  # both call sites now read the predicted tensor
    close(model(x, hyper=0.5), want)


def test_nan_hyper_inputs_are_refused():
    net = HyperNet({"s": 1, "t": 2}, {"w": (2,)}, hidden=[4])
    with pytest.raises(ValueError, match=r"hyper\['s'\]=nan is outside \[0, 1\]"):
        net({"s": float("nan"), "t": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"hyper\['t'\]=nan is outside \[0, 1\]"):
        net({"s": 0.5, "t": torch.tensor([[0.5, 0.5], [float("nan"), 0.1]])})
    raw = HyperNet({"s": 1}, {"w": (2,)}, hidden=[4], encoding="none", residual=False)
    assert raw(float("nan"))["w"].isnan().all()  # no range for raw inputs: NaN flows


def test_one_scalar_input_one_setting_versus_a_batch_of_one():
    net = HyperNet({"s": 1}, {"w": (3, 2), "b": (3,)}, hidden=[8], residual=False)
    one = net(0.3)
    assert one["w"].shape == (3, 2) and net(torch.tensor(0.3))["w"].shape == (3, 2)
    batch = net(torch.tensor([0.3]))  # a 1-D tensor is a batch, also of one
    assert batch["w"].shape == (1, 3, 2) and batch["b"].shape == (1, 3)
    close(batch["w"][0], one["w"])
    pair = HyperNet({"s": 2}, {"w": (3,)}, hidden=[8], residual=False)
    assert pair(torch.tensor([0.3, 0.6]))["w"].shape == (3,)  # (dim,): one setting
    assert pair(torch.tensor([[0.3, 0.6]]))["w"].shape == (1, 3)  # (1, dim): a batch of one


def test_layers_are_kaiming_normal_in_fan_in_mode_as_documented():
    net = HyperNet({"s": 64}, {"w": (512,)}, hidden=[512], residual=False)
    for layer, fan_in in ((net.mlp[0], 128), (net.out, 512)):
        gain = 2**0.5 if layer is net.mlp[0] else 1.0  # leaky_relu (slope 0) / linear
        std = layer.weight.std().item()
        assert abs(std / (gain / fan_in**0.5) - 1) < 0.05, (std, fan_in)
        assert layer.bias.abs().max() == 0
