"""pipeline.settings: what a node resolves from its params at its boundary. Each object reads exactly the keys it
holds (the params-reads recorder sees the library's reads there), and the encoder config it hands on is the params
model section itself (an encoder file's sidecar records it)."""
import pytest

from pipeline import config, settings
from pipeline.orchestration.params_reads import Reads, Recorder


@pytest.mark.parametrize("preset", config.presets())
def test_the_encoder_config_is_the_params_model_section(preset):
    params = config.load(preset, check_paths=False)
    assert list(settings.Model.of(params).config().items()) == list(params["model"].items())


def reads_of(make, params: dict) -> set[str]:
    reads = Reads()
    make(Recorder(params, reads))
    return reads.paths["check"]


def test_each_settings_object_reads_exactly_its_keys():
    params = config.load("tiny", check_paths=False)
    model = {f"model.{k}" for k in params["model"]}
    assert reads_of(settings.Geometry.of, params) == model | {"data.img_size", "pretrain.mask_ratio"}
    assert reads_of(settings.stream, params) == {"data.format", "data.dataset"}      # a tensor file: no stream
    assert reads_of(lambda p: settings.Knn.of(p["knn"]), params) == {f"knn.{k}" for k in ("k", "temperature",
                                                                                            "feature", "precision")}
    streamed = config.merge(params, {"data": {"dataset": "imagefolder", "format": "stream", "path": "x"}})
    assert reads_of(settings.Stream.of, streamed) == {
        "launch.device", "launch.data_workers", "launch.prefetch_batches", "data.path", "data.img_size",
        "data.channels", "data.bad_images", "data.max_bad_images", "pretrain.crop_scale", "pretrain.hflip"}
