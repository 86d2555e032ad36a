"""Frozen encoders on their real embedded weights: shapes, invariances, known answers, errors.

Each model is loaded once per module. No mocks: MobileNetV2 runs torchvision's ImageNet
weights, dlib its ResNet descriptor on two real photos, Whisper tiny.en on espeak-ng speech.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import cv2
import numpy as np
import pytest

from pipeline.encoders import (
    DlibFaceEncoder,
    Encoder,
    EncoderWeightsMissing,
    HFVisionFrameEncoder,
    MobileNetV2FrameEncoder,
    WhisperAudioEncoder,
    build_encoder,
    default_mobilenet_weights,
    default_whisper_dir,
    weight_hash,
)

RATE = 16000


def cosine(a, b):
    a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def read_rgb(path):
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def photos():
    """Two real portraits of two different people shipped inside installed packages."""
    import matplotlib
    import skimage

    return {
        "hopper": read_rgb(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data",
                                        "grace_hopper.jpg")),  # 600 x 512
        "astronaut": read_rgb(os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")),  # 512^2
    }


# --------------------------------------------------------------------------- weight_hash


def test_weight_hash_streams_contents_in_sorted_order(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"alpha" * 1000)
    b.write_bytes(b"beta")
    assert weight_hash(a) == hashlib.sha256(a.read_bytes()).hexdigest()[:16]
    both = hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()[:16]
    assert weight_hash([b, a]) == weight_hash([str(a), str(b)]) == both
    b.write_bytes(b"beta2")  # a changed file is hashed again, not served from the cache
    assert weight_hash([a, b]) != both


# --------------------------------------------------------------------------- MobileNetV2


@pytest.fixture(scope="module")
def mobilenet():
    return MobileNetV2FrameEncoder()


def test_mobilenet_loads_torchvision_imagenet_weights(mobilenet):
    # torchvision names its files by the sha256 prefix of their contents: b0353104.
    assert mobilenet.weight_hash.startswith("b0353104")
    assert mobilenet.weight_hash == weight_hash(default_mobilenet_weights())
    assert (mobilenet.id, mobilenet.tokens, mobilenet.dim) == ("mobilenet_v2-imagenet/grid2x2+pool/sq224", 5, 1280)
    assert isinstance(mobilenet, Encoder)
    import torch

    state = torch.load(default_mobilenet_weights(), map_location="cpu", weights_only=True)
    assert list(mobilenet.model.state_dict()) == list(state)


def test_mobilenet_global_token_is_the_imagenet_classifier_input(mobilenet, photos):
    # The classic test photo of Grace Hopper: ImageNet class 652 is "military uniform".
    # Right only if the architecture, the weights, the normalisation and the pooling all are.
    import torch

    feats = mobilenet.encode(photos["hopper"][None])
    with torch.inference_mode():
        logits = mobilenet.model.classifier(torch.from_numpy(feats[:, -1].astype(np.float32)))
    assert int(logits.argmax()) == 652


def test_mobilenet_shapes_dtype_and_determinism(mobilenet):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 120, 160, 3), dtype=np.uint8)
    a = mobilenet.encode(images)
    assert a.shape == (3, 5, 1280) and a.dtype == np.float16 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, mobilenet.encode(images))
    assert (a[:, :, :] >= 0).all()  # after ReLU6 and average pooling
    assert mobilenet.encode(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 5, 1280)


def test_mobilenet_separates_images_and_ignores_resolution(mobilenet, photos):
    hopper, astro = photos["hopper"], photos["astronaut"]
    small = cv2.resize(hopper, (hopper.shape[1] // 2, hopper.shape[0] // 2), interpolation=cv2.INTER_AREA)
    f_h, f_a, f_s = (mobilenet.encode(x[None])[0] for x in (hopper, astro, small))
    same = cosine(f_h[-1], f_s[-1])
    other = cosine(f_h[-1], f_a[-1])
    assert same > 0.95, same
    assert other < 0.7, other
    assert cosine(f_h[0], f_h[3]) < 0.95  # grid cells see different parts of the frame


def test_mobilenet_batch_chunking_matches_one_by_one(mobilenet, photos):
    rng = np.random.default_rng(1)
    base = cv2.resize(photos["astronaut"], (200, 150))
    images = np.stack([np.clip(base.astype(np.int16) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
                       for _ in range(5)])
    single = np.concatenate([mobilenet.encode(im[None]) for im in images])
    old = mobilenet.batch_size
    mobilenet.batch_size = 2  # chunks of 2, 2, 1
    try:
        chunked = mobilenet.encode(images)
    finally:
        mobilenet.batch_size = old
    np.testing.assert_allclose(chunked.astype(np.float32), single.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_mobilenet_grid_cells_average_to_the_global_token(photos):
    # At 256 px the last map is 8x8, so a 2x2 grid splits it into equal 4x4 cells.
    enc = MobileNetV2FrameEncoder(grid=2, input_size=256)
    f = enc.encode(photos["hopper"][None]).astype(np.float32)[0]
    assert enc.id.endswith("/grid2x2+pool/sq256")
    np.testing.assert_allclose(f[:4].mean(0), f[4], rtol=1e-2, atol=1e-3)
    enc3 = MobileNetV2FrameEncoder(grid=3, input_size=256)
    f3 = enc3.encode(photos["hopper"][None])
    assert f3.shape == (1, 10, 1280)
    np.testing.assert_array_equal(f3[0, -1], f[4].astype(np.float16))


def test_mobilenet_rejects_bad_input_and_missing_weights(mobilenet, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        mobilenet.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        mobilenet.encode(np.zeros((32, 32, 3), np.uint8))
    missing = tmp_path / "nope" / "mobilenet_v2.pth"
    with pytest.raises(EncoderWeightsMissing, match=str(missing)) as err:
        MobileNetV2FrameEncoder(weights=str(missing))
    assert "put" in str(err.value) and "mobilenet_v2-b0353104.pth" in str(err.value)


# --------------------------------------------------------------------------- dlib faces


@pytest.fixture(scope="module")
def face_chips(photos):
    """Aligned 150 px chips: each photo, a brightened copy of it (re-detected), and a mirror."""
    import dlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import face_recognition_models
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

    def chip(img):
        rects = detector(img, 1)
        assert len(rects) >= 1
        rect = max(rects, key=lambda r: r.area())
        return dlib.get_face_chip(img, predictor(img, rect), size=150)

    def brighter(img):
        return np.clip(img.astype(np.int16) + 40, 0, 255).astype(np.uint8)

    chips = {}
    for name, img in photos.items():
        chips[name] = chip(img)
        chips[name + "_bright"] = chip(brighter(img))
        chips[name + "_mirror"] = np.ascontiguousarray(chips[name][:, ::-1])
    return chips


@pytest.fixture(scope="module")
def dlib_encoder():
    return DlibFaceEncoder()


def test_dlib_descriptor_identity(dlib_encoder, face_chips):
    names = list(face_chips)
    feats = dlib_encoder.encode(np.stack([face_chips[n] for n in names]))
    assert feats.shape == (len(names), 1, 128) and feats.dtype == np.float16
    d = {n: feats[i, 0].astype(np.float32) for i, n in enumerate(names)}
    dist = lambda a, b: float(np.linalg.norm(d[a] - d[b]))
    for person in ("hopper", "astronaut"):
        assert dist(person, person + "_bright") < 0.6
        assert dist(person, person + "_mirror") < 0.6
    for a in ("hopper", "hopper_bright", "hopper_mirror"):
        for b in ("astronaut", "astronaut_bright", "astronaut_mirror"):
            assert dist(a, b) > 0.6, (a, b, dist(a, b))


def test_dlib_resizes_other_chip_sizes_and_records_its_weights(dlib_encoder, face_chips):
    import face_recognition_models

    chip = face_chips["hopper"]
    big = cv2.resize(chip, (200, 200), interpolation=cv2.INTER_CUBIC)
    a, b = dlib_encoder.encode(np.stack([chip]))[0, 0], dlib_encoder.encode(big[None])[0, 0]
    assert np.linalg.norm(a.astype(np.float32) - b.astype(np.float32)) < 0.2
    assert dlib_encoder.encode(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 1, 128)
    assert (dlib_encoder.id, dlib_encoder.tokens, dlib_encoder.dim) == ("dlib-resnet-128", 1, 128)
    assert dlib_encoder.weight_hash == weight_hash(face_recognition_models.face_recognition_model_location())
    assert isinstance(dlib_encoder, Encoder)


# --------------------------------------------------------------------------- Whisper audio


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """2.5 s of espeak-ng speech then 1.5 s of digital silence, float32 mono 16 kHz."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing (run `make setup`)")
    wav = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), ("The quick brown fox jumps over the lazy dog near the "
                    "quiet river bank today")], check=True, capture_output=True, timeout=60)
    rate, pcm = wavfile.read(wav)
    assert rate == 22050
    audio = resample_poly(pcm.astype(np.float32) / 32768.0, 320, 441).astype(np.float32)
    assert len(audio) > 2.5 * RATE
    return np.concatenate([audio[: int(2.5 * RATE)], np.zeros(int(1.5 * RATE), np.float32)])


@pytest.fixture(scope="module")
def whisper():
    return WhisperAudioEncoder()


def test_whisper_windows_cover_the_audio(whisper, speech):
    assert (whisper.id, whisper.tokens, whisper.dim) == ("whisper-tiny.en-encoder/mean1.0s", 1, 384)
    assert whisper.weight_hash == weight_hash([default_whisper_dir() / "model.bin",
                                               default_whisper_dir() / "config.json"])
    assert isinstance(whisper, Encoder)
    starts, ends, feats = whisper.encode(speech)
    np.testing.assert_allclose(starts, [0, 1, 2, 3])
    np.testing.assert_allclose(ends, [1, 2, 3, 4])
    assert feats.shape == (4, 1, 384) and feats.dtype == np.float16 and np.isfinite(feats).all()

    starts, ends, feats = whisper.encode(speech[: int(2.3 * RATE)])  # last window shorter
    np.testing.assert_allclose(ends, [1, 2, 2.3])
    assert feats.shape == (3, 1, 384)
    starts, ends, feats = whisper.encode(np.zeros(0, np.float32))
    assert starts.shape == ends.shape == (0,) and feats.shape == (0, 1, 384)


def test_whisper_speech_and_silence_windows_differ(speech):
    enc = WhisperAudioEncoder(window_s=0.5)
    assert enc.id == "whisper-tiny.en-encoder/mean0.5s"
    starts, ends, feats = enc.encode(speech)
    assert len(starts) == 8 and ends[-1] == pytest.approx(4.0)
    f = feats[:, 0].astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    talk, quiet = [i for i in range(8) if ends[i] <= 2.5], [i for i in range(8) if starts[i] >= 2.5]
    assert (len(talk), len(quiet)) == (5, 3)
    silence_vs_silence = min(sim[i, j] for i in quiet for j in quiet)
    speech_vs_silence = max(sim[i, j] for i in talk for j in quiet)
    assert silence_vs_silence > 0.65 and speech_vs_silence < 0.6
    assert speech_vs_silence < silence_vs_silence - 0.1


def test_whisper_long_audio_is_encoded_in_30s_chunks(whisper, speech):
    audio = np.concatenate([np.zeros(28 * RATE, np.float32), speech[: int(2.5 * RATE)]])  # speech across 30 s
    starts, ends, feats = whisper.encode(audio)
    assert len(starts) == 31 and ends[-1] == pytest.approx(30.5) and starts[-1] == pytest.approx(30.0)
    assert np.isfinite(feats).all()
    f = feats[:, 0].astype(np.float32)
    # The speech in the second chunk is seen: its window differs from the silent start.
    assert cosine(f[30], f[5]) < cosine(f[4], f[5])


def test_whisper_rejects_bad_input_and_missing_models(whisper, tmp_path):
    with pytest.raises(ValueError, match="mono"):
        whisper.encode(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="mono"):
        whisper.encode(np.zeros(100, np.int16))
    with pytest.raises(EncoderWeightsMissing, match="CTranslate2 Whisper folder"):
        WhisperAudioEncoder(model_dir=str(tmp_path / "missing"))
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(default_whisper_dir() / "config.json", partial)
    with pytest.raises(EncoderWeightsMissing, match="model.bin"):
        WhisperAudioEncoder(model_dir=str(partial))


# --------------------------------------------------------------------------- HF vision towers


def _tiny_clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                            image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import torch
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-clip"
    model = CLIPVisionModel(_tiny_clip_vision_config()).eval()
    model.save_pretrained(path)
    return path, model


def _clip_pixels(images):
    import torch

    from pipeline.encoders import CLIP_MEAN, CLIP_STD

    x = torch.from_numpy(np.stack([cv2.resize(im, (32, 32), interpolation=cv2.INTER_AREA) for im in images]))
    x = x.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_hf_clip_vision_tokens(tiny_clip):
    import torch

    path, model = tiny_clip
    enc = HFVisionFrameEncoder(str(path))
    assert (enc.tokens, enc.dim, enc.id) == (5, 32, "hf-clip:tiny-clip/grid2x2+pool/sq32")
    assert isinstance(enc, Encoder)
    images = np.random.default_rng(2).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    feats = enc.encode(images)
    assert feats.shape == (3, 5, 32) and feats.dtype == np.float16
    with torch.inference_mode():
        ref = model(pixel_values=_clip_pixels(images))
    # 4x4 patches -> equal 2x2 cells: their mean is the mean patch token; the last token is the pooler.
    patches = ref.last_hidden_state[:, 1:].numpy()
    np.testing.assert_allclose(feats[:, :4].astype(np.float32).mean(1), patches.mean(1), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(feats[:, 0].astype(np.float32), patches[:, [0, 1, 4, 5]].mean(1), rtol=1e-2,
                               atol=1e-2)
    np.testing.assert_allclose(feats[:, 4].astype(np.float32), ref.pooler_output.numpy(), rtol=1e-2, atol=1e-2)
    assert enc.weight_hash == weight_hash([path / "config.json", path / "model.safetensors"])


def test_hf_full_clip_checkpoint_gives_its_vision_tower(tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
            "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    full = CLIPModel(CLIPConfig(vision_config=_tiny_clip_vision_config().to_dict(), text_config=text,
                                projection_dim=16)).eval()
    full.save_pretrained(tmp_path / "full-clip")
    enc = HFVisionFrameEncoder(str(tmp_path / "full-clip"))
    assert enc.id == "hf-clip:full-clip/grid2x2+pool/sq32"
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        ref = full.vision_model(pixel_values=_clip_pixels(images)).pooler_output.numpy()
    np.testing.assert_allclose(enc.encode(images)[:, -1].astype(np.float32), ref, rtol=1e-2, atol=1e-2)


def test_hf_missing_or_unsupported_model(tmp_path):
    with pytest.raises(EncoderWeightsMissing, match="save_pretrained"):
        HFVisionFrameEncoder(str(tmp_path / "none"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="bert"):
        HFVisionFrameEncoder(str(tmp_path / "bert"))


# --------------------------------------------------------------------------- factory


def test_build_encoder_specs_and_errors(tiny_clip, tmp_path):
    assert isinstance(build_encoder("frame", None, "cpu"), MobileNetV2FrameEncoder)
    assert isinstance(build_encoder("frame", "mobilenet_v2", "cpu", grid=1), MobileNetV2FrameEncoder)
    hf = build_encoder("frame", f"hf:{tiny_clip[0]}", "cpu")
    assert isinstance(hf, HFVisionFrameEncoder) and hf.dim == 32
    assert isinstance(build_encoder("face", "dlib", "cpu"), DlibFaceEncoder)
    with pytest.raises(ValueError, match="resnet50"):
        build_encoder("frame", "resnet50", "cpu")
    with pytest.raises(ValueError, match="'dlib'"):
        build_encoder("audio", "dlib", "cpu")
    with pytest.raises(ValueError, match="'whisper'"):
        build_encoder("face", "whisper", "cpu")
    with pytest.raises(ValueError, match="needs a path"):
        build_encoder("frame", "hf:", "cpu")
    with pytest.raises(ValueError, match="'video'"):
        build_encoder("video", None, "cpu")
    with pytest.raises(EncoderWeightsMissing, match="nowhere"):
        build_encoder("audio", f"whisper:{tmp_path / 'nowhere'}", "cpu")


# --------------------------------------------------------------------------- s3://


@pytest.mark.integration
def test_weights_from_s3_are_cached_locally(tmp_path, monkeypatch, tiny_clip):
    import boto3
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("MICROEMO_CACHE", str(tmp_path / "cache"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, **creds)
        s3.create_bucket(Bucket="models")
        s3.upload_file(str(default_mobilenet_weights()), "models", "frames/mnv2.pth")
        for f in tiny_clip[0].iterdir():
            s3.upload_file(str(f), "models", f"hf/tiny-clip/{f.name}")
        opts = {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}

        enc = MobileNetV2FrameEncoder("s3://models/frames/mnv2.pth", storage_options=opts)
        assert enc.weight_hash.startswith("b0353104") and enc.id.startswith("mobilenet_v2-mnv2/")
        cached = list((tmp_path / "cache" / "weights").glob("*/mnv2.pth"))
        assert len(cached) == 1
        again = MobileNetV2FrameEncoder("s3://models/frames/mnv2.pth", storage_options=opts)
        assert again.weight_hash == enc.weight_hash
        assert list((tmp_path / "cache" / "weights").glob("*/mnv2.pth")) == cached  # reused, not copied again

        hf = build_encoder("frame", "hf:s3://models/hf/tiny-clip/", "cpu", storage_options=opts)
        assert hf.id == "hf-clip:tiny-clip/grid2x2+pool/sq32"
        assert hf.weight_hash == HFVisionFrameEncoder(str(tiny_clip[0])).weight_hash

        with pytest.raises(EncoderWeightsMissing, match="s3://models/frames/nope.pth"):
            MobileNetV2FrameEncoder("s3://models/frames/nope.pth", storage_options=opts)
        assert not list((tmp_path / "cache" / "weights").glob(".partial-*"))
    finally:
        server.stop()
