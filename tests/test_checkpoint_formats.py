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
from swinkit.checkpoint import convert, read_any, write_checkpoint
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


@pytest.mark.parametrize("family, published", [("v1", 224), ("v2", 256)])
def test_a_torchvision_files_image_size_is_said_to_be_assumed(family, published, tmp_path):
    # torchvision's files hold no image size (its models take any): the one taken sets predict's
    # and eval's preprocessing, and was taken without a word (a 192-pixel model came back at 256).
    _needs_v2(family)
    name = "swin_test" if family == "v1" else "swinv2_test"
    model = swinkit.create_model(name, img_size=192, window_size=6, num_classes=4)
    swinkit.save(model, tmp_path / "model.safetensors")
    conversion = swinkit.checkpoint.convert(tmp_path / "model.safetensors", tmp_path / "tv.pth", to="torchvision")
    loaded = swinkit.create_model(checkpoint=tmp_path / "tv.pth")
    note = f"torchvision files do not hold the image size: taken as {loaded.config.img_size} px"
    assert loaded.config.window_size == 6 and any(n.startswith(note) for n in loaded.load_report.notes)
    assert f"published Swin{' V2' if family == 'v2' else ''} files are at {published})" in str(loaded.load_report)
    converted = swinkit.checkpoint.convert(tmp_path / "tv.pth", tmp_path / "back.safetensors", to="swinkit")
    assert any(n.startswith(note) for n in converted.notes) and not conversion.notes
    given = swinkit.create_model(checkpoint=tmp_path / "tv.pth", img_size=192)
    preset = swinkit.create_model(name, checkpoint=tmp_path / "tv.pth", img_size=192, window_size=6)
    assert given.config.img_size == preset.config.img_size == 192
    assert not any(n.startswith("torchvision files") for n in given.load_report.notes + preset.load_report.notes)


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


def _timm_v2(window: int, pretrained_windows: tuple[int, ...]) -> torch.nn.Module:
    """A tiny timm Swin V2 at 64 px (stages of 16, 8, 4, 2 tokens a side), perturbed, in float64 with
    float32 values (``create_model`` loads into float32: no rounding then)."""
    model = timm.models.swin_transformer_v2.SwinTransformerV2(
        img_size=64,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 4),
        window_size=window,
        pretrained_window_sizes=pretrained_windows,
        num_classes=CLASSES,
    )
    return perturb(model.double().eval(), scale=0.05).float().double()


def test_a_timm_v2_files_window_comes_from_its_name_or_the_model_never_silently_guessed(tmp_path, caplog):
    # timm's V2 files hold nothing that shows the window (the position bias is an MLP of
    # coordinates, its buffers are not saved); its published names and hub config.json say it.
    import json

    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fine_tuned = _timm_v2(16, (8, 4, 2, 1))  # window 16 at 64, fine-tuned from window 8 at 32 px
    named = tmp_path / "swinv2_test_window8to16_32to64.safetensors"
    save_file(fine_tuned.state_dict(), named)
    hub = tmp_path / "snapshot"  # a timm hub folder: its config.json names the architecture
    hub.mkdir()
    save_file(fine_tuned.state_dict(), hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": "swinv2_test_window8to16_32to64"}))
    for source in (named, hub, hub / "model.safetensors"):
        model = swinkit.create_model(checkpoint=source).double().eval()
        config = model.config
        assert (config.window_size, config.img_size, config.pretrained_window_sizes) == (16, 64, (8, 4, 2, 1))
        assert relative_error(_logits(model, x), _logits(fine_tuned, x)) < 1e-10, source
        assert "window 16 at 64 px, pretrained windows (8, 4, 2, 1) taken from the name" in str(model.load_report)

    own_window = _timm_v2(16, (0, 0, 0, 0))
    unnamed = tmp_path / "weights.safetensors"
    save_file(own_window.state_dict(), unnamed)
    with caplog.at_level("WARNING"):
        guessed = swinkit.create_model(checkpoint=unnamed).double().eval()
    assert guessed.config.window_size == 8  # the published geometry, assumed, and said where it is used
    assert "assumed window 8 at 256 px" in str(guessed.load_report) and "assumed window 8" in caplog.text
    assert relative_error(_logits(guessed, x), _logits(own_window, x)) > 1e-3  # why it must be said
    caplog.clear()
    arch = dict(depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=16, img_size=64)
    with caplog.at_level("WARNING"):
        model = swinkit.create_model("swinv2_test", checkpoint=unnamed, **arch).double().eval()
    assert model.config.pretrained_window_sizes == (0, 0, 0, 0)  # the model's, not the assumption's (8, 8, 8, 8)
    assert relative_error(_logits(model, x), _logits(own_window, x)) < 1e-10
    report = str(model.load_report)
    assert "taken to be the model's" in report and "assumed" not in report and "taken to be" in caplog.text

    # A named file whose pretrained windows differ from the preset's: the file's own are used.
    named_own = tmp_path / "swinv2_test_window16_64.safetensors"
    save_file(own_window.state_dict(), named_own)
    preset = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), img_size=64, window_size=16)
    model = swinkit.create_model("swinv2_b_256", checkpoint=named_own, **preset).double().eval()
    assert swinkit.get_config("swinv2_b_256").pretrained_window_sizes == (12, 12, 12, 6)
    assert model.config.pretrained_window_sizes == (0, 0, 0, 0)
    assert relative_error(_logits(model, x), _logits(own_window, x)) < 1e-10
    assert any("pretrained_window_sizes (0, 0, 0, 0) taken from the file" in item for item in model.load_report.adapted)


def test_per_stage_windows_are_refused_by_name(tmp_path):
    # timm's swin_s3_* (AutoFormerV2) models use timm's Swin class with a window per stage
    # (7, 7, 14, 7): not a Swin Transformer, and resizing stage 2's tables to 7 would be silently wrong.
    s3 = timm.models.swin_transformer.SwinTransformer(
        img_size=128, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=(4, 4, 8, 4)
    )
    torch.save(s3.state_dict(), tmp_path / "s3.pth")
    for name in (None, "swin_test"):
        with pytest.raises(swinkit.CheckpointError, match=r"s3\.pth: stage 2's .* window 8, stage 0's for 4 .*swin_s3"):
            swinkit.create_model(name, checkpoint=tmp_path / "s3.pth")
    with pytest.raises(swinkit.CheckpointError, match="per-stage windows"):
        convert(tmp_path / "s3.pth", tmp_path / "s3.safetensors")


def test_published_v2_names_give_their_geometry():
    from swinkit.checkpoint.formats import v2_geometry_from_name

    expected = {  # timm's, the official files', Hugging Face's names; (window, size, pretrained windows)
        "swinv2_tiny_window16_256": (16, 256, None),
        "swinv2_base_window12to16_192to256.ms_in22k_ft_in1k": (16, 256, (12, 12, 12, 6)),
        "swinv2_large_patch4_window12to24_192to384_22kto1k_ft.pth": (24, 384, (12, 12, 12, 6)),
        "swinv2-base-patch4-window12-192-22k": (12, 192, None),
    }
    for name, (window, size, pretrained) in expected.items():
        fields = v2_geometry_from_name(name, stages=4, patch_size=4)
        assert (fields["window_size"], fields["img_size"], fields.get("pretrained_window_sizes")) == (
            window,
            size,
            pretrained,
        ), name
    for name in ("model.safetensors", "run_window8_2.pth", "swin_tiny_patch4_window7"):  # no size, or too small
        assert v2_geometry_from_name(name, stages=4, patch_size=4) == {}, name
