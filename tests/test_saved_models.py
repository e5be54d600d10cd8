"""SavedModel exports reload in a fresh process without esp_tf and reproduce in-process outputs."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow as tf

from esp_tf import models, saved_models
from esp_tf.synthetic import LatentSynthetic, PixelSynthetic

MEAN, STD = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)


def _fresh_process(code: str, tmp_path) -> None:
    """Runs code in a new interpreter whose cwd and path cannot reach esp_tf."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_generator_reloads_without_esp_tf_and_renders_the_same_set(tmp_path):
    for i, syn in enumerate([PixelSynthetic(3, 2, (8, 8, 3), init="gaussian", seed=1),
                             LatentSynthetic(3, 2, (16, 16, 3), init="gaussian", num_decoders=2, hidden=4)]):
        path = saved_models.export_generator(syn, MEAN, STD, str(tmp_path / f"gen{i}"))
        images, labels = tf.function(syn.render)()     # the same graph the SavedModel holds
        _fresh_process(f"""
            import sys, numpy as np, tensorflow as tf
            out = tf.saved_model.load({path!r}).signatures["render"]()
            assert "esp_tf" not in sys.modules
            np.savez({str(tmp_path / f'out{i}.npz')!r}, **{{k: v.numpy() for k, v in out.items()}})
        """, tmp_path)
        got = np.load(tmp_path / f"out{i}.npz")
        np.testing.assert_array_equal(got["images"], images.numpy())
        np.testing.assert_array_equal(got["labels"], labels.numpy())
        expected_u8 = np.clip(np.round((images.numpy() * STD + MEAN) * 255), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(got["images_uint8"], expected_u8)


def test_classifier_serves_raw_uint8_images_and_matches_the_in_process_model(tmp_path):
    model = models.build("convnet_tiny", (8, 8, 3), 4)
    path = saved_models.export_classifier(model, MEAN, STD, str(tmp_path / "clf"))
    raw = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    in_process = saved_models._Classifier(model, MEAN, STD).serve(tf.constant(raw))["logits"].numpy()
    eager = model((raw / 255.0 - MEAN) / STD, training=False).numpy()
    np.testing.assert_allclose(in_process, eager, rtol=1e-5, atol=1e-6)   # it normalises inside
    _fresh_process(f"""
        import numpy as np, tensorflow as tf
        serve = tf.saved_model.load({path!r}).signatures["serve"]
        out = serve(tf.constant(np.load({str(tmp_path / 'raw.npy')!r})))
        np.save({str(tmp_path / 'logits.npy')!r}, out["logits"].numpy())
        np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)
    """, tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), in_process)


def test_re_export_replaces_the_previous_savedmodel_atomically(tmp_path):
    syn = PixelSynthetic(2, 1, (4, 4, 3), init="gaussian", seed=0)
    path = saved_models.export_generator(syn, MEAN, STD, str(tmp_path / "gen"))
    syn.images.assign(tf.zeros_like(syn.images))
    saved_models.export_generator(syn, MEAN, STD, path)
    out = tf.saved_model.load(path).signatures["render"]()
    np.testing.assert_array_equal(out["images"].numpy(), np.zeros((2, 4, 4, 3), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["gen"]


def test_an_interrupted_export_leaves_no_second_savedmodel_and_the_next_export_replaces_it(tmp_path):
    import tensorflow as tf
    from esp_tf import saved_models
    module = tf.Module()
    module.f = tf.function(lambda: tf.constant(1.0), input_signature=[])
    target = tmp_path / "saved_model" / "classifier"
    target.parent.mkdir()
    (target.parent / ".classifier.tmp").mkdir()                 # what a killed export leaves
    (target.parent / ".classifier.tmp" / "saved_model.pb").write_bytes(b"half")
    saved_models._write_atomic(module, str(target), {"f": module.f})
    assert sorted(p.name for p in target.parent.iterdir()) == ["classifier"]
    assert float(tf.saved_model.load(str(target)).signatures["f"]()["output_0"]) == 1.0
