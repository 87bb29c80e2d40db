"""The numbers of He et al. 2015 (arXiv:1512.03385) that resexp runs are compared against, each with
its source. Errors in %. CIFAR-10: test error of a net trained on all 50k images. ImageNet: top-1 (and
top-5) error on the validation set, 10-crop testing. The plain CIFAR nets have no numbers in the paper,
only the curves of Fig. 6."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PaperResult:
    error: float | None  # the paper's error, %; None: shown in a figure only
    source: str  # where it stands in the paper
    mean: float | None = None  # mean of several runs, where the paper gives one
    std: float | None = None  # and their standard deviation
    top5: float | None = None  # ImageNet top-5 error


FIG6_ONLY = "Fig. 6 only (no number)"

# Keyed by dataset and run name (see resexp.models.resnet.net_name).
RESULTS: dict[tuple[str, str], PaperResult] = {
    ("cifar10", "resnet20-A"): PaperResult(8.75, "Table 6"),
    ("cifar10", "resnet32-A"): PaperResult(7.51, "Table 6"),
    ("cifar10", "resnet44-A"): PaperResult(7.17, "Table 6"),
    ("cifar10", "resnet56-A"): PaperResult(6.97, "Table 6"),
    # "best (mean±std)" over 5 runs: 6.43 (6.61±0.16).
    ("cifar10", "resnet110-A"): PaperResult(6.43, "Table 6 (best of 5 runs)", mean=6.61, std=0.16),
    ("cifar10", "resnet1202-A"): PaperResult(7.93, "Table 6"),
    **{("cifar10", f"plain{depth}"): PaperResult(None, FIG6_ONLY) for depth in (20, 32, 44, 56, 110)},
    # He et al. 2016, "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027): pre-activation
    # units against the 2015 ones, with the same CIFAR-10 recipe (model=resnet110-preact, ...).
    ("cifar10", "resnet110-A-preact"): PaperResult(6.37, "He et al. 2016, Table 3"),
    ("cifar10", "resnet164-B-preact"): PaperResult(5.46, "He et al. 2016, Table 3"),
    ("cifar10", "resnet1001-B-preact"): PaperResult(4.92, "He et al. 2016, Table 3"),
    ("cifar10", "resnet164-B"): PaperResult(5.93, "He et al. 2016, Table 3 (2015 units)"),
    ("cifar10", "resnet1001-B"): PaperResult(7.61, "He et al. 2016, Table 3 (2015 units)"),
    # Their Table 1 (median of 5): ResNet-110 with Highway networks' exclusive gates (shortcut=gated), the
    # gates' bias starting at -6 (their best; 0 to -5 failed to train, above 20%) and at -7.
    ("cifar10", "resnet110-gated"): PaperResult(8.70, "He et al. 2016, Table 1 (exclusive gating)"),
    ("cifar10", "resnet110-gated-gatebias-7"): PaperResult(9.81, "He et al. 2016, Table 1 (exclusive gating)"),
    # Zagoruyko & Komodakis 2016, "Wide Residual Networks" (arXiv:1605.07146): median of 5 runs, mean/std
    # normalisation (their code's README and final version); their own recipe (conf/schedule/wrn.yaml).
    ("cifar10", "wrn28-10-B-preact"): PaperResult(4.00, "Zagoruyko & Komodakis 2016 (median of 5)"),
    ("cifar10", "wrn28-10-B-preact-dropout0.3"): PaperResult(3.89, "Zagoruyko & Komodakis 2016 (median of 5)"),
    # Xie et al. 2017, "Aggregated Residual Transformations" (arXiv:1611.05431), Table 7
    # pre-activated blocks at batch 256: what the table's CIFAR numbers came from (their code's README)
    ("cifar10", "resnext29-8x64d-B-preact"): PaperResult(3.65, "Xie et al. 2017, Table 7"),
    # Huang et al. 2017, "Densely Connected Convolutional Networks" (arXiv:1608.06993), Table 2, with
    # augmentation (C10+, C100+); their own recipe (conf/schedule/densenet.yaml).
    **{
        (data, name): PaperResult(error, "Huang et al. 2017, Table 2")
        for name, c10, c100 in (
            ("densenet40-12", 5.24, 24.42),
            ("densenet100-12", 4.10, 20.20),
            ("densenet100-24", 3.74, 19.25),
            ("densenet-bc100-12", 4.51, 22.27),
            ("densenet-bc250-24", 3.62, 17.60),
            ("densenet-bc190-40", 3.46, 17.18),
        )
        for data, error in (("cifar10", c10), ("cifar100", c100))
    },
    # CIFAR-100 (fine labels), which the 2015 paper does not report: He et al. 2016's Table 3, Wide ResNet's
    # README (median of 5) and ResNeXt's Table 7, each with its authors' recipe.
    ("cifar100", "resnet164-B"): PaperResult(25.16, "He et al. 2016, Table 3 (2015 units)"),
    ("cifar100", "resnet164-B-preact"): PaperResult(24.33, "He et al. 2016, Table 3"),
    ("cifar100", "resnet1001-B"): PaperResult(27.82, "He et al. 2016, Table 3 (2015 units)"),
    ("cifar100", "resnet1001-B-preact"): PaperResult(22.71, "He et al. 2016, Table 3"),
    ("cifar100", "wrn28-10-B-preact"): PaperResult(19.25, "Zagoruyko & Komodakis 2016 (median of 5)"),
    ("cifar100", "wrn28-10-B-preact-dropout0.3"): PaperResult(18.85, "Zagoruyko & Komodakis 2016 (median of 5)"),
    ("cifar100", "resnext29-8x64d-B-preact"): PaperResult(17.77, "Xie et al. 2017, Table 7"),
    ("imagenet", "plain18"): PaperResult(27.94, "Table 2"),
    ("imagenet", "plain34"): PaperResult(28.54, "Table 2"),
    ("imagenet", "resnet18-A"): PaperResult(27.88, "Table 2"),
    ("imagenet", "resnet34-A"): PaperResult(25.03, "Tables 2 and 3", top5=7.76),
    ("imagenet", "resnet34-B"): PaperResult(24.52, "Table 3", top5=7.46),
    ("imagenet", "resnet34-C"): PaperResult(24.19, "Table 3", top5=7.40),
    ("imagenet", "resnet50-B"): PaperResult(22.85, "Table 3", top5=6.71),
    ("imagenet", "resnet101-B"): PaperResult(21.75, "Table 3", top5=6.05),
    ("imagenet", "resnet152-B"): PaperResult(21.43, "Table 3", top5=5.71),
}


# Packed ImageNet is the paper's ImageNet experiment on smaller images (resexp/data/packed.py): its rows
# show the paper's numbers, marked as trained otherwise (recipe_differences), never compared silently.
RESIZED = {"imagenet_packed": "imagenet"}


def lookup(dataset: str | None, net: str) -> PaperResult | None:
    """The paper's result for this net on this dataset; None where the paper has no such run."""
    return RESULTS.get((RESIZED.get(dataset or "", dataset or ""), net))


# The paper's recipe on each dataset (§4.2, §3.4): iterations, batch size, base learning rate. A run
# trained otherwise is marked in a report, not compared silently.
RECIPES = {"cifar10": (64_000, 128, 0.1), "cifar100": (64_000, 128, 0.1), "imagenet": (600_000, 256, 0.1)}
# The relatives' own CIFAR recipes, by the family their names begin with (resexp.models.resnet.net_name):
# Wide ResNet's 200 epochs of 50k images at batch 128, ResNeXt's 300 at batch 256 (the batch of its paper's
# CIFAR numbers, their README says), DenseNet's 300 at batch 64
# (conf/schedule/wrn.yaml, resnext.yaml, densenet.yaml).
OWN_RECIPES = {"wrn": (78_125, 128, 0.1), "resnext": (58_594, 256, 0.1), "densenet": (234_375, 64, 0.1)}
# Their CIFAR preprocessing (conf/preprocess/): centring, and the crops' padding. The 2015 paper's is the
# per-pixel mean and zeros; fb.resnet.torch's, which DenseNet's and ResNeXt's code use, per-channel mean and
# std; Wide ResNet's code also pads by reflection.
OWN_PREPROCESSING = {"wrn": ("meanstd", "reflect"), "resnext": ("meanstd", "zeros"), "densenet": ("meanstd", "zeros")}
PAPER_PREPROCESSING = ("mean", "zeros")
DATA_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "imagenet": "ImageNet",
    "imagenet_packed": "ImageNet",  # its figure says how it was packed (recipe_differences)
    "imagenette": "Imagenette (10 ImageNet classes)",
    "synthetic": "random images (data=synthetic)",
}


def recipe_differences(
    dataset: str | None,
    net: str,
    iterations: int | None,
    batch_size: int | None,
    lr: float | None,
    size: int | None = None,
    preprocess: tuple[str, str] | None = None,
) -> list[str]:
    """How a run's recipe differs from the one its number was trained with: the authors' own for a net
    that has one (Wide ResNet, ResNeXt, DenseNet), else the paper's on its dataset ([] where they agree);
    a packed run's squares of `size` pixels, against the paper's full images."""
    paper_data = RESIZED.get(dataset or "", dataset)
    if paper_data not in RECIPES:
        return ["other data"]
    family = re.match(r"[a-z]*", net)[0]
    paper_iterations, paper_batch, paper_lr = OWN_RECIPES.get(family, RECIPES[paper_data])
    differences = []
    if dataset in RESIZED:
        differences.append(f"packed {size or '?'}x{size or '?'} squares (paper: 224 crops of full images)")
    if iterations is not None and iterations != paper_iterations:
        differences.append(f"{iterations:,} iterations (paper {paper_iterations:,})")
    if batch_size is not None and batch_size != paper_batch:
        differences.append(f"batch {batch_size} (paper {paper_batch})")
    if lr is not None and lr != paper_lr:
        differences.append(f"lr {lr:g} (paper {paper_lr:g})")
    theirs = OWN_PREPROCESSING.get(family, PAPER_PREPROCESSING)
    if preprocess is not None and paper_data != "imagenet" and tuple(preprocess) != theirs:
        differences.append(f"preprocess {'/'.join(preprocess)} (paper {'/'.join(theirs)})")
    return differences
