"""The split-learning arithmetic against centralized training, without a broker."""

from __future__ import annotations

import copy

import torch
from torch import nn

from toolkit.training import server_step, weighted_average


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def test_one_cluster_step_equals_centralized_step_on_the_pooled_batch() -> None:
    """Each member steps on its own batch's gradient; averaged by batch size, the device side
    moves exactly as the device layers of a centralized step on the pooled batch would."""
    cut, lr = 2, 0.1
    full = _model()
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)) for n in (4, 7, 2)
    ]

    reference = copy.deepcopy(full)
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    optimizer.zero_grad()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    nn.CrossEntropyLoss()(reference(x), y).backward()
    optimizer.step()

    server_part = copy.deepcopy(full[cut:])
    devices = [copy.deepcopy(full[:cut]) for _ in batches]
    smashed = [device(b[0]) for device, b in zip(devices, batches, strict=True)]
    grads, _ = server_step(
        server_part,
        torch.optim.SGD(server_part.parameters(), lr=lr),
        [s.detach() for s in smashed],
        [b[1] for b in batches],
        nn.CrossEntropyLoss(),
    )
    for device, out, grad in zip(devices, smashed, grads, strict=True):
        device_optimizer = torch.optim.SGD(device.parameters(), lr=lr)
        device_optimizer.zero_grad()
        out.backward(grad)
        device_optimizer.step()
    averaged = weighted_average([d.state_dict() for d in devices], [len(b[0]) for b in batches])

    expected = reference.state_dict()
    for key, value in averaged.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
    for key, value in server_part.state_dict().items():  # a slice of a Sequential keeps its layer numbers
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)


def test_a_lone_device_gets_the_plain_gradient() -> None:
    """With one device the pooled batch is its batch: the returned gradient is the slice itself."""
    full = _model()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    inputs = full[:2](x).detach().requires_grad_(True)
    nn.CrossEntropyLoss()(copy.deepcopy(full[2:])(inputs), y).backward()
    grads, _ = server_step(
        full[2:], torch.optim.SGD(full[2:].parameters(), lr=0.1), [inputs.detach()], [y], nn.CrossEntropyLoss()
    )
    torch.testing.assert_close(grads[0], inputs.grad, rtol=0, atol=0)


def test_a_stream_put_anywhere_draws_what_an_uninterrupted_one_would() -> None:
    """seek forwards (across whole epochs), backwards and to where it is: the same batches."""
    import numpy as np

    from toolkit.training import BatchStream

    indices = np.arange(37)
    reference = BatchStream(indices, 5, seed=7)
    batches = [reference.next() for _ in range(60)]  # 8 batches an epoch: 7 epochs and a half
    for position in (0, 3, 8, 17, 40, 59, 24, 24):
        stream = BatchStream(indices, 5, seed=7)
        stream.seek(31)
        stream.seek(position)
        assert stream.drawn == position
        assert all(np.array_equal(stream.next(), batches[i]) for i in range(position, 60))
