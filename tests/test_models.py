"""Model zoo: known parameter counts, shapes from the dataset, and one real training step each."""

import pytest
import torch

from benchmark.engine import models

# Parameter counts worked out from the architectures (LeNet-300-100's is the classic 266,610). VGG convs
# have no bias (BatchNorm follows), e.g. VGG-16: conv weights 14,710,464 + BN 8,448 + linear 5,130.
KNOWN_COUNTS = {
    ("lenet300", (1, 28, 28), 10): 266_610,
    ("lenet5", (1, 28, 28), 10): 61_706,
    ("vgg16", (3, 32, 32), 10): 14_724_042,
    ("vgg19", (3, 32, 32), 100): 20_081_188,
    ("resnet18", (3, 32, 32), 10): 11_173_962,
}


@pytest.mark.parametrize("arch,shape,classes", list(KNOWN_COUNTS))
def test_parameter_counts(arch, shape, classes):
    model = models.build(arch, shape, classes)
    assert sum(p.numel() for p in model.parameters()) == KNOWN_COUNTS[(arch, shape, classes)]


@pytest.mark.parametrize("arch,shape,classes", [
    ("lenet300", (1, 28, 28), 10), ("lenet5", (1, 28, 28), 10), ("vgg16", (3, 32, 32), 10),
    ("vgg19", (3, 32, 32), 100), ("resnet18", (3, 32, 32), 10), ("resnet18", (3, 64, 64), 200),
])
def test_forward_and_one_training_step(arch, shape, classes):
    torch.manual_seed(0)
    model = models.build(arch, shape, classes, seed=0)
    x, y = torch.randn(4, *shape), torch.randint(0, classes, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    assert out.shape == (4, classes)
    torch.nn.functional.cross_entropy(out, y).backward()
    opt.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed == len(before)


def test_seeded_build_is_reproducible_and_isolated():
    a = models.build("lenet300", (1, 28, 28), 10, seed=3)
    state = torch.random.get_rng_state()
    b = models.build("lenet300", (1, 28, 28), 10, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = models.build("lenet300", (1, 28, 28), 10, seed=4)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_unknown_architecture_lists_choices():
    with pytest.raises(ValueError, match="lenet300"):
        models.build("alexnet", (1, 28, 28), 10)


def _textbook_lenet5_forward(model, x):
    """LeNet-5 with ReLU before each max-pool, as the architecture is usually written."""
    x = model.pool(torch.relu(model.conv1(x)))
    x = model.pool(torch.relu(model.conv2(x)))
    x = torch.relu(model.fc1(x.flatten(1)))
    return model.fc3(torch.relu(model.fc2(x)))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_lenet5_pooling_before_relu_gives_the_same_bits(layout):
    """LeNet-5 pools before its ReLU (faster); outputs, every gradient and a few SGD steps must equal
    the textbook order's bits. A zero image border makes conv1's outputs tie at the bias value there,
    and small inputs leave whole pooling windows negative: the cases where the orders could differ."""
    model = models.build("lenet5", (1, 28, 28), 10, seed=0).to(memory_format=layout)
    textbook = models.build("lenet5", (1, 28, 28), 10, seed=0).to(memory_format=layout)
    with torch.no_grad():
        textbook.conv1.bias.fill_(0.05)
        model.conv1.bias.fill_(0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(32, 1, 28, 28)
    x[:, :, 4:-4, 4:-4] = torch.rand(32, 1, 20, 20, generator=g) - 0.3
    x = x.to(memory_format=layout)
    y = torch.randint(0, 10, (32,), generator=g)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, textbook)]
    for _ in range(3):
        outs = []
        for net, forward, opt in ((model, model, opts[0]), (textbook, lambda x: _textbook_lenet5_forward(textbook, x), opts[1])):
            opt.zero_grad()
            out = forward(x)
            torch.nn.functional.cross_entropy(out, y).backward()
            outs.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
            opt.step()
        assert torch.equal(outs[0][0], outs[1][0])
        assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), textbook.parameters()))
