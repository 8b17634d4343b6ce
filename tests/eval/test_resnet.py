"""ResNet-50 feature network: numeric parity with a PyTorch ResNet-50 built here with torchvision's
module names (torchvision itself is not importable in this environment), and state_dict loading."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from ctgen.errors import UserError  # noqa: E402
from ctgen.convert.resnet import load_resnet50, resnet_from_state_dict  # noqa: E402
from ctgen.models.resnet import ResNetConfig, feature_fn  # noqa: E402


class TorchBottleneck(nn.Module):
    def __init__(self, c_in, width, stride, keras):
        super().__init__()
        s1, s2 = (stride, 1) if keras else (1, stride)
        eps = 1.001e-5 if keras else 1e-5
        self.conv1 = nn.Conv2d(c_in, width, 1, s1, bias=keras)
        self.bn1 = nn.BatchNorm2d(width, eps=eps)
        self.conv2 = nn.Conv2d(width, width, 3, s2, padding=1, bias=keras)
        self.bn2 = nn.BatchNorm2d(width, eps=eps)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=keras)
        self.bn3 = nn.BatchNorm2d(width * 4, eps=eps)
        self.downsample = None
        if stride != 1 or c_in != width * 4:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, width * 4, 1, stride, bias=keras),
                                            nn.BatchNorm2d(width * 4, eps=eps))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet50(nn.Module):
    """torchvision's resnet50 (keras=False) or the RadImageNet release (keras=True), plus an fc head;
    `blocks` per stage (ResNet-50: 3, 4, 6, 3)."""

    def __init__(self, keras=False, blocks=(3, 4, 6, 3)):
        super().__init__()
        eps = 1.001e-5 if keras else 1e-5
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=keras)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        c_in = 64
        for (name, width, stride), n in zip((("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 2),
                                             ("layer4", 512, 2)), blocks):
            blocks = []
            for i in range(n):
                blocks.append(TorchBottleneck(c_in, width, stride if i == 0 else 1, keras))
                c_in = width * 4
            setattr(self, name, nn.Sequential(*blocks))
        self.fc = nn.Linear(2048, 10)

    def features(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def _random_model(keras, seed=0, blocks=(3, 4, 6, 3)):
    torch.manual_seed(seed)
    model = TorchResNet50(keras, blocks).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a swapped mean/var would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


# The full ResNet-50 in torchvision's variant; RadImageNet's variant (conv biases, stride on the first
# 1x1 convolution, eps 1.001e-5) with one block per stage, which exercises every difference faster.
@pytest.mark.parametrize("keras,blocks", [(False, (3, 4, 6, 3)), (True, (1, 1, 1, 1))],
                         ids=["torchvision-resnet50", "radimagenet-variant"])
def test_parity_with_torch(keras, blocks):
    model = _random_model(keras, blocks=blocks)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = model.features(torch.from_numpy(x)).numpy()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    ours = resnet_from_state_dict(sd)
    assert (ours.cfg.conv_bias, ours.cfg.stride_first, ours.cfg.blocks) == (keras, keras, blocks)
    got = np.asarray(feature_fn(ours)(x.transpose(0, 2, 3, 1)))
    assert got.shape == (2, 2048)
    assert np.abs(want).max() > 0.1  # a meaningful comparison, not two zero vectors
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_loads_challenge_layout_file(tmp_path):
    """`.pt` file with nn.Sequential(*children) numbering and a `backbone.` prefix, as the challenge's
    ResNet50.pt; the conv kernels must land where torchvision's names put them."""
    model = _random_model(False, seed=3, blocks=(1, 2, 3, 1))
    rename = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    sd = {"backbone." + rename[k.split(".")[0]] + k[len(k.split(".")[0]):]: v
          for k, v in model.state_dict().items() if not k.startswith("fc.")}
    path = str(tmp_path / "ResNet50.pt")
    torch.save(sd, path)
    ours = load_resnet50(path)
    assert ours.cfg.blocks == (1, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours.layer3[2].conv2.kernel[...]),
                               model.layer3[2].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_allclose(np.asarray(ours.bn1.var[...]), model.bn1.running_var.numpy())


def test_rejects_other_networks(tmp_path):
    with pytest.raises(UserError, match="not a ResNet state_dict"):
        resnet_from_state_dict({"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)})
    sd = {k: v.numpy() for k, v in _random_model(False, blocks=(1, 1, 1, 2)).state_dict().items()
          if not k.startswith("layer4.1.")}
    with pytest.raises(UserError, match="missing keys"):
        resnet_from_state_dict(sd, cfg=ResNetConfig(blocks=(1, 1, 1, 2)))
