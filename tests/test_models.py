from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.errors import UserError
from toolkit.models import BUILTIN_MODELS, load_model, split

LENET_NAMES = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2", "relu4", "fc3"]


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_device_then_server_equals_whole_model_at_every_cut(name: str) -> None:
    model = load_model(name, seed=1)
    model.net.eval()
    x = torch.randn(3, *model.input_shape)
    with torch.no_grad():
        whole = model.net(x)
        for cut in model.candidate_cuts():
            device, server = split(model, cut)
            assert len(device) == cut and len(server) == model.num_layers - cut
            assert torch.equal(server(device(x)), whole), f"cut {cut}"


def test_lenet_layer_names_and_shapes() -> None:
    model = load_model("lenet5")
    assert model.layer_names == LENET_NAMES
    device, _ = split(model, "pool2")
    assert device(torch.zeros(2, 1, 28, 28)).shape == (2, 16, 5, 5)


def test_mobilenet_cuts_only_between_blocks() -> None:
    model = load_model("mobilenetv2")
    assert model.layer_names[:3] == ["stem", "block1", "block2"]
    assert sum(name.startswith("block") for name in model.layer_names) == 17


def test_cuts_by_name_and_index_agree() -> None:
    model = load_model("lenet5")
    assert model.cut_index("pool2") == model.cut_index(6) == model.cut_index("6") == 6
    assert model.cut_name(6) == "pool2"


@pytest.mark.parametrize("cut", [0, 12, -1, "fc3", "nope", "99"])
def test_a_cut_that_does_not_exist_is_refused(cut: object) -> None:
    with pytest.raises(UserError, match=r"does not exist|leaves nothing"):
        load_model("lenet5").cut_index(cut)


def test_unknown_model_lists_the_built_in_ones() -> None:
    with pytest.raises(UserError, match=r"unknown model 'resnet'.*lenet5"):
        load_model("resnet")


def test_input_shape_that_does_not_fit_is_one_clear_error() -> None:
    with pytest.raises(UserError, match=r"does not accept input shape 1,4,4|cannot be built"):
        load_model("lenet5", input_shape=(1, 4, 4))


def test_builtin_adapts_to_input_shape() -> None:
    model = load_model("lenet5", input_shape=(3, 32, 32), num_classes=7)
    assert model.net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_seed_makes_initial_weights_reproducible() -> None:
    first, second = load_model("vgg", seed=3), load_model("vgg", seed=3)
    for a, b in zip(first.net.parameters(), second.net.parameters(), strict=True):
        assert torch.equal(a, b)


USER_MODEL = """
from torch import nn

def small(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], 32),
                         nn.ReLU(), nn.Linear(32, num_classes))

def named():
    return [("enc", nn.Linear(4, 3)), ("act", nn.Tanh()), ("head", nn.Linear(3, 2))]

def broken(input_shape):
    raise ValueError("no weights for you")

def not_a_model():
    return 42
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(USER_MODEL)
    return path


def test_user_model_from_file_gets_readable_layer_names(user_file) -> None:
    model = load_model(f"{user_file}:small", input_shape=(1, 8, 8), num_classes=5)
    assert model.layer_names == ["flatten0", "linear1", "relu2", "linear3"]
    assert model.net(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    assert model.cut_index("relu2") == 3


def test_user_model_as_named_list(user_file) -> None:
    model = load_model(f"{user_file}:named", input_shape=(4,))
    assert model.layer_names == ["enc", "act", "head"]


def test_user_model_from_module_path(user_file, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(user_file.parent))
    model = load_model("my_models:small", input_shape=(1, 4, 4))
    assert isinstance(model.net, nn.Sequential)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("broken", "raised ValueError: no weights for you"),
        ("not_a_model", "expected an nn.Sequential"),
        ("missing", "has no function 'missing'"),
    ],
)
def test_user_model_errors_are_one_line(user_file, function: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        load_model(f"{user_file}:{function}", input_shape=(1, 4, 4))
    assert "\n" not in str(info.value)


def test_user_model_needs_an_input_shape(user_file) -> None:
    with pytest.raises(UserError, match="--input-shape"):
        load_model(f"{user_file}:small")


def test_fingerprint_tells_architectures_apart() -> None:
    assert load_model("lenet5").fingerprint() == load_model("lenet5", seed=9).fingerprint()
    assert load_model("lenet5").fingerprint() != load_model("lenet5", num_classes=5).fingerprint()


def test_resnet8_cuts_only_between_blocks_and_its_activations_shrink_towards_the_head() -> None:
    model = load_model("resnet8", seed=0)
    assert model.layer_names == ["stem", "block1", "block2", "block3", "pool", "flatten", "fc"]
    x = torch.zeros(2, 1, 28, 28)
    sizes = [split(model, cut)[0](x)[0].numel() for cut in ("block1", "block2", "block3", "pool")]
    assert sizes == [8 * 28 * 28, 16 * 14 * 14, 32 * 7 * 7, 32]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.net.modules())  # no running statistics to average
    assert sum(p.numel() for p in model.net.parameters()) < 25_000


def test_the_fedavg_cnn_has_the_papers_weights_and_a_small_device_side_at_pool2() -> None:
    model = load_model("fedavg-cnn", seed=0)
    assert sum(p.numel() for p in model.net.parameters()) == 1_663_370  # McMahan et al. 2017, section 3
    device, _ = split(model, "pool2")
    assert device(torch.zeros(2, 1, 28, 28)).shape == (2, 64, 7, 7)
    assert sum(p.numel() for p in device.parameters()) == 52_096
