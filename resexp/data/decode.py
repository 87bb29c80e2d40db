"""Decoding ImageNet's JPEGs for resexp/data/imagenet_folders.py: on the CPU (torchvision's libjpeg-turbo
decoder, else PIL), or on the training device (data.decode=gpu): workers send a file's bytes, with its size
read from the JPEG header and its crop drawn, and the training process decodes the batch in one call of
torchvision's decode_jpeg (nvJPEG on a GPU) and cuts each image's views there. torchvision's decoder rather
than TorchCodec: it is in the torchvision resexp needs already, batched and on CUDA since torchvision 0.19."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import functional as F

from resexp.data.crops import Crop, draw_crop
from resexp.errors import ResexpError

try:  # deprecated in torchvision 0.29 in favour of TorchCodec; without it PIL decodes everything
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
except ImportError:
    decode_image = decode_jpeg = None


class FolderFiles(Dataset):
    """Class-folder images for decode="gpu": each item is (the file's bytes as a uint8 tensor, or the
    image decoded here where the device's decoder does not take the file; its label; its crop's draw, as
    (length, top, left, flip), empty for a held-out image; its path). Indexed as FolderImages; `scale` and
    `crop` are the training crops' (device_views makes them)."""

    def __init__(self, folder: ImageFolder, scale: tuple[int, int], crop: int) -> None:
        self.samples, self.scale, self.crop = folder.samples, scale, crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, torch.Tensor, str]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[index]
        data = file_bytes(path)
        size = device_jpeg_size(data)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if size else decode_here(data, path)
        height, width = size or tuple(payload.shape[-2:])
        if seed is None:
            return payload, label, torch.zeros(0, dtype=torch.int64), path
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            drawn = draw_crop(height, width, self.scale, self.crop)
        return payload, label, torch.tensor([drawn.length, drawn.top, drawn.left, drawn.flip]), path


def files_batch(items: list[tuple[torch.Tensor, int, torch.Tensor, str]]) -> tuple:
    """FolderFiles' items as one batch: the payloads (of several lengths and shapes) and paths as lists."""
    payloads, labels, drawn, paths = zip(*items)
    return list(payloads), torch.tensor(labels), torch.stack(drawn), list(paths)


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The (height, width) of a baseline or extended sequential JPEG of three components, which torchvision's
    decode_jpeg takes on a GPU (nvJPEG); None for anything else (greyscale, CMYK, progressive, another
    format under a .JPEG name, a damaged header), which is decoded on the CPU. Reads the markers only."""
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte
            at += 1
            continue
        if marker in (0xC0, 0xC1) and at + 10 <= len(data):  # SOF0, SOF1: the frame's size and components
            height, width = int.from_bytes(data[at + 5 : at + 7], "big"), int.from_bytes(data[at + 7 : at + 9], "big")
            return (height, width) if data[at + 9] == 3 and height and width else None
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:  # another frame, a scan
            return None
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def file_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ResexpError(f"{path} is not a readable image ({error.strerror or error}); remove or replace it") from None


def read_image(path: str) -> torch.Tensor:
    """The image as uint8 RGB (3, H, W), grayscale and CMYK JPEGs included; PIL reads the formats that
    torchvision's decoders lack (BMP, TIFF)."""
    return decode_here(file_bytes(path), path)


def decode_here(data: bytes, path: str) -> torch.Tensor:
    """The file's bytes decoded on the CPU as uint8 RGB (3, H, W): torchvision's decoders, else PIL's."""
    if decode_image is not None:
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # not a format torchvision decodes, or a broken file: PIL decides which
            pass
    try:
        return F.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    except OSError as error:  # PIL's UnidentifiedImageError is one; a truncated file raises another
        raise ResexpError(f"{path} is not a readable image ({error}); remove or replace it") from None
    except Image.DecompressionBombError as error:  # over twice PIL's MAX_IMAGE_PIXELS: no photograph of ImageNet's
        raise ResexpError(f"{path} is too large to decode ({error}); remove or replace it") from None


def device_views(batch: tuple, device: torch.device, views: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A FolderFiles batch's images on `device`: the JPEGs decoded there in one call of torchvision's
    decode_jpeg (nvJPEG on a GPU), the images the workers decoded moved there; then `views` of each
    (its crop, centre crop or ten crops), stacked."""
    payloads, _, drawn, paths = batch
    images = [payload.to(device, non_blocking=True) if payload.dim() == 3 else None for payload in payloads]
    files = [index for index, image in enumerate(images) if image is None]
    if files:
        try:
            decoded = decode_jpeg([payloads[i] for i in files], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one file of the batch is damaged: decode them one by one, to name it
            decoded = [decode_one(payloads[i], paths[i], device) for i in files]
        for index, image in zip(files, decoded):
            images[index] = image
    if len(drawn[0]):  # training crops, as drawn in the workers
        return torch.stack([views(image, Crop(*row.tolist())) for image, row in zip(images, drawn)])
    return torch.stack([views(image) for image in images])


def decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    """One JPEG decoded on `device`, or on the CPU where that decoder refuses it; one line naming a damaged file."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return decode_here(data.numpy().tobytes(), path).to(device)
