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
