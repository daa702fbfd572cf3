"""The app's server-independent pieces: prompt checking, image reading and intensity mapping, label files, and the
cached-input decoder path (without a server; the server tests cover the same through HTTP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813
import torch
from PIL import Image

from lib.common.settings import RequestError
from lib.io.image_source import ImageReadError, read_image, to_uint8
from lib.io.volume_io import (
    GZIP_READ_CHUNK,
    crc32_of_zeros,
    encode_label_png,
    read_nifti,
    read_nrrd,
    write_label,
    write_slice_label_nrrd,
)
from lib.serving.decoding import ServedDecoding, decode_rows, prompt_independent_inputs
from lib.serving.embedding_cache import CachedEmbedding
from lib.serving.interactive import InteractiveSegmenter
from lib.serving.model_store import ModelStore
from lib.serving.prompt_inputs import parse_prompts


def test_slicer_roi_pairs_in_any_order_and_slice_from_roi() -> None:
    prompts = parse_prompts({"roi": [30, 10, 40, 20, 7, 3]}, (50, 60), 12)
    np.testing.assert_array_equal(prompts.box, [10, 20, 30, 40])
    assert prompts.slice_index == 5 and prompts.multimask_output is True


def test_clicks_give_the_slice_and_multimask_is_the_default_for_every_prompt() -> None:
    """The published train/test scripts decode every prompt with multimask_output=True: output 0 is never trained."""
    one = parse_prompts({"foreground": [[3, 4, 5.9999]]}, (10, 10), 8)
    assert one.slice_index == 6 and one.multimask_output is True
    np.testing.assert_array_equal(one.point_coords, [[3, 4]])
    two = parse_prompts({"foreground": [[3, 4, 6]], "background": [[5, 5, 6]]}, (10, 10), 8)
    assert two.multimask_output is True
    np.testing.assert_array_equal(two.point_labels, [1, 0])
    box_and_click = parse_prompts(
        {"box": [1, 1, 8, 8], "foreground": [[3, 4]], "multimask_output": "auto"}, (10, 10), 1
    )
    assert box_and_click.multimask_output is True
    forced = parse_prompts({"foreground": [[3, 4]], "slice": 2, "multimask_output": "false"}, (10, 10), 8)
    assert forced.slice_index == 2 and forced.multimask_output is False
    server_default = parse_prompts({"box": [1, 1, 8, 8]}, (10, 10), None, default_multimask=False)
    assert server_default.multimask_output is False


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"foreground": [[3, 4, 1]], "background": [[3, 4, 2]]}, "several slices"),
        ({"foreground": [[3, 4, 1]], "slice": 2}, "no prompt on slice 2: the clicks are on slices [1]"),
        ({"roi": [1, 5, 1, 5, 0, 2], "slice": 4}, "do not include"),
        ({"foreground": [[10, 4, 1]]}, "outside the image"),
        ({"foreground": [[3, 4, 1]], "slice": 1.5}, "integer"),
        ({"box": [1, 2, 3]}, "must be [x1, y1, x2, y2]"),
        ({"foreground": [[1, 1, 1]], "window": {"width": 3}}, "level"),
    ],
)
def test_bad_prompts_name_the_problem(request_: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_prompts(request_, (10, 10), 8)
    assert info.value.status == 400


def test_window_forms_agree() -> None:
    a = parse_prompts({"foreground": [[1, 1]], "window": [-160, 240]}, (4, 4), None)
    b = parse_prompts({"foreground": [[1, 1]], "window": {"level": 40, "width": 400}}, (4, 4), None)
    assert a.window == b.window == (-160.0, 240.0)


def test_sixteen_bit_picture_and_dicom_are_mapped_over_their_range(tmp_path: Path) -> None:
    values = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    source = read_image(tmp_path / "deep.png")
    assert source.needs_mapping and source.value_range == (0.0, 4000.0)
    np.testing.assert_array_equal(source.view()[..., 0], to_uint8(values, 0, 4000))

    ct = read_image(pydicom.data.get_testdata_file("CT_small.dcm"))
    dataset = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert ct.value_range == (hounsfield.min(), hounsfield.max())
    windowed = ct.view(window=(-160, 240))
    np.testing.assert_array_equal(windowed[..., 0], to_uint8(hounsfield, -160, 240))
    assert windowed.shape == (128, 128, 3)


def test_unreadable_and_unsupported_files(tmp_path: Path) -> None:
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="not a readable volume"):
        read_image(tmp_path / "broken.nii.gz")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "missing.png")


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_slice_label_nrrd_equals_the_full_volume_file(tmp_path: Path, compress: bool, dtype: type) -> None:
    affine = np.array([[-0.7, 0.1, 0, 10], [0, -0.7, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    plane = (np.random.default_rng(0).random((20, 30)) > 0.5).astype(dtype)  # (J, I)
    volume = np.zeros((30, 20, 7), dtype=dtype)
    volume[:, :, 4] = plane.T
    write_label(volume, tmp_path / "full.nrrd", affine)
    write_slice_label_nrrd(tmp_path / "fast.nrrd", (30, 20, 7), 4, plane, affine, compress)
    full, fast = sitk.ReadImage(str(tmp_path / "full.nrrd")), sitk.ReadImage(str(tmp_path / "fast.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fast), sitk.GetArrayFromImage(full))
    assert fast.GetPixelID() == full.GetPixelID()
    np.testing.assert_allclose(fast.GetOrigin(), full.GetOrigin())
    np.testing.assert_allclose(fast.GetDirection(), full.GetDirection())
    np.testing.assert_allclose(fast.GetSpacing(), full.GetSpacing())
    array, read_affine = read_nrrd(tmp_path / "fast.nrrd")
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(read_affine, affine)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("policy", ["evaluation", "predictor"])
def test_served_decoding_equals_the_models_decode(golden_dir: Path, multimask: bool, policy: str) -> None:
    """The per-click path (prompt-independent inputs computed once) equals SamMed2D.decode, with a mask prompt too:
    the previous logits enter as probabilities (evaluation policy, as the published scripts) or as logits."""
    store = ModelStore(golden_dir / "unused", golden_dir / "meta.json", golden_dir / "weights.pth")
    model = store.load()
    cases = np.load(golden_dir / "cases.npz")
    decoding = ServedDecoding(policy=policy)
    with torch.inference_mode():
        features = torch.as_tensor(cases["features"])
        entry = CachedEmbedding(features, None, prompt_independent_inputs(model, features))
        points = (torch.tensor([[[120.0, 90.0], [60.0, 40.0]]]), torch.tensor([[1, 0]]))
        previous = torch.as_tensor(cases["one_point.low_res"]).reshape(1, 1, 64, 64)
        mask_input = torch.sigmoid(previous) if policy == "evaluation" else previous
        for prev, model_mask in ((None, None), (previous, mask_input)):
            low_res, iou = decode_rows(model, entry, decoding, *points, None, prev, multimask)
            expected, expected_iou = model.decode(features, *points, None, model_mask, multimask_output=multimask)
            torch.testing.assert_close(low_res, expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(iou, expected_iou[:, 0], rtol=0, atol=1e-5)


def test_embedding_key_separates_views_windows_and_weights(golden_dir: Path, tmp_path: Path) -> None:
    import nibabel as nib

    volume = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    segmenter = InteractiveSegmenter(ModelStore(tmp_path / "m", golden_dir / "meta.json"))
    source, _ = segmenter.source(str(tmp_path / "v.nii.gz"))
    keys = {
        segmenter.embedding_key(source, parse_prompts(request, source.view_hw, 3), model)
        for request, model in (
            ({"foreground": [[1, 1, 0]]}, "a"),
            ({"foreground": [[1, 1, 1]]}, "a"),
            ({"foreground": [[1, 1, 1]], "window": [0, 10]}, "a"),
            ({"foreground": [[1, 1, 1]]}, "b"),
        )
    }
    assert len(keys) == 4


def test_loaded_images_are_bounded_by_bytes(golden_dir: Path, tmp_path: Path) -> None:
    """Volumes past the byte budget are dropped, oldest first; the image being clicked stays even when larger, and a
    dropped image is read again on its next click."""
    import nibabel as nib

    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(np.zeros((64, 64, 32), dtype=np.int16), np.eye(4)), tmp_path / f"{name}.nii.gz")
    one = 64 * 64 * 32 * 2
    store = ModelStore(tmp_path / "m", golden_dir / "meta.json")
    segmenter = InteractiveSegmenter(store, max_sources=8, max_source_bytes=2 * one)
    for name in ("a", "b"):
        segmenter.source(str(tmp_path / f"{name}.nii.gz"))
    assert segmenter.stats()["images_in_memory"] == 2
    segmenter.source(str(tmp_path / "c.nii.gz"))
    assert segmenter.stats()["images_in_memory"] == 2
    assert segmenter.stats()["image_bytes_in_memory"] == 2 * one
    assert segmenter.source(str(tmp_path / "b.nii.gz"))[1] is True  # still in memory
    assert segmenter.source(str(tmp_path / "a.nii.gz"))[1] is False  # dropped, read again
    tiny = InteractiveSegmenter(store, max_source_bytes=one // 2)
    source, _ = tiny.source(str(tmp_path / "a.nii.gz"))
    assert tiny.source(str(tmp_path / "a.nii.gz"))[1] is True and source.nbytes == one


def test_download_checks_the_file_before_keeping_it(golden_dir: Path, tmp_path: Path) -> None:
    """The weights download (served here by a local HTTP server) keeps a file only if it loads as the network."""
    import functools
    import http.server
    import threading

    from lib.io.published_weights import PUBLISHED_FILE, DownloadError, download_published_weights, find_local_weights

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(golden_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(DownloadError, match="not a SAM-Med2D checkpoint"):
            download_published_weights(tmp_path / "a", url=f"{base}/cases.npz", verify_config=golden_dir / "meta.json")
        assert not any((tmp_path / "a").iterdir())
        path = download_published_weights(
            tmp_path / "b", url=f"{base}/weights.pth", verify_config=golden_dir / "meta.json"
        )
        assert path.name == PUBLISHED_FILE and path.read_bytes() == (golden_dir / "weights.pth").read_bytes()
        assert find_local_weights(tmp_path / "b") == path
        with pytest.raises(DownloadError, match="cannot reach"):
            download_published_weights(tmp_path / "c", url=f"{base.rsplit(':', 1)[0]}:1/x", connect_timeout=2)
    finally:
        server.shutdown()


@pytest.mark.parametrize("dtype, value", [(np.uint8, 1), (np.uint8, 255), (np.uint16, 1), (np.uint16, 40000)])
def test_png_labels_read_back_with_their_values(dtype, value) -> None:
    """The click's PNG label: any reader gets the label's values and shape back (odd sizes, both byte orders of
    16-bit), and it stays small; other dtypes are refused by name."""
    import io

    rng = np.random.default_rng(0)
    label = np.zeros((37, 53), dtype=dtype)
    label[5:30, 10:40] = value
    label[rng.random(label.shape) < 0.05] = 0
    encoded = encode_label_png(label)
    with Image.open(io.BytesIO(encoded)) as image:
        np.testing.assert_array_equal(np.asarray(image), label)
    assert len(encode_label_png(np.zeros((512, 512), np.uint8))) < 2000
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_label_png(label.astype(np.int32))


@pytest.mark.parametrize("length", [0, 1, 7, 4096, 1 << 20, 3 * 262144 + 5])
def test_crc_of_zero_runs_equals_zlibs(length) -> None:
    """A volume label's empty slices enter its gzip CRC without being read: the CRC must be zlib's."""
    import zlib

    for start in (0, zlib.crc32(b"a label slice")):
        assert crc32_of_zeros(start, length) == zlib.crc32(bytes(length), start)


@pytest.mark.parametrize("dtype", [np.int16, np.dtype(">f4"), np.uint8])
def test_gzip_nifti_reads_as_nibabel_does_holding_the_volume_once(tmp_path: Path, dtype) -> None:
    """A ``.nii.gz`` volume decompresses straight into its array: nibabel's values, dtype and order, with one copy of
    the volume and one chunk allocated (nibabel's own read holds two copies); a truncated file is an unreadable
    image."""
    import gzip
    import tracemalloc

    import nibabel as nib

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 200, size=(160, 128, 64, 2)).astype(dtype)
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 2.5, 1.0])), path)
    expected = np.asanyarray(nib.load(str(path)).dataobj)
    tracemalloc.start()
    pixels, affine = read_nifti(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pixels.dtype == expected.dtype and pixels.flags.f_contiguous == expected.flags.f_contiguous
    np.testing.assert_array_equal(pixels, expected)
    np.testing.assert_array_equal(affine, nib.load(str(path)).affine)
    assert peak < volume.nbytes + 2 * GZIP_READ_CHUNK, (peak, volume.nbytes)

    data = gzip.decompress(path.read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(ImageReadError, match="truncated.nii.gz is not a readable volume: .*ends after"):
        read_image(str(truncated))


@pytest.mark.parametrize("dtype", [np.int16, np.dtype(">f4")])
def test_scoring_reads_a_volume_s_middle_slice_a_slice_at_a_time(tmp_path: Path, dtype) -> None:
    """Start-up scoring scores a volume's middle slice in the whole volume's window: the view a click on that slice
    gets, read without holding the volume (two slices allocated); NaN voxels are left out of the window as
    :func:`read_image` leaves them."""
    import tracemalloc

    import nibabel as nib

    from lib.io.image_source import read_scored_view

    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 3000, size=(160, 128, 64)).astype(dtype)
    if volume.dtype.kind == "f":
        volume[0, 0, :8] = np.nan
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 2.5, 1.0])), path)
    whole = read_image(str(path))
    tracemalloc.start()
    view, content = read_scored_view(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(view, whole.view(32))
    assert content == whole.content
    plane = 160 * 128 * volume.dtype.itemsize
    assert peak < 2 * plane + view.nbytes + 4 * 160 * 128 + 2**20, (peak, volume.nbytes)


def test_a_kept_volume_is_mapped_from_an_unnamed_file_and_serves_the_same_views(tmp_path: Path) -> None:
    """The server keeps a volume for further clicks in a temporary file, mapped read-only: the same views, and no file
    left behind; a 2D image stays as it is, and so does a volume whose file cannot be written."""
    import nibabel as nib

    from lib.io.image_source import ImageSource, mapped_from_disk

    volume = np.random.default_rng(0).integers(-1000, 3000, size=(512, 256, 32)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    source = read_image(str(tmp_path / "v.nii.gz"))
    spill = tmp_path / "spill"
    spill.mkdir()
    row_major = ImageSource("v.nrrd", source.content, np.ascontiguousarray(source.pixels), True, source.affine)
    for loaded in (source, row_major):  # a NIfTI volume is column-major; other readers' may not be
        kept = mapped_from_disk(loaded, str(spill))
        assert isinstance(kept.pixels, np.memmap) and not kept.pixels.flags.writeable
        assert list(spill.iterdir()) == []  # unlinked from its creation
        assert kept.value_range == loaded.value_range and kept.nbytes == loaded.nbytes
        for k in (0, 17, 31):
            np.testing.assert_array_equal(kept.view(k), loaded.view(k))
    picture = ImageSource("picture.png", "1:1", np.zeros((8, 8), dtype=np.uint8), is_volume=False)
    assert mapped_from_disk(picture) is picture
    with pytest.warns(UserWarning, match="v.nii.gz kept in memory"):  # no temporary file: served from memory
        assert mapped_from_disk(source, str(tmp_path / "missing")) is source
