"""Each foreign layout, each family: the reference library's own model, saved the way that library
saves, loads into swinkit with the same logits; swinkit's export loads back into the library.

Models are tiny (embed 16, 128 px, window 4: no stage is clamped, so every library builds the same
network) and float64, so any difference beyond rounding of the op order is a mapping error.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision.models.swin_transformer as tv_swin
import transformers
from safetensors.torch import load_file, save_file

import swinkit
from helpers import perturb, relative_error
from swinkit.checkpoint import read_any, write_checkpoint
from swinkit.factory import config_from_checkpoint

SIZE, CLASSES = 128, 7
ARCH = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8), window_size=4)
# V2 also exercises the pretrained-window normalisation of the continuous position bias.
PRETRAINED_WINDOWS = {"v1": None, "v2": (3, 3, 3, 2)}
LIBRARIES = ("timm", "torchvision", "hf")


def _hf_arch() -> dict:
    """ARCH as transformers config fields (lists, not tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items()}


def _needs_v2(family: str) -> None:
    if family == "v2":
        pytest.importorskip("swinkit.model_v2", reason="Swin V2 (model_v2.py) is not in this checkout yet")


def _reference(library: str, family: str, windows: tuple[int, ...] | None = None) -> torch.nn.Module:
    """The library's own Swin model for ARCH, built the library's way (torchvision: no pretrained windows)."""
    v2, windows = family == "v2", PRETRAINED_WINDOWS[family] if windows is None else windows
    if library == "timm":
        kwargs = dict(img_size=SIZE, num_classes=CLASSES, **ARCH)
        if v2:
            return timm.models.swin_transformer_v2.SwinTransformerV2(pretrained_window_sizes=windows, **kwargs)
        return timm.models.swin_transformer.SwinTransformer(**kwargs)
    if library == "torchvision":
        extra = dict(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2) if v2 else {}
        return tv_swin.SwinTransformer(
            patch_size=[4, 4],
            embed_dim=ARCH["embed_dim"],
            depths=list(ARCH["depths"]),
            num_heads=list(ARCH["num_heads"]),
            window_size=[ARCH["window_size"]] * 2,
            stochastic_depth_prob=0.0,
            num_classes=CLASSES,
            **extra,
        )
    fields = dict(image_size=SIZE, patch_size=4, num_labels=CLASSES, **_hf_arch())
    if v2:
        return transformers.Swinv2ForImageClassification(
            transformers.Swinv2Config(pretrained_window_sizes=list(windows), **fields)
        )
    return transformers.SwinForImageClassification(transformers.SwinConfig(**fields))


def _perturbed_reference(library: str, family: str) -> torch.nn.Module:
    model = perturb(_reference(library, family).double().eval(), scale=0.05)
    if library == "torchvision" and family == "v2":
        with torch.no_grad():  # torchvision zeroes the k third at init and in forward; trained files keep it 0
            for name, param in model.named_parameters():
                if name.endswith("qkv.bias"):
                    param[param.numel() // 3 : 2 * param.numel() // 3] = 0
    return model


def _save(library: str, model: torch.nn.Module, tmp_path) -> str:
    """As the library's users save: timm safetensors (as on its hub), torchvision torch.save, HF save_pretrained."""
    if library == "timm":
        save_file(model.state_dict(), tmp_path / "timm.safetensors")
        return tmp_path / "timm.safetensors"
    if library == "torchvision":
        torch.save(model.state_dict(), tmp_path / "torchvision.pth")
        return tmp_path / "torchvision.pth"
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _load_reference(library: str, family: str, path, windows: tuple[int, ...] | None = None) -> torch.nn.Module:
    """The way the library's users load a file, strictly."""
    if library == "hf":
        cls = transformers.Swinv2ForImageClassification if family == "v2" else transformers.SwinForImageClassification
        model, info = cls.from_pretrained(path, output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched keys
        return model.double().eval()
    model = _reference(library, family, windows).double()
    state = load_file(path) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _swinkit_float64(path, **overrides) -> torch.nn.Module:
    """A swinkit model of the file's architecture, float64 before loading (no float32 rounding)."""
    checkpoint = read_any(path)
    model = swinkit.build_model(config_from_checkpoint(checkpoint).replace(**overrides)).double().eval()
    report = swinkit.load_checkpoint(model, checkpoint)
    assert report.ok and not report.adapted and not report.reinitialized, str(report)
    return model


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("library", LIBRARIES)
def test_reference_file_loads_and_export_loads_back(library, family, tmp_path):
    _needs_v2(family)
    reference = _perturbed_reference(library, family)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    expected = _logits(reference, x)

    source = _save(library, reference, tmp_path)
    overrides = {} if library == "hf" else {"img_size": SIZE}  # HF's config.json names the size
    if family == "v2" and library == "timm":  # timm files record neither (a V2 window has no parameter shape)
        overrides.update(window_size=ARCH["window_size"], pretrained_window_sizes=PRETRAINED_WINDOWS["v2"])
    model = _swinkit_float64(source, **overrides)
    assert read_any(source).format == library
    assert relative_error(_logits(model, x), expected) < 1e-10

    target = tmp_path / ("exported" if library == "hf" else "exported.safetensors")
    write_checkpoint(model.state_dict(), model.config, target, library)
    back = _load_reference(library, family, target)
    assert relative_error(_logits(back, x), expected) < 1e-10
    if library != "hf":  # the file there and back is the library's own state dict, bit for bit
        original, exported = reference.state_dict(), back.state_dict()
        assert original.keys() == exported.keys()
        assert all(torch.equal(original[k], exported[k]) for k in original)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_hf_float32_within_1e6(family, tmp_path):
    _needs_v2(family)
    reference = perturb(_reference("hf", family).eval(), scale=0.05)
    reference.save_pretrained(tmp_path / "hf")
    model = swinkit.create_model(checkpoint=tmp_path / "hf").eval()
    assert model.load_report.ok and model.config.img_size == SIZE
    x = torch.randn(2, 3, SIZE, SIZE)
    assert relative_error(_logits(model, x), _logits(reference, x)) < 1e-6


def test_hf_current_module_names_load(tmp_path):
    """transformers 5 modules name q/k/v ``q_proj``/``k_proj``/``v_proj`` (state_dict(), not save_pretrained)."""
    reference = _perturbed_reference("hf", "v1")
    state = reference.state_dict()
    assert any(".attention.q_proj." in k for k in state)  # the installed transformers uses the new names
    save_file(state, tmp_path / "new_names.safetensors")
    model = _swinkit_float64(tmp_path / "new_names.safetensors", img_size=SIZE)
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    assert relative_error(_logits(model, x), _logits(reference, x)) < 1e-10


def test_hf_backbone_file_loads_into_features_only(tmp_path):
    config = transformers.SwinConfig(
        image_size=SIZE, patch_size=4, out_features=["stage2", "stage3", "stage4"], **_hf_arch()
    )
    reference = perturb(transformers.SwinBackbone(config).double().eval(), scale=0.05)
    reference.save_pretrained(tmp_path / "backbone")
    model = _swinkit_float64(tmp_path / "backbone")
    assert model.config.features_only and model.config.out_indices == (1, 2, 3) and model.config.always_shift
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x).feature_maps
        maps = model(x)
    assert len(maps) == 3
    assert max(relative_error(a, b) for a, b in zip(maps, expected, strict=True)) < 1e-10


@pytest.mark.parametrize("source_library", LIBRARIES)
def test_v2_layouts_convert_between_libraries(source_library, tmp_path):
    """V2 mappings without swinkit's V2 model: one library's file, written for another, gives its logits."""
    reference = _perturbed_reference(source_library, "v2")
    windows = (0, 0, 0, 0) if source_library == "torchvision" else PRETRAINED_WINDOWS["v2"]
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    expected = _logits(reference, x)
    checkpoint = read_any(_save(source_library, reference, tmp_path))
    assert checkpoint.family == "v2"
    config = config_from_checkpoint(checkpoint).replace(img_size=SIZE, window_size=4, pretrained_window_sizes=windows)
    for library in LIBRARIES:
        target = tmp_path / f"to_{library}" / ("hf" if library == "hf" else "weights.safetensors")
        write_checkpoint(checkpoint.state_dict, config, target, library)
        back = _load_reference(library, "v2", target, windows)
        assert relative_error(_logits(back, x), expected) < 1e-10, library
    write_checkpoint(checkpoint.state_dict, config, tmp_path / "official.pth", "official")
    official = read_any(tmp_path / "official.pth")  # its buffers record the size and the windows
    assert official.hints == {"img_size": SIZE, "window_size": 4, "pretrained_window_sizes": windows}
    assert all(torch.equal(official.state_dict[k], v) for k, v in checkpoint.state_dict.items())


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_official_export_has_the_buffers_the_official_code_builds(family, tmp_path):
    """``--to official`` writes ``{"model": sd}`` whose index / mask / coordinate buffers equal the ones an
    official-style model builds at construction (timm builds them the same way, as non-persistent buffers)."""
    reference = _perturbed_reference("timm", family)
    save_file(reference.state_dict(), tmp_path / "timm.safetensors")
    checkpoint = read_any(tmp_path / "timm.safetensors")
    overrides = {"img_size": SIZE, "window_size": 4}
    if family == "v2":
        overrides["pretrained_window_sizes"] = PRETRAINED_WINDOWS["v2"]
    config = config_from_checkpoint(checkpoint).replace(**overrides)
    write_checkpoint(checkpoint.state_dict, config, tmp_path / "official.pth", "official")
    written = torch.load(tmp_path / "official.pth", weights_only=True)
    assert set(written) == {"model"}
    state = written["model"]
    built = {k: v for k, v in reference.named_buffers() if not k.endswith("k_bias")}  # timm's V2 zero k bias
    assert set(built) <= set(state)
    derived = [
        k for k in state if k.rsplit(".", 1)[-1] in ("relative_position_index", "attn_mask", "relative_coords_table")
    ]
    assert sorted(derived) == sorted(built)
    for key, value in built.items():
        assert state[key].shape == value.shape and torch.equal(state[key].to(value.dtype), value), key
    official = read_any(tmp_path / "official.pth")
    assert official.format == "official" and official.hints["img_size"] == SIZE
    assert all(torch.equal(official.state_dict[k], v) for k, v in checkpoint.state_dict.items())


def test_hf_absolute_position_embedding_round_trip(tmp_path):
    config = transformers.SwinConfig(
        image_size=SIZE, patch_size=4, num_labels=3, use_absolute_embeddings=True, **_hf_arch()
    )
    reference = perturb(transformers.SwinForImageClassification(config).double().eval(), scale=0.05)
    reference.save_pretrained(tmp_path / "hf")
    model = _swinkit_float64(tmp_path / "hf")
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    assert model.config.ape and relative_error(_logits(model, x), _logits(reference, x)) < 1e-10
    write_checkpoint(model.state_dict(), model.config, tmp_path / "exported", "hf")
    assert relative_error(_logits(_load_reference("hf", "v1", tmp_path / "exported"), x), _logits(reference, x)) < 1e-10
