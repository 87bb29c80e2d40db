"""Each relative's CIFAR preprocessing as its authors' code does it (conf/preprocess/): the 2015 paper's
per-pixel mean and zero padding, fb.resnet.torch's per-channel mean and std (DenseNet, ResNeXt), and
Wide ResNet's reflection padding; the presets choose theirs, and a report tells a run trained otherwise."""

import pytest
import torch
import torch.nn.functional as F
from helpers import RUN, assert_one_line_error, compose_config, resexp

from resexp.data.loaders import PAD, Preprocessing, augment, statistics, tensor_data
from resexp.paper import recipe_differences


def images(count: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_meanstd_centres_and_scales_each_channel_by_the_training_images_statistics():
    train, test = images(), images(16)
    data = tensor_data(train, torch.zeros(64, dtype=torch.long), test, torch.zeros(16, dtype=torch.long), val_size=0,
                       batch_size=8, eval_batch_size=16, seed=0, device=torch.device("cpu"),
                       preprocessing=Preprocessing("meanstd", "zeros"))  # fmt: skip
    pixels = train.double().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = statistics(train, "meanstd")
    assert torch.allclose(mean.flatten().double(), pixels.mean(1), atol=1e-6)
    assert torch.allclose(std.flatten().double(), pixels.std(1), atol=1e-6)
    x, _ = next(iter(data.evals["test"]))
    expected = (test.double() / 255 - pixels.mean(1)[:, None, None]) / pixels.std(1)[:, None, None]
    assert torch.allclose(x.double(), expected, atol=1e-5)
    whole = data.train.images.double().div(255).sub(mean.double()).div(std.double())
    assert whole.mean((0, 2, 3)).abs().max() < 1e-5 and (whole.std((0, 2, 3)) - 1).abs().max() < 1e-5


def test_reflection_padding_crops_from_the_mirrored_border_with_the_same_draws():
    x = torch.randn(32, 3, 32, 32, dtype=torch.float64)
    zeros = augment(x, torch.Generator().manual_seed(5))
    reflected = augment(x, torch.Generator().manual_seed(5), pad="reflect")
    padded = F.pad(x, (PAD,) * 4, mode="reflect")
    # the same windows (one draw each): where a window reads the padding, zeros there and mirrored pixels here
    inside = zeros != 0
    assert torch.equal(zeros[inside], reflected[inside]) and (zeros == 0).sum() > 0
    views = [(dy, dx, flip) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1) for flip in (False, True)]
    for image, source in zip(reflected, padded):
        windows = [source[:, dy : dy + 32, dx : dx + 32] for dy, dx, _ in views]
        assert any(torch.equal(image, w.flip(-1) if flip else w) for w, (_, _, flip) in zip(windows, views))


@pytest.mark.parametrize(
    ("model", "expected"),
    [("resnet110", ("mean", "zeros")), ("resnet164-preact", ("mean", "zeros")), ("wrn28-10", ("meanstd", "reflect")),
     ("densenet-bc100-12", ("meanstd", "zeros")), ("resnext29-8x64d", ("meanstd", "zeros"))],
)  # fmt: skip
def test_each_preset_trains_with_its_authors_preprocessing(model, expected):
    cfg = compose_config(f"model={model}")
    assert (cfg.preprocess.normalize, cfg.preprocess.pad) == expected


def test_a_report_marks_a_relative_trained_with_another_preprocessing():
    wrn = ("wrn28-10-B-preact", 78_125, 128, 0.1)
    assert recipe_differences("cifar10", *wrn, preprocess=("meanstd", "reflect")) == []
    assert recipe_differences("cifar10", *wrn, preprocess=("mean", "zeros")) == [
        "preprocess mean/zeros (paper meanstd/reflect)"
    ]
    assert recipe_differences("cifar10", "resnet110-A", 64_000, 128, 0.1, preprocess=("meanstd", "zeros")) == [
        "preprocess meanstd/zeros (paper mean/zeros)"
    ]


def test_a_run_trains_with_the_chosen_preprocessing_and_imagenet_refuses_another(tmp_path):
    result = resexp("train", *RUN, "preprocess=wrn", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    refused = resexp("train", "model=resnet18", "preprocess=wrn", f"hydra.run.dir={tmp_path / 'in'}", cwd=tmp_path)
    assert_one_line_error(refused, "preprocess.normalize=meanstd", "use preprocess=paper")
