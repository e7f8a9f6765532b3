"""``perf data``: one LeNet-300-100 / Fashion-MNIST epoch through ``benchmark.engine.train.train``
(tensor-resident batches) against the loop a torchvision tutorial would write with a ``DataLoader``.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmark.engine import data as data_mod
from benchmark.engine import models
from benchmark.engine.timing import interleave, paired_ratio
from benchmark.engine.schedule import default_schedule
from benchmark.engine.train import make_optimizer, train
from benchmark.speed.perf.rows import Row, judge, make_row

DATA_TARGET = 8.0  # ours at least this many times faster than the DataLoader loop (CPU)
QUICK_LIMIT = 2000  # --quick: examples per Fashion-MNIST split


def torchvision_copy(source: Path, root: Path) -> Path:
    """torchvision's FashionMNIST reads uncompressed files under ROOT/FashionMNIST/raw/ and would
    try to download otherwise; lay out such a copy of the files our loader found (gunzipped)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in (stem for pair in data_mod.IDX_FILES.values() for stem in pair):
        if (source / stem).is_file():
            shutil.copyfile(source / stem, raw / stem)
        else:
            with gzip.open(source / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return root


def plain_epoch(model: nn.Module, train_loader, test_loader, optimizer, device: torch.device) -> float:
    """The loop a torchvision tutorial would write: per-sample transforms, collated batches, a test
    pass; returns the test accuracy so the work cannot be skipped."""
    model.train()
    running = 0.0
    for x, y in train_loader:
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item() * len(y)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
    return correct / max(1, len(test_loader.dataset))


def bench_data(device: torch.device, rounds: int, quick: bool) -> list[Row]:
    import torchvision
    from torchvision import transforms

    limit = QUICK_LIMIT if quick else None
    began = time.perf_counter()
    data = data_mod.load("fashion-mnist", device=device, limit=limit)
    ours_setup = time.perf_counter() - began
    spec = data.spec
    schedule = default_schedule("lenet300").replace(epochs=1)
    batch = schedule.batch_size
    with tempfile.TemporaryDirectory(prefix="perf-data-") as tmp:
        root = torchvision_copy(data.source, Path(tmp))
        began = time.perf_counter()
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
        tv_train = torchvision.datasets.FashionMNIST(str(root), train=True, transform=transform, download=False)
        tv_test = torchvision.datasets.FashionMNIST(str(root), train=False, transform=transform, download=False)
        if limit:
            tv_train = torch.utils.data.Subset(tv_train, range(min(limit, len(tv_train))))
            tv_test = torch.utils.data.Subset(tv_test, range(min(limit, len(tv_test))))
        tv_setup = time.perf_counter() - began

        def new_model() -> nn.Module:
            return models.build("lenet300", spec.shape, spec.num_classes, seed=0).to(device)

        def ours():
            train(new_model(), data, schedule, seed=0, progress=False)

        def plain():
            model = new_model()
            loader = torch.utils.data.DataLoader(tv_train, batch_size=batch, shuffle=True, num_workers=0)
            test_loader = torch.utils.data.DataLoader(tv_test, batch_size=1000, shuffle=False, num_workers=0)
            plain_epoch(model, loader, test_loader, make_optimizer(model, schedule), device)

        seconds = interleave({"plain": plain, "ours": ours}, rounds, device)
    case = f"lenet300/fashion-mnist, {len(data.train)} train + {len(data.test)} test, batch {batch}"
    speedup = paired_ratio(seconds["plain"], seconds["ours"])
    target, met = judge(speedup, None if quick else DATA_TARGET, True, device)
    common = {"device": str(device), "threads": torch.get_num_threads()}
    return [
        make_row("data", case, "torchvision DataLoader (ToTensor+Normalize, shuffle, num_workers=0)", "s/epoch",
             seconds["plain"], ratio=1.0, ratio_of="DataLoader / this", note=f"dataset setup {tv_setup:.2f} s", **common),
        make_row("data", case, "ours (benchmark.engine.train.train, tensor-resident)", "s/epoch", seconds["ours"],
             ratio=speedup, ratio_of="DataLoader / this", target=target, met=met,
             note=f"load + normalize once {ours_setup:.2f} s; epoch includes the test pass on both sides", **common),
    ]
