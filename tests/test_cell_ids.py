"""Cell ids never change: every preset's cells keep the ids their results are filed under
(docs/design.md, Cells), whatever is reorganized around the methods and the grid reader."""

from __future__ import annotations

import hashlib

import pytest

from benchmark.execution import grids

#: sha256 of the preset's sorted cell ids (fixed cells and tuned finals) joined by newlines, with the
#: number of cells. Computed on main at bbe80ca, before the method interface was regrouped, with
#: ``preset_digest(name)`` below. A preset edited on purpose (cells added or changed) updates its line.
PINNED = {
    "cifar": ("e50897cb250f229793eb039351d5fcd3bfd9685e5c33d2ed9bd5733c1648c668", 2106),
    "dwf-study": ("821c22238a5809feaafaad48dcbed1e64c51c2dc0766cc034e2558cc0940cc43", 22),
    # full, lenet and lenet-reference: LeNet-5 DWF D=4 got the 3 lambdas `match` proposed (2026-12-06; before:
    # 7f595c35..., 6,816; d633bd29..., 4,710; 623bc51f..., 1,546), then D=2 and D=3 two each (before:
    # ea486595..., 6,843; 18256e7d..., 4,737; 8a5492de..., 1,555), then one each for DWF and L1 (before:
    # 084ca178..., 6,879; dd9c3d3e..., 4,773; 3aede8a8..., 1,567), then D=3 and L1 one each (before:
    # e5b303fe..., 6,915; afe538a0..., 4,809; 9bbc0576..., 1,579), then again (before: 051ba283..., 6,933;
    # a19e8298..., 4,827; 02d51e07..., 1,585; 000b4c62..., 6,951; 374f0614..., 4,845; c5f6ed1f..., 1,591;
    # 0702b4b2..., 6,960; c737f53d..., 4,854; 7bf047b3..., 1,594), then from seed 2 D=2 and D=3 one each
    # (before: 52d6e7a9..., 6,969; 713da8cd..., 4,863; 6a314f8b..., 1,597), then L1 one (before: 1267d6a5...,
    # 6,987; a5f8a4a1..., 4,881; 343a6729..., 1,603), then D=2 one for CR 1000 (before: 06e1d856..., 6,996;
    # ce69febb..., 4,890; 15e875ca..., 1,606) and another (before: 1a0efbd9..., 7,005; 1918a637..., 4,899;
    # a57601a5..., 1,609) and another (before: b4d944ee..., 7,014; 8f74b6d1..., 4,908; 08611c0e..., 1,612),
    # then L1 one (before: 931f0239..., 7,023; e4527b56..., 4,917; 2bca6be6..., 1,615) and another (before:
    # 84e40abb..., 7,032; 3a99ffc8..., 4,926; 598e7565..., 1,618)
    "full": ("051959ec3c3ae64aad4ef258917a74a6ef9183e47c3264f3fc395e2a602b1342", 7041),
    "lenet": ("cc65b016be2a04008903527be04eb5c844630f680b7e43e849ea396e6ebc9917", 4935),
    "lenet-calibration": ("731768f53f5d357d7f00e567d93f9475b4478a16fdaab1e4c7edb58bc1a5e0c8", 184),
    "lenet-recipes": ("14d0774520ffcd819cb37c2d680ea198b77dbb29938ebb53f2a72de3cfd27cad", 29),
    "lenet-reference": ("0938589b79a9ea398e762c91fa00473dfb1746f31c2022b5423f91bb85902edd", 1621),
    # the first protocol: lenet-reference's cells as they were until its tune tables (LeNet-300-100's
    # 483 until 2026-12-04: f728ee18...; LeNet-5's 513 added when LeNet-5 got its table)
    "lenet-reference-v1": ("0bd048e4147ad282af0e35082d826507564f4c3b0e342beb80bd0f4e16653521", 996),
    # LeNet-5 with 0.0015625, 0.003125 and 0.00625 among its candidates since 2026-12-06 (before:
    # 7c2f17ba..., 1,184 cells; down to 0.00625: 30051926..., 1,255; down to 0.003125: cccf16f0..., 1,326)
    "lenet-reference-tuning": ("0ba2678d1b4e2bfb765b2a39a7f2bad8562521be6c1769ce1bf2aef03f157c0d", 1397),
    # the tuned protocol's cells since 2026-12-05 (before: lenet-reference-v1's, d094b786...)
    "quick": ("7901a19455cf70d07df7bd3451f122ec3b5e59098c9156cde4ff1d0631c0f76a", 32),
    "smoke": ("c55002424e852df1e321e48ec68f2f6e5a19b1b3c088c25ca8b5f60186b07c5e", 17),
}


def preset_digest(name: str) -> tuple[str, int]:
    grid = grids.load_grid(name)
    ids = sorted(cell.id for cell in grid.cells + grid.final_templates())
    return hashlib.sha256("\n".join(ids).encode()).hexdigest(), len(ids)


def test_every_preset_is_pinned():
    assert sorted(PINNED) == grids.preset_names()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_preset_cell_ids_are_pinned(name):
    assert preset_digest(name) == PINNED[name]
