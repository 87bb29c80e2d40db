"""data.decode=gpu (issue 36): the workers read bytes and draw crops, the training process decodes and crops on
its device. On the CPU the same code runs with decode_jpeg on the CPU, and must give the CPU path's batches
bit for bit (one decoder, one resampler); on a GPU within the decoders' rounding (tests/test_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import decode_image
from torchvision.transforms import v2

from resexp.data import imagenet
from resexp.data.crops import apply_crop, draw_crop
from resexp.data.decode import FolderFiles, device_jpeg_size, read_image
from resexp.errors import ResexpError

SCALE, CROP = (40, 72), 32  # the paper's 256-480 and 224, shrunk as the other ImageNet tests shrink them


def sample_files(imagenet_sample: Path, count: int) -> list[Path]:
    return sorted(imagenet_sample.glob("val/*/*"))[:count]


def test_the_crop_drawn_is_torchvisions_random_resize_crop_and_flip(imagenet_sample):
    """resexp.data.crops.draw_crop draws from the image's seed what torchvision's v2 transforms drew (the
    CPU path before the device path existed), and apply_crop makes the same pixels."""
    theirs = v2.Compose([v2.RandomResize(256, 481), v2.RandomCrop(224), v2.RandomHorizontalFlip()])
    images = [read_image(str(path)) for path in sample_files(imagenet_sample, 6)]
    images += [
        torch.randint(0, 256, (3, 300, 257), dtype=torch.uint8),
        torch.randint(0, 256, (3, 257, 300), dtype=torch.uint8),
    ]
    for image in images:
        for seed in range(4):
            torch.manual_seed(seed)
            expected = theirs(image)
            torch.manual_seed(seed)
            drawn = draw_crop(*image.shape[-2:], (256, 480), 224)
            assert torch.equal(apply_crop(image, drawn, 224), expected), (image.shape, seed, drawn)


def load(root: Path, decode: str, **changes):
    args = dict(root=str(root), num_classes=104, scale=list(SCALE), crop=CROP, test_size=40, lighting_std=0.1,
                mean=[0.485, 0.456, 0.406], workers=0, eval_batch_size=12, batch_size=12, seed=3,
                device=torch.device("cpu"), decode=decode)  # fmt: skip
    return imagenet(**{**args, **changes})


def test_the_workers_send_a_baseline_jpegs_bytes_and_decode_the_files_the_gpu_does_not_take(imagenet_odd):
    root = imagenet_odd
    folder = sorted((root / "train").iterdir())[0]
    files = FolderFiles(torchvision_folder(root / "train"), SCALE, CROP)
    by_name = {Path(path).name: index for index, (path, _) in enumerate(files.samples)}
    payload, _, drawn, _ = files[by_name[sorted(p.name for p in folder.iterdir() if p.stem.startswith("n"))[0]], 5]
    assert payload.dim() == 1 and payload.dtype == torch.uint8  # the file's bytes, as read
    assert payload.numpy().tobytes()[:2] == b"\xff\xd8" and len(drawn) == 4
    for name in ("grey.JPEG", "cmyk.JPEG", "progressive.JPEG", "png.JPEG"):
        assert device_jpeg_size((folder / name).read_bytes()) is None
        payload, _, _, _ = files[by_name[name], 5]
        assert payload.shape[0] == 3 and payload.dim() == 3  # decoded in the worker, RGB
    assert device_jpeg_size(b"\xff\xd8\xff\xe0\x00\x02") is None and device_jpeg_size(b"GIF89a") is None


def torchvision_folder(path: Path):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(path))


def test_decoding_in_the_training_process_gives_the_workers_batches_bit_for_bit(imagenet_odd):
    """Training crops, validation centre crops and ten crops: the same images, crops, flips and pixels (on the
    CPU both paths decode with libjpeg-turbo and resize with torchvision's kernel), the odd files included."""
    root = imagenet_odd
    workers, here = load(root, "cpu"), load(root, "gpu")
    for _ in range(10):  # 120 images: the epoch of 108 (the sample and the 4 odd files), and into the next
        (x, y), (x2, y2) = next(workers.train), next(here.train)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for name, views in [("val", workers.evals), ("test", workers.final)]:
        theirs = (here.evals if name == "val" else here.final)[name]
        for (x, y), (x2, y2) in zip(views[name], theirs):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_the_device_path_resumes_exactly_and_with_workers_gives_the_same_stream(imagenet_odd):
    root = imagenet_odd
    straight = load(root, "gpu")
    batches = [next(straight.train) for _ in range(3)]
    resumed = load(root, "gpu", workers=2)
    resumed.train.load_state_dict(load_state_after_one(root))
    for expected in batches[1:]:
        x, y = next(resumed.train)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])


def load_state_after_one(root: Path) -> dict:
    data = load(root, "gpu")
    next(data.train)
    return data.train.state_dict()


def test_a_damaged_jpeg_is_one_line_naming_it_on_either_path(imagenet_odd):
    root = imagenet_odd
    folder = sorted((root / "train").iterdir())[1]
    damaged = next(folder.iterdir())
    damaged.write_bytes(damaged.read_bytes()[:600])  # the header whole, the image data cut off
    for decode in ("cpu", "gpu"):
        data = load(root, decode, batch_size=108)  # every training image in the first batch
        with pytest.raises(ResexpError, match=f"{damaged}.* is not a readable image"):
            next(data.train)


def test_decode_image_and_the_batched_decoder_agree_on_the_cpu(imagenet_sample):
    from torchvision.io import decode_jpeg

    files = sample_files(imagenet_sample, 8)
    data = [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) for path in files]
    batched = decode_jpeg(data, device="cpu")
    assert all(torch.equal(one, decode_image(raw)) for one, raw in zip(batched, data))
